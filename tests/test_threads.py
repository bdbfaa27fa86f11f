"""One `Index` searched from several threads at once gives what serial searches give."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from conftest import TOY_DOCS

from ragsae.index import Index

QUERIES = [
    "comma separated value files",
    "regular expressions",
    "network sockets TCP",
    "square roots and logarithms",
    "ZIP archives",
    "operating system processes",
    "clock and timestamps",
    "JavaScript Object Notation",
]
MODES = ("sparse", "faiss", "fused")


def results(index: Index, query: str, mode: str) -> list[tuple[str, float, list[tuple[int, float]]]]:
    return [(h.passage_id, h.score, h.latents) for h in index.search(query, k=5, mode=mode)]


def test_eight_threads_search_one_index_as_serial_searches_do(tiny_build_config, tiny_llm, tmp_path):
    Index.build(TOY_DOCS, tmp_path / "idx", tiny_build_config, llm=tiny_llm)
    # A fresh load (and a fresh in-memory build): lazily made state (the dense backend, the trunk) is
    # first built under concurrent queries.
    concurrent_index = Index.load(tmp_path / "idx", llm=tiny_llm)
    unsaved = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    jobs = [(q, m) for q in QUERIES for m in MODES] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded_runs = list(pool.map(lambda job: results(concurrent_index, *job), jobs))
        unsaved_runs = list(pool.map(lambda job: results(unsaved, *job), jobs))
    serial_index = Index.load(tmp_path / "idx", llm=tiny_llm)
    for job, loaded, fresh in zip(jobs, loaded_runs, unsaved_runs):
        expected = results(serial_index, *job)
        assert loaded == expected, job
        assert [pid for pid, _, _ in fresh] == [pid for pid, _, _ in expected], job
