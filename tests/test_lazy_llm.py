"""The bundled SmolLM2 loaded lazily from a warm cache (ragsae/lm/loading.py): the trunk read from the
cached safetensors file gives the activations of the trunk on the model and of the model's own forward,
bit for bit, and a fresh process that loads and runs it imports no transformers modeling code."""

import json

import pytest
import torch
from conftest import shared_collection, warm_load_in_fresh_process

from ragsae.config import LlmConfig
from ragsae.lm.loading import load_llm
from ragsae.lm.trunk import DefaultRope, LlamaTrunk

pytestmark = pytest.mark.slow

BUNDLED = LlmConfig(device="cpu", dtype="bfloat16")

SENTENCES = [
    "How do I read a CSV file row by row?",
    "The json module encodes and decodes JavaScript Object Notation data.",
    "Zip archives, sockets and 日本語 🙂",
    "what is the boiling point of water at high altitude",
]


@pytest.fixture(scope="module")
def warm_cache():
    """The bundled model's cache entry in this session's cache folder (de-quantised here if missing)."""
    load_llm(BUNDLED)


def test_bundled_lazy_trunk_is_bit_identical(warm_cache):
    llm = load_llm(BUNDLED)
    assert not llm.model_built
    lazy = llm.trunk(12)
    assert not llm.model_built
    eager = LlamaTrunk(llm.model, 12)  # builds the model
    assert (lazy.fused, lazy.packed) == (eager.fused, eager.packed)
    layers = [1, 4, 8, 12]
    for text in SENTENCES:
        ids = llm.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            hidden = llm.model(ids, output_hidden_states=True).hidden_states
        from_file, from_model = lazy(ids, layers), eager(ids, layers)
        for layer in layers:
            assert from_file[layer].dtype == torch.bfloat16
            assert torch.equal(from_file[layer], from_model[layer]), (text, layer)
            assert torch.equal(from_file[layer], hidden[layer]), (text, layer)
    encoded = [llm.tokenizer(text)["input_ids"] for text in SENTENCES]
    lengths = [len(ids) for ids in encoded]
    batch = torch.full((len(encoded), max(lengths)), llm.tokenizer.pad_token_id)
    for row, ids in enumerate(encoded):
        batch[row, : len(ids)] = torch.tensor(ids)
    for rows, row_lengths in ((None, None), (64, lengths)):  # capture's two ways to run a padded batch
        assert torch.equal(lazy(batch, [12], rows, row_lengths)[12], eager(batch, [12], rows, row_lengths)[12])


def test_bundled_rope_is_the_models(warm_cache):
    llm = load_llm(BUNDLED)
    rotary = llm.model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    theta = llm.model.config.rope_parameters["rope_theta"]
    ours = DefaultRope(theta, llm.model.config.head_dim)
    x = torch.zeros(1, 1, llm.d_model, dtype=torch.bfloat16)
    positions = torch.arange(llm.model.config.max_position_embeddings)[None]
    for got, want in zip(ours(x, positions), rotary(x, positions)):
        assert torch.equal(got, want)


def test_bundled_warm_load_imports_no_modeling_code(warm_cache):
    forward = "llm.trunk(8)(llm.tokenizer('How do I read a CSV file?', return_tensors='pt')['input_ids'], [8])"
    report = warm_load_in_fresh_process("device='cpu', dtype='bfloat16'", forward, timeout=600)
    assert report == {"built": False, "modeling": []}


def test_bundled_tokenizer_loaded_directly_is_autotokenizers(warm_cache):
    from transformers import AutoTokenizer

    from ragsae.lm import weights_cache
    from ragsae.lm.loading import direct_tokenizer_class, load_tokenizer

    llm = load_llm(BUNDLED)
    entry = weights_cache.find_entry(llm.model_hash, torch.bfloat16)
    assert entry is not None and direct_tokenizer_class(entry) is not None
    direct, auto = load_tokenizer(str(entry), None), AutoTokenizer.from_pretrained(str(entry))
    assert type(direct) is type(auto) and direct.init_kwargs == auto.init_kwargs
    assert direct.special_tokens_map == auto.special_tokens_map and direct.chat_template == auto.chat_template
    assert direct.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert (direct.padding_side, direct.truncation_side) == (auto.padding_side, auto.truncation_side)
    corpus = shared_collection("msmarco-5k") / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line, _ in zip(open(corpus, encoding="utf-8"), range(500))] + SENTENCES
    assert all(direct(t)["input_ids"] == auto(t)["input_ids"] for t in texts)
    chat = [{"role": "user", "content": SENTENCES[0]}]
    assert direct.apply_chat_template(chat, tokenize=False) == auto.apply_chat_template(chat, tokenize=False)
