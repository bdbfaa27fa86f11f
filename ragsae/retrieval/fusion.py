"""Combining ranked runs."""

from __future__ import annotations

import numpy as np


def reciprocal_rank_fusion(
    runs: list[tuple[np.ndarray, np.ndarray]], weights: list[float], k: int, constant: float = 60.0
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted RRF (Cormack et al. 2009) of several (scores, ids) runs; returns the fused best k."""
    nq = runs[0][1].shape[0]
    fused_scores = np.full((nq, k), -np.inf, dtype=np.float64)
    fused_ids = np.full((nq, k), -1, dtype=np.int64)
    for q in range(nq):
        total: dict[int, float] = {}
        for (_, ids), weight in zip(runs, weights):
            for rank, doc in enumerate(ids[q]):
                if doc >= 0:
                    total[int(doc)] = total.get(int(doc), 0.0) + weight / (constant + rank + 1)
        best = sorted(total.items(), key=lambda item: (-item[1], item[0]))[:k]
        for j, (doc, score) in enumerate(best):
            fused_ids[q, j], fused_scores[q, j] = doc, score
    return fused_scores, fused_ids
