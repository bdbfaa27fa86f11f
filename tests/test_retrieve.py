import numpy as np
import pytest
import scipy.sparse as sp

from ragsae.config import ScoringConfig
from ragsae.encode import pool
from ragsae.retrieval import (
    FaissBackend,
    Retriever,
    bm25_document_weights,
    decoder_vectors,
    feedback_queries,
    inverted_index,
    latent_idf,
    reciprocal_rank_fusion,
    sparse_search,
    top_k,
)


def naive_pool(values, indices, offsets, m, pooling):
    out = np.zeros((len(offsets) - 1, m), dtype=np.float32)
    for row in range(len(offsets) - 1):
        for t in range(offsets[row], offsets[row + 1]):
            for v, j in zip(values[t], indices[t]):
                if v <= 0:
                    continue
                if pooling == "max":
                    out[row, j] = max(out[row, j], v)
                elif pooling == "count":
                    out[row, j] += 1
                else:
                    out[row, j] += v
    return np.log1p(out) if pooling == "log" else out


@pytest.mark.parametrize("pooling", ["max", "sum", "log", "count"])
def test_pool_matches_naive(pooling):
    rng = np.random.default_rng(0)
    offsets = np.array([0, 3, 3 + 5, 8 + 1])
    indices = rng.integers(0, 12, size=(9, 4)).astype(np.int32)
    values = rng.uniform(-0.5, 2, size=(9, 4)).astype(np.float32)
    got = pool(values, indices, offsets, 12, pooling)
    assert isinstance(got, sp.csr_matrix) and got.has_sorted_indices
    np.testing.assert_allclose(got.toarray(), naive_pool(values, indices, offsets, 12, pooling), rtol=1e-6)


def random_codes(n=30, m=20, density=0.2, seed=0):
    return sp.random(n, m, density=density, format="csr", random_state=seed, dtype=np.float32) * 3


def test_bm25_weights_match_formula():
    codes = random_codes()
    lengths = np.arange(1, 31, dtype=np.float32)
    idf = latent_idf(codes)
    dense = codes.toarray()
    df = (dense > 0).sum(0)
    np.testing.assert_allclose(idf, np.log(1 + (30 - df + 0.5) / (df + 0.5)), rtol=1e-5)
    weights = bm25_document_weights(codes, lengths, idf, 1.2, 0.75, lengths.mean()).toarray()
    norm = 1.2 * (1 - 0.75 + 0.75 * lengths / lengths.mean())
    expected = idf * dense * 2.2 / (dense + norm[:, None])
    np.testing.assert_allclose(weights, expected, rtol=1e-5)


def test_sparse_search_matches_dense_and_pads():
    docs, queries = random_codes(), random_codes(n=4, seed=1)
    scores, ids = sparse_search(queries, inverted_index(docs), 5)
    dense = queries.toarray() @ docs.toarray().T
    for q in range(4):
        np.testing.assert_allclose(scores[q], np.sort(dense[q])[::-1][:5], rtol=1e-5)
    s, i = top_k(np.array([[0.1, 0.3]]), 4)
    assert i.tolist() == [[1, 0, -1, -1]] and np.isneginf(s[0, 2:]).all()


def test_faiss_matches_numpy_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    searcher = FaissBackend.build(vectors, use_gpu=False)
    scores, ids = searcher.search(queries, 5)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    assert (ids == expected).all()
    assert searcher.save(tmp_path) == ["faiss.index"]
    again = FaissBackend.load(tmp_path, use_gpu=False)
    assert (again.search(queries, 5)[1] == ids).all()


def test_quantized_faiss_keeps_the_ranking_and_a_quarter_of_the_bytes(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = FaissBackend.build(vectors, use_gpu=False)
    small = FaissBackend.build(vectors, use_gpu=False, quantized=True)
    _, exact_ids = exact.search(vectors[:10], 5)
    _, small_ids = small.search(vectors[:10], 5)
    assert (small_ids[:, 0] == np.arange(10)).all()  # each vector still finds itself first
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact_ids, small_ids)]) >= 0.8
    for name, searcher in (("exact", exact), ("small", small)):
        (tmp_path / name).mkdir()
        searcher.save(tmp_path / name)
    assert (tmp_path / "small" / "faiss.index").stat().st_size < 0.3 * (
        tmp_path / "exact" / "faiss.index"
    ).stat().st_size


