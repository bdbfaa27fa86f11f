"""The Milvus backend on a real Milvus Lite (no mocks): the same hits and scores as the index's segments in
every mode, with feedback, per document and in explanations; kept in step by add, delete, upsert and
compact, and seen the same after a reload; filled again by `Index.load` when out of step;
`ragsae build --backend milvus`."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import msmarco_slice, tiny_config

pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus: pip install 'ragsae[milvus]'")
pytest.importorskip("milvus_lite", reason="these tests run Milvus Lite: pip install 'ragsae[milvus]'")

from ragsae import ConfigError, Index  # noqa: E402
from ragsae.bench.beir import load_beir  # noqa: E402
from ragsae.cli import main  # noqa: E402
from ragsae.layout import MANIFEST_FILE, MILVUS_LITE_FILE  # noqa: E402
from ragsae.retrieval.backends.milvus import (  # noqa: E402
    MilvusUnavailable,
    check_record,
    next_collection,
    recorded_uri,
    uri_token,
)

FALLBACK_MESSAGES = ("searching the index's segments", "reading the index's segments")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return load_beir(msmarco_slice(tmp_path_factory.mktemp("milvus") / "slice", 8, 40, 30))


@pytest.fixture(scope="module")
def reference_sae(collection, tiny_llm, tiny_llm_dir):
    documents, _, _ = collection
    return Index.build(documents, config=tiny_config(tiny_llm_dir), llm=tiny_llm, describe_latents=False).sae


@pytest.fixture(scope="module")
def served(collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path_factory):
    documents, _, _ = collection
    path = tmp_path_factory.mktemp("served") / "index"
    return Index.build(documents, path, tiny_config(tiny_llm_dir), reference_sae, tiny_llm, backend="milvus")


@contextlib.contextmanager
def from_segments(index: Index):
    """The index searched from its segments alone (its Milvus collection detached meanwhile)."""
    engine, index.retriever.engine = index.retriever.engine, None
    try:
        yield
    finally:
        index.retriever.engine = engine


def live_rows(index: Index) -> list[int]:
    return sorted(r for rows in index.doc_rows.values() for r in rows)


def assert_same_hits(got: dict, expected: dict) -> None:
    """Scores equal to float32 rounding; passage ids equal, up to order within runs of tied scores."""
    assert got.keys() == expected.keys()
    for qid in expected:
        a, b = got[qid], expected[qid]
        assert len(a) == len(b), qid
        assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-5, abs=1e-5), qid
        start = 0
        for end in range(1, len(b) + 1):  # runs of scores within rounding of their neighbour
            if end == len(b) or abs(b[end].score - b[end - 1].score) > 1e-5 * max(1.0, abs(b[end].score)):
                assert {h.passage_id for h in a[start:end]} == {h.passage_id for h in b[start:end]}, qid
                start = end
        for x, y in zip(a, b):
            if x.passage_id == y.passage_id:
                assert [j for j, _ in x.latents] == [j for j, _ in y.latents]
                assert [c for _, c in x.latents] == pytest.approx([c for _, c in y.latents], rel=1e-5, abs=1e-6)


def assert_served_like_segments(index: Index, queries: dict, modes=("sparse", "faiss", "fused")) -> None:
    n = len(index)
    for mode in modes:
        for k in (10, n + 5):  # deeper than the index: every live passage, unmatched ones at score 0
            got = index.batch_search(queries, k=k, mode=mode)
            with from_segments(index):
                expected = index.batch_search(queries, k=k, mode=mode)
            assert_same_hits(got, expected)
            assert all(len(hits) == min(k, n) for hits in got.values()), mode


def assert_rare_latent_searches_alike(index: Index) -> None:
    """A query of one rare latent (and an empty one): Milvus returns only the passages holding it, the
    other live passages follow at score 0 in row order, exactly as the segments rank them."""
    rows = live_rows(index)
    with from_segments(index):
        stored = index.retriever.rows(rows)
    counts = np.bincount(stored.indices, minlength=stored.shape[1])
    rare = int(np.flatnonzero(counts)[np.argmin(counts[counts > 0])])
    queries = sp.csr_matrix(([1.0], ([0], [rare])), shape=(2, stored.shape[1]), dtype=np.float32)
    _, raw = index.engine.search(queries, len(index))
    assert 0 < (raw[0] >= 0).sum() < len(index) and (raw[1] < 0).all()
    got = index.retriever.sparse.search(queries, len(index))
    with from_segments(index):
        expected = index.retriever.sparse.search(queries, len(index))
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)


@pytest.mark.parametrize("feedback", [10, 0])
def test_milvus_answers_as_the_segments_do_in_every_mode(served, collection, feedback, caplog):
    _, queries, _ = collection
    assert served.engine is not None and served.retriever.engine is served.engine
    scoring = served.retriever.config
    served.retriever.config = replace(scoring, feedback_passages=feedback)
    try:
        with caplog.at_level(logging.DEBUG, logger="ragsae.retrieval.retriever"):
            assert_served_like_segments(served, queries)
            got = served.batch_search(queries, k=5, per_doc=True)
            with from_segments(served):
                expected = served.batch_search(queries, k=5, per_doc=True)
            assert_same_hits(got, expected)
    finally:
        served.retriever.config = scoring
    assert not [r for r in caplog.records if any(m in r.getMessage() for m in FALLBACK_MESSAGES)]
    assert_rare_latent_searches_alike(served)


def test_pruned_sparse_queries_return_exact_scores_of_the_best_candidates(served):
    """The opt-in approximation (`query_latents`): the hits come back scored by the whole query; with every
    passage a candidate they are the segments' hits, with fewer the top 10 still overlap them."""
    engine = served.engine
    rows = live_rows(served)
    with from_segments(served):
        stored = served.retriever.rows(rows)
        queries = served.retriever.query_weights(stored[:6])  # feedback queries: many latents each
        expected = served.retriever.sparse.search(queries, 10)
    assert np.diff(queries.indptr).min() > 4
    exact = np.zeros((queries.shape[0], max(rows) + 1), dtype=np.float64)
    exact[:, rows] = (queries.astype(np.float64) @ stored.astype(np.float64).T).toarray()
    settings = engine.query_latents, engine.candidates
    try:
        engine.query_latents, engine.candidates = 4, len(rows)
        scores, ids = engine.search(queries, 10)
        np.testing.assert_array_equal(ids, expected[1])
        np.testing.assert_allclose(scores, expected[0], rtol=1e-5)
        engine.query_latents, engine.candidates = 16, 30
        scores, ids = engine.search(queries, 10)
        assert (ids >= 0).all()
        np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), rtol=1e-5)
        assert (np.diff(scores, axis=1) <= 0).all()
        overlap = [len(set(a) & set(b)) for a, b in zip(ids.tolist(), expected[1].tolist())]
        assert np.mean(overlap) >= 9, overlap  # 16 of ~110 latents, 30 candidates of 236 passages
    finally:
        engine.query_latents, engine.candidates = settings
    assert engine.search(queries, 10)[1].tolist() == expected[1].tolist()  # off again: exact


