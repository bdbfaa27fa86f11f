import torch

from ragsae import llm as llm_module
from ragsae.capture import ActivationCache
from ragsae.llm import LoadedLlm, resolve_dtype


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
    assert cache.key(fp32.activation_key, 8, 256, "", "t") != cache.key(bf16.activation_key, 8, 256, "", "t")
