"""Pseudo-relevance feedback over latents (Rocchio, 1971): a query joined by its best passages' latents."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..config import FEEDBACK_WEIGHTINGS
from .scoring import row_norms


def feedback_queries(
    query_weights: sp.csr_matrix,
    top_ids: np.ndarray,
    doc_weights: sp.csr_matrix,
    doc_norms: np.ndarray,
    weight: float,
    latents: int,
    weighting: str = "rank",
) -> sp.csr_matrix:
    """Rocchio pseudo-relevance feedback over latents: unit query + weight * feedback, per query row.

    The feedback of a query is a weighted mean of the unit-normalised weight rows of its
    first-search passages `top_ids` (nq, m, best first; -1 entries ignored), cut to its `latents`
    strongest entries. `weighting` 'rank' weighs the passage at rank r by 1/r, 'uniform' equally.
    """
    if weighting not in FEEDBACK_WEIGHTINGS:
        raise ValueError(f"feedback weighting must be one of {FEEDBACK_WEIGHTINGS}, got {weighting!r}")
    q = query_weights.tocsr()
    num_latents = q.shape[1]
    query_norms = np.maximum(row_norms(q), 1e-12)
    indptr, indices, values = [0], [], []
    for i in range(q.shape[0]):
        # One dense latent vector per query: a handful of passage rows added into it is cheaper than
        # sparse matrix products at the one-query-at-a-time sizes searches run at.
        dense = np.zeros(num_latents, dtype=np.float64)
        passages = top_ids[i][top_ids[i] >= 0]
        if len(passages):
            share = 1.0 / np.arange(1, len(passages) + 1) if weighting == "rank" else np.ones(len(passages))
            share = weight * share / (share.sum() * np.maximum(doc_norms[passages], 1e-12))
            for passage, part in zip(passages, share):
                lo, hi = doc_weights.indptr[passage], doc_weights.indptr[passage + 1]
                dense[doc_weights.indices[lo:hi]] += part * doc_weights.data[lo:hi]
            found = np.flatnonzero(dense)
            if len(found) > latents:  # keep the strongest; ties go to the lower latent id
                dense[found[np.argsort(-dense[found], kind="stable")[latents:]]] = 0
        lo, hi = q.indptr[i], q.indptr[i + 1]
        dense[q.indices[lo:hi]] += q.data[lo:hi] / query_norms[i]
        found = np.flatnonzero(dense)
        indices.append(found)
        values.append(dense[found])
        indptr.append(indptr[-1] + len(found))
    data = np.concatenate(values).astype(np.float32) if values else np.zeros(0, dtype=np.float32)
    columns = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((data, columns, np.array(indptr)), shape=q.shape)