def test_rows_and_explanations_read_from_milvus_are_the_stored_ones(served, collection, caplog):
    _, queries, _ = collection
    rows = live_rows(served)
    with from_segments(served):
        stored = served.retriever.rows(rows)
    np.testing.assert_array_equal(served.engine.rows(rows).toarray(), stored.toarray())
    np.testing.assert_array_equal(served.engine.rows(rows[::-1][:7]).toarray(), stored[::-1][:7].toarray())
    query = next(iter(queries.values()))
    with caplog.at_level(logging.DEBUG, logger="ragsae.retrieval.retriever"):
        explained = served.explain(query)
    with from_segments(served):
        expected = served.explain(query)
    assert not [r for r in caplog.records if any(m in r.getMessage() for m in FALLBACK_MESSAGES)]
    assert explained.passage_id == expected.passage_id
    assert explained.score == pytest.approx(expected.score, rel=1e-5)
    assert [s.latent for s in explained.latents] == [s.latent for s in expected.latents]
    assert [s.passage_weight for s in explained.latents] == [s.passage_weight for s in expected.latents]


def test_changes_keep_the_collection_in_step_and_a_reload_sees_the_same(
    collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path
):
    documents, queries, _ = collection
    path = tmp_path / "index"
    config = tiny_config(tiny_llm_dir)
    first, later = documents[:-10], documents[-10:]
    index = Index.build(first, path, config, reference_sae, tiny_llm, describe_latents=False, backend="milvus")
    record = json.loads((path / MANIFEST_FILE).read_text())["serving"]
    assert record["backend"] == "milvus" and record["uri"] == MILVUS_LITE_FILE
    assert record["collection"] == index.engine.collection and record["collection"].endswith("_1")
    assert (path / MILVUS_LITE_FILE).is_dir()

    def in_step(ix: Index) -> None:
        assert ix.engine is not None and ix.retriever.engine is ix.engine
        assert len(ix.engine) == len(ix)
        rows = live_rows(ix)
        with from_segments(ix):
            stored = ix.retriever.rows(rows)
        np.testing.assert_array_equal(ix.engine.rows(rows).toarray(), stored.toarray())
        assert_served_like_segments(ix, queries, modes=("sparse", "fused"))
        assert_rare_latent_searches_alike(ix)

    index.add(later)
    in_step(index)
    victims = [first[0].doc_id, later[1].doc_id]
    dead = index._rows_of(victims)
    assert index.delete(victims) == len(dead)
    in_step(index)
    with pytest.raises(MilvusUnavailable):
        index.engine.rows(dead)
    replaced = first[1].doc_id
    index.upsert([{"_id": replaced, "text": "zebra crossing lollipop marmalade zebra crossing"}])
    in_step(index)
    assert [h.text for h in index.search("zebra lollipop", k=10_000) if h.doc_id == replaced] == [
        "zebra crossing lollipop marmalade zebra crossing"
    ]
    before = index.engine.collection
    index.compact()
    in_step(index)
    assert index.engine.collection == next_collection(before)
    assert not index.engine.client.has_collection(before)  # the old numbering is gone
    assert json.loads((path / MANIFEST_FILE).read_text())["serving"]["collection"] == index.engine.collection

    reloaded = Index.load(path, llm=tiny_llm)
    in_step(reloaded)
    assert reloaded.engine.collection == index.engine.collection
    for ix in (index, reloaded):
        found = {h.doc_id for hits in ix.batch_search(queries, k=10_000).values() for h in hits}
        assert not found & set(victims)
    assert_same_hits(reloaded.batch_search(queries, k=20), index.batch_search(queries, k=20))


