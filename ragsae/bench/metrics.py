"""Retrieval metrics (ir-measures, trec_eval definitions) and latency percentiles."""

from __future__ import annotations

from typing import Any

import numpy as np

MEASURES = ("nDCG@10", "R@100", "RR@10")


def evaluate(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    """ir-measures aggregate and per-query values of MEASURES (trec_eval definitions)."""
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    # Queries with no retrieved document still count (as zeros), as trec_eval -c would.
    run = {qid: run.get(qid) or {"__none__": 0.0} for qid in qrels}
    aggregate = ir_measures.calc_aggregate(measures, qrels, run)
    per_query: dict[str, dict[str, float]] = {}
    for metric in ir_measures.iter_calc(measures, qrels, run):
        per_query.setdefault(str(metric.measure), {})[metric.query_id] = float(metric.value)
    return {"aggregate": {str(m): float(v) for m, v in aggregate.items()}, "per_query": per_query}


def to_document_run(
    scores: np.ndarray, ids: np.ndarray, qids: list[str], doc_ids: list[str]
) -> dict[str, dict[str, float]]:
    """Passage hits (nq, depth) to a document run: a document scores its best passage."""
    run: dict[str, dict[str, float]] = {}
    for row, qid in enumerate(qids):
        docs: dict[str, float] = {}
        for score, pid in zip(scores[row], ids[row]):
            if pid >= 0 and np.isfinite(score):
                docs.setdefault(doc_ids[pid], float(score))
        run[qid] = docs
    return run


def percentiles(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(seconds, 50) * 1e3), "p95_ms": float(np.percentile(seconds, 95) * 1e3)}