@pytest.fixture
def fake_gpu_faiss(monkeypatch):
    """faiss-cpu dressed as a GPU build: `index_cpu_to_gpu` records what it is given and returns it."""
    import faiss

    import ragsae.retrieval.backends.faiss as faiss_backend

    moved = []
    monkeypatch.setattr(faiss_backend, "_gpu_resources", None)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)

    def index_cpu_to_gpu(resources, device, index):
        assert resources == "resources" and device == 0
        moved.append(index)
        return index

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    return moved


def test_quantized_faiss_is_searched_on_the_gpu_as_float16_and_saved_as_8_bit(fake_gpu_faiss, tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 32)).astype(np.float32)
    cpu = FaissBackend.build(vectors, use_gpu=False, quantized=True)
    gpu = FaissBackend.build(vectors, quantized=True)
    assert gpu.on_gpu and not cpu.on_gpu and len(fake_gpu_faiss) == 1
    moved = fake_gpu_faiss[0]  # FAISS has no flat 8-bit index on the GPU: float16 vectors go instead
    assert isinstance(moved, faiss.IndexScalarQuantizer) and moved.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    decoded = gpu.index.reconstruct_n(0, 300)
    np.testing.assert_allclose(moved.reconstruct_n(0, 300), decoded, rtol=2**-10, atol=1e-6)
    assert (gpu.search(vectors[:20], 10)[1] == cpu.search(vectors[:20], 10)[1]).mean() > 0.95
    for name, searcher in (("gpu", gpu), ("cpu", cpu)):
        (tmp_path / name).mkdir()
        searcher.save(tmp_path / name)
    assert (tmp_path / "gpu" / "faiss.index").read_bytes() == (tmp_path / "cpu" / "faiss.index").read_bytes()
    loaded = FaissBackend.load(tmp_path / "gpu")  # a loaded index takes the same way
    assert loaded.on_gpu and fake_gpu_faiss[-1].sq.qtype == faiss.ScalarQuantizer.QT_fp16
    flat = FaissBackend.build(vectors)  # float32 flat indexes go to the GPU as they are
    assert fake_gpu_faiss[-1] is flat.index


def test_faiss_stays_on_the_cpu_when_the_gpu_refuses_the_index(fake_gpu_faiss, monkeypatch, caplog):
    import faiss

    def refuse(resources, device, index):
        raise RuntimeError("This index type is not implemented on GPU.")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", refuse)
    searcher = FaissBackend.build(np.eye(4, dtype=np.float32))
    assert not searcher.on_gpu and searcher.search(np.eye(4, dtype=np.float32), 1)[1].ravel().tolist() == [0, 1, 2, 3]
    assert "searching on the CPU" in caplog.text


def test_decoder_vectors_are_unit_norm():
    w_dec = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    codes = random_codes()
    norms = np.linalg.norm(decoder_vectors(codes, w_dec), axis=1)
    empty = np.diff(codes.indptr) == 0
    assert empty.any() and (norms[empty] == 0).all()  # a passage with no codes stays a zero vector
    np.testing.assert_allclose(norms[~empty], 1, rtol=1e-5)


def test_rrf_rewards_agreement():
    run_a = (np.zeros((1, 3)), np.array([[1, 2, 3]]))
    run_b = (np.zeros((1, 3)), np.array([[2, 4, -1]]))
    scores, ids = reciprocal_rank_fusion([run_a, run_b], [0.5, 0.5], 4)
    assert ids[0, 0] == 2 and set(ids[0]) == {1, 2, 3, 4}
    assert scores[0, 0] == pytest.approx(0.5 / 62 + 0.5 / 61)


@pytest.mark.parametrize("mode", ["sparse", "faiss", "fused"])
def test_retriever_modes_find_self(mode):
    codes = random_codes(n=40, m=64, density=0.1, seed=3)
    w_dec = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 64)))[0].astype(np.float32)
    retriever = Retriever.over(codes, np.full(40, 10.0, dtype=np.float32), w_dec, ScoringConfig(mode=mode))
    rows = [r for r in range(40) if codes[r].nnz >= 3][:5]
    scores, ids = retriever.search(codes[rows], 3)
    assert (ids[:, 0] == rows).all()
    explained = retriever.explain(retriever.query_weights(codes[rows[:1]]), [rows[0]], 2)[0]
    assert len(explained) == 2 and explained[0][1] >= explained[1][1]


