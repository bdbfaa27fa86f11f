import json

import numpy as np
import pytest
import torch
from conftest import shared_collection
from test_capture import TEXTS
from torch.testing import assert_close

from ragsae.capture import capture
from ragsae.lm import weights_cache
from ragsae.lm.loading import LoadedLlm, load_model, open_cached_weights
from ragsae.lm.trunk import DefaultRope, LlamaTrunk, trunk_spec, trunk_unsupported_reason


def tiny_model(model_type: str, layers: int = 3, **extra):
    """A randomly initialised causal LM of the given family (3 layers), in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # biases (Qwen2's q/k/v, Llama's with attention_bias) start at zero: make them matter
        for block in model.model.layers:
            for proj in (
                block.self_attn.q_proj,
                block.self_attn.k_proj,
                block.self_attn.v_proj,
                block.self_attn.o_proj,
            ):
                if proj.bias is not None:
                    proj.bias.normal_()
    return model


FAMILIES = [("llama", {}), ("mistral", {"sliding_window": None}), ("qwen2", {"use_sliding_window": False})]


@pytest.mark.parametrize(("model_type", "extra"), FAMILIES)
def test_matches_transformers_hidden_states(model_type, extra):
    model = tiny_model(model_type, **extra)
    assert trunk_unsupported_reason(model) is None
    ids = torch.randint(0, 97, (1, 11))
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states  # the last one is after the final norm
    out = LlamaTrunk(model, 2)(ids, [0, 1, 2])
    for layer in (0, 1, 2):
        assert_close(out[layer], hidden[layer], rtol=1e-5, atol=1e-5)


def test_unfused_weights_give_the_same_activations(monkeypatch):
    import ragsae.lm.trunk as trunk_module

    model = tiny_model("qwen2", use_sliding_window=False)
    ids = torch.randint(0, 97, (2, 7))
    fused = LlamaTrunk(model, 3)
    monkeypatch.setattr(trunk_module, "COPY_LIMIT_BYTES", 0)
    separate = LlamaTrunk(model, 3)
    assert fused.fused and not separate.fused
    assert_close(fused(ids, [3])[3], separate(ids, [3])[3], rtol=1e-6, atol=1e-6)


def test_prepacked_bfloat16_trunk_gives_the_same_activations(monkeypatch):
    import ragsae.lm.trunk as trunk_module

    model = tiny_model("qwen2", use_sliding_window=False).bfloat16()
    ids = torch.randint(0, 97, (2, 7))
    packed = LlamaTrunk(model, 3)
    monkeypatch.setattr(trunk_module, "COPY_LIMIT_BYTES", 0)
    plain = LlamaTrunk(model, 3)
    assert not plain.packed and not plain.fused
    if not packed.packed:
        pytest.skip("this PyTorch build cannot prepack bfloat16 weights")
    assert torch.equal(packed(ids, [1, 3])[3], plain(ids, [1, 3])[3])
    assert not LlamaTrunk(tiny_model("llama"), 3).packed  # float32 keeps F.linear


def test_a_moved_model_gets_a_new_trunk():
    llm = LoadedLlm(tiny_model("llama"), None, "tiny", "hash", torch.device("cpu"))
    first = llm.trunk(2)
    llm.model.to(torch.float64)
    assert first.stale
    with pytest.raises(RuntimeError, match="moved"):
        first(torch.randint(0, 97, (1, 4)), [2])
    second = llm.trunk(2)
    assert second is not first and not second.stale
    assert second(torch.randint(0, 97, (1, 4)), [2])[2].dtype == torch.float64


def test_right_padding_leaves_real_tokens_unchanged():
    model = tiny_model("llama")
    trunk = LlamaTrunk(model, 3)
    short, long = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 9))
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], 1)])
    out = trunk(batch, [3])[3]
    assert_close(out[0], trunk(long, [3])[3][0])
    assert_close(out[1, :5], trunk(short, [3])[3][0])


def test_layers_are_validated_and_windows_respected():
    trunk = LlamaTrunk(tiny_model("mistral", sliding_window=8), 2)
    ids = torch.randint(0, 97, (1, 8))
    assert trunk.accepts(8) and not trunk.accepts(9)
    with pytest.raises(ValueError, match="sliding attention window"):
        trunk(torch.randint(0, 97, (1, 9)), [2])
    with pytest.raises(ValueError, match="outside"):
        trunk(ids, [3])
    with pytest.raises(ValueError, match="outside"):
        trunk(ids, [])


def test_other_architectures_are_refused_and_capture_falls_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    assert "gpt2" in trunk_unsupported_reason(model)
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel"):
        LlamaTrunk(model, 1)
    assert LoadedLlm(model, None, "gpt2", "x", torch.device("cpu")).trunk(1) is None


def test_capture_is_the_same_with_and_without_the_trunk(tiny_llm, monkeypatch):
    assert tiny_llm.trunk(3) is not None
    fast = capture(tiny_llm, TEXTS, [1, 3], batch_size=2)
    monkeypatch.setattr(tiny_llm, "trunk", lambda layer: None)
    hooked = capture(tiny_llm, TEXTS, [1, 3], batch_size=2)
    for layer in (1, 3):  # float16 storage: equal up to its rounding (exactly equal where measured)
        np.testing.assert_allclose(fast[layer].values, hooked[layer].values, rtol=2**-10, atol=1e-4)


def test_trunk_is_reused_and_deepened(tiny_llm):
    llm = LoadedLlm(tiny_llm.model, tiny_llm.tokenizer, "tiny", "hash", torch.device("cpu"))
    shallow = llm.trunk(1)
    deep = llm.trunk(3)
    assert shallow.layer == 1 and deep.layer == 3 and llm.trunk(2) is deep


@pytest.mark.slow
def test_real_model_activations_are_bit_identical(monkeypatch):
    """The bundled SmolLM2 at its default dtype: the trunk gives the hooked forward's activations on
    real passages batched with padding (so cached activations stay valid). Bit for bit on the
    benchmark's AMD machine; other CPUs pick other matrix kernels for the fused products (on an Intel
    Xeon 45% of values were equal and 4% more than one bfloat16 step apart, after several layers of
    rounding differences), so the test asks for most values within one step and a small overall error."""
    from ragsae.lm.loading import load_llm

    llm = load_llm()
    with open(shared_collection("msmarco-5k") / "corpus.jsonl") as f:
        texts = [json.loads(next(f))["text"] for _ in range(12)]
    fast = capture(llm, texts, [4, 8], batch_size=6, prefix="Document: ")
    monkeypatch.setattr(llm, "trunk", lambda layer: None)
    hooked = capture(llm, texts, [4, 8], batch_size=6, prefix="Document: ")
    for layer in (4, 8):
        a, b = fast[layer].values.astype(np.float32), hooked[layer].values.astype(np.float32)
        within_one_step = np.abs(a - b) <= 2**-7 * np.abs(b) + 0.05
        assert within_one_step.mean() > 0.9, within_one_step.mean()
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.01, np.linalg.norm(a - b) / np.linalg.norm(b)


# The trunk without the model: read from a cache entry's safetensors file with its config.json.


@pytest.mark.parametrize("theta", [10000.0, 100000.0, 1000000.0, 500000])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_own_rope_is_transformers_rope_bit_for_bit(theta, head_dim):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    sizes = dict(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    rope = {"rope_type": "default", "rope_theta": theta}
    ours = DefaultRope(theta, head_dim)
    positions = torch.arange(8192)[None]  # past max_position_embeddings: the default RoPE does not care
    for module in (
        LlamaRotaryEmbedding(LlamaConfig(**sizes, head_dim=head_dim, rope_parameters=rope)),
        MistralRotaryEmbedding(MistralConfig(**sizes, head_dim=head_dim, rope_parameters=rope)),
        Qwen2RotaryEmbedding(Qwen2Config(**sizes, rope_parameters=rope)),  # head size hidden_size / heads
    ):
        assert torch.equal(ours.inv_freq, module.inv_freq) and module.attention_scaling == 1.0
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.zeros(1, 3, 4 * head_dim, dtype=dtype)
            for got, want in zip(ours(x, positions), module(x, positions)):
                assert got.dtype == want.dtype == dtype and torch.equal(got, want)


def cache_entry_of(model, tokenizer, dtype: torch.dtype, folder) -> tuple:
    """`model` saved and loaded back in `dtype` (as load_llm reads a model: the rotary inverse frequencies
    stay float32, which `model.to(dtype)` would round), written as a cache entry; (entry weights, model)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder / "source")
    loaded = AutoModelForCausalLM.from_pretrained(folder / "source", dtype=dtype).eval()
    digest = "cd" * 32
    weights_cache.write_entry(loaded, tokenizer, digest, dtype, root=folder / "cache")
    return digest, loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("model_type", "extra"), [*FAMILIES, ("llama", {"attention_bias": True})])