def test_load_fills_again_a_collection_out_of_step(collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path, caplog):
    documents, queries, _ = collection
    path = tmp_path / "index"
    config = tiny_config(tiny_llm_dir)
    index = Index.build(documents[:20], path, config, reference_sae, tiny_llm, describe_latents=False, backend="milvus")
    index.engine.delete(index.doc_rows[documents[0].doc_id])  # behind the index's back
    with caplog.at_level(logging.WARNING):
        reloaded = Index.load(path, llm=tiny_llm)
    assert "not in step" in caplog.text
    assert len(reloaded.engine) == len(reloaded) == len(index)
    index.engine.drop()
    reloaded = Index.load(path, llm=tiny_llm)
    assert len(reloaded.engine) == len(reloaded)
    assert_served_like_segments(reloaded, queries, modes=("sparse",))


def test_a_failing_collection_leaves_searches_to_the_segments(served, collection, caplog):
    _, queries, _ = collection
    with from_segments(served):
        expected = served.batch_search(queries, k=10)
    engine = served.retriever.engine
    broken = type(engine)(engine.client, engine.uri, "ragsae_no_such_collection_1", engine.num_latents, engine.d_model)
    served.retriever.engine = broken
    try:
        with caplog.at_level(logging.WARNING, logger="ragsae.retrieval.retriever"):
            got = served.batch_search(queries, k=10)
    finally:
        served.retriever.engine = engine
    assert "searching the index's segments" in caplog.text
    assert {q: [h.passage_id for h in hits] for q, hits in got.items()} == {
        q: [h.passage_id for h in hits] for q, hits in expected.items()
    }


