import torch

from ragsae.capture import ActivationCache, activations_id
from ragsae.lm import loading as llm_module
from ragsae.lm.loading import LoadedLlm, resolve_dtype


def test_auto_dtype_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(llm_module, "native_bf16_cpu", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(llm_module, "native_bf16_cpu", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16


def test_activation_cache_tells_dtypes_apart(tmp_path):
    fp32 = LoadedLlm(None, None, "m", "abc", torch.device("cpu"), torch.float32)
    bf16 = LoadedLlm(None, None, "m", "abc", torch.device("cpu"), torch.bfloat16)
    assert fp32.activation_key == "abc|float32" and bf16.activation_key == "abc|bfloat16"
    cache = ActivationCache(tmp_path)
    assert cache.entry(activations_id(fp32, 8, 256, "", "t")) != cache.entry(activations_id(bf16, 8, 256, "", "t"))