def test_trunk_read_from_the_cache_entry_is_bit_identical(model_type, extra, dtype, tokenizer, tmp_path, monkeypatch):
    """Trunk read from the file == trunk on the model == the model's own forward, exactly."""
    monkeypatch.setenv(weights_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    digest, _ = cache_entry_of(tiny_model(model_type, layers=4, **extra), tokenizer, dtype, tmp_path)
    weights = open_cached_weights(digest, dtype)
    assert weights is not None and weights.spec.rope_theta is not None
    model = load_model(str(weights.folder), dtype, None).eval()  # what the lazy LoadedLlm builds
    lazy = LlamaTrunk.from_safetensors(weights.weights_path, weights.spec, 3, torch.device("cpu"))
    eager = LlamaTrunk(model, 3)
    assert (lazy.fused, lazy.packed) == (eager.fused, eager.packed)
    ids = torch.randint(0, 97, (1, 13))
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states  # [3] is before the final norm: 4 layers
    from_file, from_model = lazy(ids, [0, 1, 2, 3]), eager(ids, [0, 1, 2, 3])
    for layer in (0, 1, 2, 3):
        assert torch.equal(from_file[layer], from_model[layer]) and torch.equal(from_file[layer], hidden[layer])
    batch = torch.randint(0, 97, (3, 9))  # right-padded, batch-invariant products: the same ops either way
    for rows in (None, 16):
        got = lazy(batch, [3], rows, [9, 4, 6] if rows else None)[3]
        assert torch.equal(got, eager(batch, [3], rows, [9, 4, 6] if rows else None)[3])


def test_the_spec_takes_only_what_the_trunk_computes_exactly():
    config = tiny_model("llama").config.to_dict()
    spec = trunk_spec(config)
    assert (spec.head_dim, spec.scale, spec.rope_theta, spec.max_length) == (16, 16**-0.5, 10000.0, None)
    assert trunk_spec({**config, "head_dim": None}).head_dim == 16  # hidden_size / heads
    scaled = {**config, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
    assert trunk_spec(scaled).rope_theta is None
    partial = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}
    assert trunk_spec(partial).rope_theta is None
    with pytest.raises(ValueError, match="default RoPE"):
        LlamaTrunk.from_tensors(trunk_spec(scaled), {}, 1)
    for bad, reason in [
        ({"hidden_act": "gelu"}, "activation"),
        ({"mlp_bias": True}, "MLP biases"),
        ({"model_type": "gemma3_text"}, "model type"),
        ({"rms_norm_eps": None}, "rms_norm_eps"),
        ({"num_key_value_heads": 3}, "key-value heads"),
    ]:
        with pytest.raises(ValueError, match=reason):
            trunk_spec({**config, **bad})
    mistral = tiny_model("mistral", sliding_window=8).config.to_dict()
    assert trunk_spec(mistral).max_length == 8
    with pytest.raises(ValueError, match="sliding_window"):  # its config class would default it to 4096
        trunk_spec({k: v for k, v in mistral.items() if k != "sliding_window"})
    qwen2 = tiny_model("qwen2", use_sliding_window=False).config.to_dict()
    assert (trunk_spec(qwen2).qkv_bias, trunk_spec(qwen2).out_bias, trunk_spec(qwen2).max_length) == (True, False, None)


def test_the_model_path_keeps_other_ropes():
    """A model with scaled RoPE still runs on the trunk built on it (its own rotary module)."""
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert trunk_unsupported_reason(model) is None
    ids = torch.randint(0, 97, (1, 9))
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(LlamaTrunk(model, 2)(ids, [2])[2], hidden[2])


def test_tensors_of_another_shape_are_refused():
    model = tiny_model("llama")
    spec = trunk_spec(model.config.to_dict())
    tensors = dict(model.state_dict())
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="k_proj"):
        LlamaTrunk.from_tensors(spec, tensors, 2)
    del tensors["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="embed_tokens"):
        LlamaTrunk.from_tensors(spec, tensors, 0)
