import json

import numpy as np
import pytest
from conftest import shared_collection

from ragsae.capture import ActivationCache, activations_id, capture, capture_cached

TEXTS = ["short text", "a somewhat longer piece of text with more tokens in it", "mid length text here"]


def test_shapes_offsets_and_order(tiny_llm):
    acts = capture(tiny_llm, TEXTS, [1, 3], window=64, batch_size=2)
    n_tokens = [len(tiny_llm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    for layer in (1, 3):
        assert acts[layer].values.shape == (sum(n_tokens), 64)
        assert acts[layer].lengths().tolist() == n_tokens
    assert not np.allclose(acts[1].values, acts[3].values)


def test_batching_does_not_change_activations(tiny_llm):
    one = capture(tiny_llm, TEXTS, [2], batch_size=1)[2]
    many = capture(tiny_llm, TEXTS, [2], batch_size=3)[2]
    np.testing.assert_allclose(one.values.astype(np.float32), many.values.astype(np.float32), atol=2e-2)


def test_matches_hidden_states_and_skips_bos(tiny_llm):
    import torch

    acts = capture(tiny_llm, [TEXTS[1]], [0, 2, 4])
    ids = [tiny_llm.tokenizer.bos_token_id] + tiny_llm.tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = tiny_llm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in (0, 2):
        np.testing.assert_allclose(acts[layer].values, hidden[layer][0, 1:].numpy(), atol=2e-2, rtol=1e-2)


def test_stops_after_the_captured_layer(tiny_llm, monkeypatch):
    monkeypatch.setattr(tiny_llm, "trunk", lambda layer: None)  # the hooked forward, as for other architectures
    calls = []
    handle = tiny_llm.blocks()[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        capture(tiny_llm, TEXTS, [2])
    finally:
        handle.remove()
    assert calls == []


def test_window_truncates(tiny_llm):
    acts = capture(tiny_llm, [" ".join(["word"] * 100)], [1], window=16)
    assert acts[1].lengths().tolist() == [16]


def test_unknown_layer_is_named(tiny_llm):
    with pytest.raises(ValueError, match=r"layer 9 does not exist: .* has layers 0\.\.4"):
        capture(tiny_llm, TEXTS, [9])


def test_cache_round_trip(tiny_llm, tmp_path):
    cache = ActivationCache(tmp_path)
    first = capture_cached(tiny_llm, TEXTS, [1], "fp", cache)[1]
    assert len(list(tmp_path.iterdir())) == 1
    again = capture_cached(tiny_llm, TEXTS, [1], "fp", cache)[1]
    assert isinstance(again.values, np.memmap)
    np.testing.assert_array_equal(first.values, again.values)
    np.testing.assert_array_equal(first.offsets, again.offsets)
    timing = cache.timing(cache.entry(activations_id(tiny_llm, 1, 256, "", "fp")))
    assert timing["seconds"] > 0 and timing["device"] == "cpu" and timing["layers"] == [1]


def test_cache_refresh_captures_again(tiny_llm, tmp_path, monkeypatch):
    import ragsae.capture.cache as capture_module

    cache = ActivationCache(tmp_path)
    capture_cached(tiny_llm, TEXTS, [1], "fp", cache)
    calls = []
    real = capture_module.capture
    monkeypatch.setattr(capture_module, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    capture_cached(tiny_llm, TEXTS, [1], "fp", cache)
    assert calls == []
    fresh = capture_cached(tiny_llm, TEXTS, [1], "fp", cache, refresh=True)[1]
    assert calls == [1] and not isinstance(fresh.values, np.memmap)


def test_prefix_shapes_activations_but_adds_no_tokens(tiny_llm):
    plain = capture(tiny_llm, TEXTS, [2])[2]
    prefixed = capture(tiny_llm, TEXTS, [2], prefix="Question: ")[2]
    assert prefixed.lengths().tolist() == plain.lengths().tolist()
    assert not np.allclose(plain.values, prefixed.values, atol=1e-3)


def test_content_mask_drops_whole_stopwords_only():
    from ragsae.capture import content_mask
    from ragsae.text.stopwords import ENGLISH

    text = "What is the axon terminal"
    spans = [(0, 4), (4, 7), (7, 11), (11, 14), (14, 16), (16, 25)]  # "What"," is"," the"," ax","on"," terminal"
    assert content_mask(text, spans, ENGLISH).tolist() == [False, False, False, True, True, True]
    assert content_mask("the of", [(0, 3), (3, 6)], ENGLISH).tolist() == [True, True]  # never empty


def test_stopwords_are_fed_but_not_captured(tiny_llm):
    from ragsae.text.stopwords import ENGLISH

    text = "what is the capital of France"
    full = capture(tiny_llm, [text], [2], prefix="Question: ")[2]
    content = capture(tiny_llm, [text], [2], prefix="Question: ", stopwords=ENGLISH)[2]
    ids = tiny_llm.tokenizer("Question: " + text, add_special_tokens=False)["input_ids"]
    words = [tiny_llm.tokenizer.decode([t]).strip().lower() for t in ids[2:]]
    kept = [i for i, w in enumerate(words) if w not in ENGLISH]
    assert content.lengths().tolist() == [len(kept)] and len(kept) < len(words)
    np.testing.assert_allclose(content.values.astype(np.float32), full.values[kept].astype(np.float32), atol=1e-3)


@pytest.mark.slow
def test_real_model_passage_activations_do_not_depend_on_the_batch():
    """The bundled SmolLM2 in bfloat16: passages captured in one go and in three parts give the same
    activations bit for bit (without batch invariance, 364 of 600 msmarco passages differed), so an index
    grown by adds encodes its passages as one built in one go."""
    from ragsae.config import CaptureConfig
    from ragsae.encode import passage_activations
    from ragsae.lm.loading import load_llm

    llm = load_llm()
    with open(shared_collection("msmarco-5k") / "corpus.jsonl") as f:
        texts = [json.loads(next(f))["text"] for _ in range(60)]
    config = CaptureConfig()
    whole = passage_activations(llm, texts, config).values
    parts = [passage_activations(llm, texts[a:b], config).values for a, b in ((0, 7), (7, 31), (31, 60))]
    assert np.array_equal(whole, np.concatenate(parts))


def test_query_batches_take_few_shapes():
    """A service's micro-batches of 1 to 32 queries are padded to seven row counts (each shape costs
    kernels and buffers kept for good), never fewer rows than texts."""
    from ragsae.capture.forward import padded_shape

    sizes = {n: padded_shape(n, 5)[0] for n in range(1, 33)}
    assert set(sizes.values()) == {1, 2, 4, 8, 16, 24, 32}
    assert all(n <= rows < 2 * n for n, rows in sizes.items())
    assert [padded_shape(3, width)[1] for width in (1, 8, 9, 17)] == [8, 8, 16, 24]


def test_padded_query_batches_give_each_query_its_own_codes(tiny_llm):
    texts = ["a short one", "a somewhat longer query about capture", "x", "three words here", "five"]
    together = capture(tiny_llm, texts, [2], batch_size=5)[2]
    for i, text in enumerate(texts):
        alone = capture(tiny_llm, [text], [2])[2]
        np.testing.assert_allclose(
            alone.values, together.values[together.offsets[i] : together.offsets[i + 1]], atol=1e-5
        )