def test_explain_lists_each_passages_largest_contributions():
    codes = random_codes(n=30, m=64, density=0.2, seed=5)
    retriever = Retriever.over(
        codes, np.full(30, 10.0, dtype=np.float32), np.eye(64, dtype=np.float32), ScoringConfig()
    )
    weights = retriever.query_weights(codes[[4]])
    rows = [4, 0, 17, 4]
    explained = retriever.explain(weights, rows, 3)
    assert len(explained) == len(rows) and explained[0] == explained[3]
    for row, latents in zip(rows, explained):
        dense = weights.toarray()[0] * retriever.rows([row]).toarray()[0]
        expected = np.argsort(-dense)[: min(3, int((dense > 0).sum()))]
        assert [j for j, _ in latents] == expected.tolist()
        np.testing.assert_allclose([c for _, c in latents], dense[expected], rtol=1e-6)
    assert retriever.explain(weights, [], 3) == []


def test_pruning_keeps_the_strongest_latents_per_passage():
    from ragsae.retrieval import prune_rows

    codes = random_codes(n=12, m=40, density=0.5)
    ranking = codes.copy()
    ranking.data = np.random.default_rng(1).permutation(ranking.data)
    pruned = prune_rows(codes, ranking, 3)
    for r in range(12):
        lo, hi = codes.indptr[r], codes.indptr[r + 1]
        best = set(codes.indices[lo:hi][np.argsort(-ranking.data[lo:hi])[:3]])
        assert set(pruned[r].indices) == best
        np.testing.assert_array_equal(pruned[r].toarray()[0, list(best)], codes[r].toarray()[0, list(best)])
    retriever = Retriever.over(
        codes, np.full(12, 5.0, dtype=np.float32), np.eye(40, dtype=np.float32), ScoringConfig(max_latents=4)
    )
    assert np.diff(retriever.rows(np.arange(12)).indptr).max() == 4


@pytest.mark.parametrize("weighting", ["rank", "uniform"])
def test_feedback_queries_match_rocchio_formula(weighting):
    docs, queries = random_codes(n=25, m=30, density=0.3), random_codes(n=3, m=30, seed=2)
    top = np.array([[4, 9, 1], [0, -1, -1], [7, 7, 3]])
    norms = np.linalg.norm(docs.toarray(), axis=1)
    got = feedback_queries(queries, top, docs, norms, 0.7, 5, weighting).toarray()
    dense, q = docs.toarray(), queries.toarray()
    for i in range(3):
        rows = [r for r in top[i] if r >= 0]
        share = np.array([1 / (rank + 1) if weighting == "rank" else 1.0 for rank in range(len(rows))])
        feedback = sum(s * dense[r] / np.linalg.norm(dense[r]) for s, r in zip(share / share.sum(), rows))
        feedback[np.argsort(-feedback)[5:]] = 0  # only the 5 strongest feedback latents
        np.testing.assert_allclose(got[i], q[i] / np.linalg.norm(q[i]) + 0.7 * feedback, rtol=1e-5, atol=1e-7)


def test_feedback_finds_a_passage_that_shares_no_latent_with_the_query():
    # passage 0 matches the query's latent 0 and also carries latents 5 and 6; passage 1 has
    # only 5 and 6 (the same topic in other words); passage 2 is unrelated.
    codes = sp.csr_matrix(np.array([[2, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 2, 2, 0], [0, 0, 0, 1, 0, 0, 0, 2.0]]))
    lengths, w_dec = np.full(3, 4.0, dtype=np.float32), np.eye(8, dtype=np.float32)
    query = sp.csr_matrix(np.array([[1.0, 0, 0, 0, 0, 0, 0, 0]]))
    plain = Retriever.over(codes, lengths, w_dec, ScoringConfig(feedback_passages=0))
    scores, ids = plain.search(query, 3)
    assert ids[0, 0] == 0 and 1 not in ids[0][np.isfinite(scores[0]) & (scores[0] > 0)]
    assert (plain.query_weights(query) != query).nnz == 0  # feedback off: the pooled codes as they are
    retriever = Retriever.over(codes, lengths, w_dec, ScoringConfig(feedback_passages=1, feedback_latents=3))
    weights = retriever.query_weights(query)
    assert set(weights.indices) == {0, 5, 6}
    scores, ids = retriever.search(query, 3)
    assert ids[0].tolist() == [0, 1, 2] and scores[0, 1] > 0 and scores[0, 2] == 0
    assert {j for j, _ in retriever.explain(weights, [1], 3)[0]} == {5, 6}  # why passage 1 matched


def test_feedback_settings_are_validated():
    with pytest.raises(ValueError, match="feedback_passages"):
        ScoringConfig(feedback_passages=-1)
    with pytest.raises(ValueError, match="feedback_latents"):
        ScoringConfig(feedback_latents=0)
    with pytest.raises(ValueError, match="feedback_weighting must be one of"):
        ScoringConfig(feedback_weighting="score")
