"""Scoring and timing a search method the same way for every method."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import evaluate, percentiles, to_document_run

LATENCY_REPEATS = 3
"""Timings of each query per method in `time_methods`; the fastest counts."""

Search = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
"""Query texts -> (scores, ids) of shape (n_queries, depth) over a method's document rows."""


@dataclass
class MethodRun:
    """One result row and the search it measured, kept until every method has been timed."""

    row: dict[str, Any]
    search: Search


def score(search: Search, queries: dict[str, str], qrels: dict[str, dict[str, int]], doc_ids: list[str]) -> dict:
    """Metrics of `search` over all queries, run as one batch."""
    qids = list(queries)
    scores, ids = search([queries[q] for q in qids])
    return evaluate(to_document_run(scores, ids, qids, doc_ids), qrels)


def time_methods(runs: list[MethodRun], texts: list[str], latency_queries: int) -> None:
    """Fill each run's row["latency"]: single-query p50/p95 (end to end, encoding included) over the
    first `latency_queries` texts, and batch throughput over all of them.

    Methods are timed interleaved, query by query, so that they share whatever else the machine is
    doing; each query runs `LATENCY_REPEATS` times back to back per method and counts at its fastest.
    """
    seconds: list[list[float]] = [[] for _ in runs]
    for text in texts[:latency_queries]:
        for run, out in zip(runs, seconds):
            fastest = float("inf")
            for _ in range(LATENCY_REPEATS):
                start = time.perf_counter()
                run.search([text])
                fastest = min(fastest, time.perf_counter() - start)
            out.append(fastest)
    for run, out in zip(runs, seconds):
        start = time.perf_counter()
        run.search(texts)
        batch = len(texts) / (time.perf_counter() - start)
        run.row["latency"] = {**percentiles(out), "batch_queries_per_s": batch}
