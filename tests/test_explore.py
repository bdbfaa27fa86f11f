"""The exploration script's objective and scoring pieces (benchmarks/explore.py)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from conftest import load_benchmark_script

from ragsae.capture import TokenActivations
from ragsae.config import SaeConfig, ScoringConfig
from ragsae.sae import train_sae

explore = load_benchmark_script("explore", "research")


def test_settings_parse_and_refuse_bad_input():
    assert explore.FinetuneSetting.parse("1:3e-4:2") == explore.FinetuneSetting(1.0, 3e-4, 2, False)
    assert explore.FinetuneSetting.parse("0.5:1e-3:1:easy").easy
    for bad in ("1:2", "a:1e-3:1", "1:1e-3:0", "1:1e-3:1:hard"):
        with pytest.raises(ValueError, match="setting"):
            explore.FinetuneSetting.parse(bad)


def test_query_expansion_adds_close_latents_only():
    w_dec = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    ids, cosines = explore.decoder_neighbours(w_dec, 1, block=2)
    assert ids[:, 0].tolist() == [1, 0, 1]
    query = sp.csr_matrix(np.array([[2.0, 0.0, 0.0]], dtype=np.float32))
    expanded = explore.expand_queries(query, ids, cosines, alpha=0.5, threshold=0.7).toarray()
    np.testing.assert_allclose(expanded, [[2.0, 0.5 * 0.8 * 2.0, 0.0]], rtol=1e-6)
    assert explore.expand_queries(query, ids, cosines, 0.5, 0.9).nnz == 1  # below the threshold: nothing added


def test_contrastive_objective_learns_to_pair_pseudo_queries_with_their_passages():
    """A few InfoNCE + FVU steps raise in-batch accuracy of pseudo-queries (a span of their passage's
    tokens, with noise) against their passages, while the reconstruction stays faithful."""
    rng = np.random.default_rng(0)
    d, n, length = 32, 32, 12
    topics = 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    passages = (topics[:, None, :] + rng.normal(size=(n, length, d)).astype(np.float32)).reshape(-1, d)
    queries = passages.reshape(n, length, d)[:, :3] + 3.0 * rng.normal(size=(n, 3, d)).astype(np.float32)
    sae, _ = train_sae(passages, SaeConfig(num_latents=64, k=4, epochs=5, batch_size=64, auxk_k=8))
    data = explore.TrainingData(
        passages=TokenActivations(passages, np.arange(0, n * length + 1, length)),
        pseudo_queries=TokenActivations(queries.reshape(-1, d), np.arange(0, n * 3 + 1, 3)),
        keep=None,
        idf=torch.ones(64),
        avg_length=float(length),
        cluster_vectors=None,
    )
    items = np.arange(n)
    labels = torch.arange(n)

    def loss_and_accuracy():
        raw, fvu = explore.batch_scores(sae, data, items, ScoringConfig())
        scores = raw / raw.std(1).mean().detach()
        return F.cross_entropy(scores, labels), fvu, (scores.argmax(1) == labels).float().mean().item()

    ce_before, fvu_before, acc_before = loss_and_accuracy()
    sae.train()
    optimiser = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(30):
        ce, fvu, _ = loss_and_accuracy()
        explore.optimiser_step(sae, optimiser, fvu + ce, sae.config.grad_clip)
    ce_after, fvu_after, acc_after = loss_and_accuracy()
    assert ce_after < 0.7 * ce_before and acc_after > acc_before + 0.3
    assert fvu_after < fvu_before + 0.1  # the reconstruction term keeps the codes faithful
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_shared_sae_study_scores_own_other_and_shared_saes(tiny_build_config, tiny_llm, tmp_path):
    import argparse

    from conftest import msmarco_slice

    from ragsae.bench import load_beir
    from ragsae.text import split_passages

    first, second = msmarco_slice(tmp_path / "a", 3, 30, 12), msmarco_slice(tmp_path / "b", 2, 10, 40)
    documents, queries, qrels = load_beir(first)
    cfg = tiny_build_config.capture
    passages = split_passages(documents, tiny_llm.tokenizer, cfg.window, cfg.overlap)
    collection = explore.Collection("a", tiny_llm, len(documents), passages, queries, qrels, tmp_path / "cache")
    setup = explore.make_setup(collection, tiny_build_config)
    args = argparse.Namespace(with_datasets=[str(second)], split="test")
    rows = explore.study_shared_sae(setup, args)
    assert [row["setting"].split(" ")[0] for row in rows] == ["own", "b's", "shared"]
    shared_tokens = int(rows[2]["setting"].split(", ")[1].split(" ")[0])
    assert shared_tokens > len(setup.acts.values)  # this collection's passages and the other's
    assert all(0.0 <= row["metrics"]["nDCG@10"] <= 1.0 and row["columns"]["FVU"] > 0 for row in rows)
    trained = sorted((tmp_path / "cache" / "sae").iterdir())
    assert len(trained) == 3  # own, other, shared: all cached
    again = explore.study_shared_sae(setup, args)
    assert sorted((tmp_path / "cache" / "sae").iterdir()) == trained
    assert [row["metrics"] for row in again] == [row["metrics"] for row in rows]


def test_promptreps_vectors_pad_on_the_left_keep_the_texts_words_and_fuse(tiny_llm):
    texts = ["The thermometer measures temperature.", "Axons end in synaptic knobs, the terminals of a neuron.", "x"]
    stopwords = frozenset({"the", "of", "a", "in"})
    batched, _ = explore.promptreps_vectors(tiny_llm, texts, "passage", stopwords, batch_size=3)
    alone, _ = explore.promptreps_vectors(tiny_llm, texts, "passage", stopwords, batch_size=1)
    np.testing.assert_allclose(batched.toarray(), alone.toarray(), atol=1e-4)  # the last position is each prompt's own
    tokenizer = tiny_llm.tokenizer
    vocab = explore.text_vocabularies(tokenizer, texts, stopwords)
    forms = ("thermometer", " thermometer", " the", "the")
    ids = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in forms}
    assert set(ids["thermometer"]) | set(ids[" thermometer"][:1]) <= set(vocab[0].tolist())
    assert not (set(ids["the"]) | set(ids[" the"])) & set(vocab[0].tolist())  # a stopword
    for row, kept in enumerate(vocab):
        assert set(batched[row].indices.tolist()) <= set(kept.tolist()) and (batched[row].data > 0).all()
    assert batched.shape == (3, tiny_llm.model.config.vocab_size)

    sae = (np.array([[4.0, 2.0, 1.0]]), np.array([[0, 1, 2]]))
    lexical = (np.array([[3.0, 3.0, -np.inf]]), np.array([[2, 3, -1]]))
    scores, fused = explore.fuse_runs([sae, lexical], [1.0, 0.5], 5)
    assert fused.tolist() == [[0, 2, 1, 3, -1]]  # 1, 0.25 + 0.5, 0.5, 0.5, padding
    np.testing.assert_allclose(scores, [[1.0, 0.75, 0.5, 0.5, -np.inf]])
    _, rrf = explore.fuse_runs([sae, lexical], [1.0, 1.0], 5, rrf_k=60)
    assert rrf.tolist() == [[2, 0, 1, 3, -1]]  # 1/63 + 1/61, 1/61, 1/62, 1/62