def test_cli_builds_a_milvus_served_index(tiny_llm_dir, tmp_path, capsys):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha beta gamma")
    (corpus / "b.txt").write_text("delta epsilon zeta")
    (corpus / "long.txt").write_text(" ".join(f"token{i}" for i in range(2000)))
    tiny = ["--model", str(tiny_llm_dir), "--layer", "1", "--num-latents", "64", "--sae-k", "4", "--epochs", "1"]
    out, elsewhere = tmp_path / "idx", tmp_path / "stores" / "shared.db"
    assert main(["build", str(corpus), "-o", str(out), "--backend", "milvus", *tiny]) == 0
    assert json.loads(capsys.readouterr().out)["serving"]["uri"] == MILVUS_LITE_FILE
    assert main(["verify", str(out)]) == 0  # the Lite store, which changes in place, is not a checked file
    capsys.readouterr()
    assert main(["search", str(out), "alpha beta", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    index = Index.load(out)
    assert index.engine is not None
    with from_segments(index):
        expected = index.search("alpha beta", k=3)
    assert [h["passage_id"] for h in hits] == [h.passage_id for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in expected], rel=1e-5, abs=1e-6)
    assert (
        main(
            ["build", str(corpus), "-o", str(tmp_path / "idx2"), "--backend", "milvus", "--uri", str(elsewhere)] + tiny
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["serving"]["uri"] == str(elsewhere.resolve())
    assert elsewhere.is_dir() and not (tmp_path / "idx2" / MILVUS_LITE_FILE).exists()
    assert main(["build", str(corpus), "-o", str(tmp_path / "idx3"), "--uri", str(elsewhere), *tiny]) == 2
    assert "uri is for backend='milvus'" in capsys.readouterr().err


def test_the_manifest_records_where_milvus_is_without_credentials(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    assert recorded_uri(None, folder) == MILVUS_LITE_FILE
    assert recorded_uri(str(folder / MILVUS_LITE_FILE), folder) == MILVUS_LITE_FILE
    monkeypatch.chdir(tmp_path)
    assert recorded_uri("stores/x.db", folder) == str(tmp_path.resolve() / "stores" / "x.db")
    assert recorded_uri("http://root:secret@milvus.example:19530", folder) == "http://milvus.example:19530"
    assert uri_token("http://root:secret@milvus.example:19530") == "root:secret"
    monkeypatch.setenv("RAGSAE_MILVUS_TOKEN", "root:other")
    assert uri_token("http://milvus.example:19530") == "root:other"
    with pytest.raises(ConfigError, match="needs a Milvus uri"):
        recorded_uri(None, None)
    with pytest.raises(ConfigError, match="expected a file ending in .db"):
        recorded_uri("ftp://milvus.example", folder)
    assert next_collection("ragsae_index_0a1b2c3d_1") == "ragsae_index_0a1b2c3d_2"
    assert check_record({"backend": "milvus", "uri": "milvus.db", "collection": "ragsae_x_1"}) is None
    assert check_record({"backend": "milvus", "uri": "milvus.db", "collection": "bad name"}) is not None


def test_a_milvus_lite_store_open_in_another_process_is_a_clear_error(served):
    """Milvus Lite is opened by one process at a time: a second one gets an error that says so."""
    uri = served.engine.uri  # held by this process's Lite server
    script = (
        "import sys\n"
        "from ragsae import IndexFolderError\n"
        "from ragsae.retrieval.backends.milvus import MilvusBackend\n"
        "try:\n"
        f"    MilvusBackend.connect({uri!r}, 'ragsae_x_1', 8, 4)\n"
        "except IndexFolderError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert uri in done.stdout and "one process at a time" in done.stdout
