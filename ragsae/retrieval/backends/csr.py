"""Exact sparse scoring in memory: scipy CSR passage weights and their latent-major inverted index.

The reference backend: every other backend is checked against its results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..scoring import inverted_index, sparse_search
from .base import Backend


class CsrBackend(Backend):
    """Passage weights (n, num_latents) and postings (num_latents, n), both built when rows are added,
    so that searches only read shared state (safe from several threads)."""

    def __init__(self, num_latents: int):
        self.weights = sp.csr_matrix((0, num_latents), dtype=np.float32)
        self.postings = inverted_index(self.weights)

    @classmethod
    def of(cls, weights: sp.csr_matrix) -> CsrBackend:
        """A backend holding `weights` as its rows."""
        backend = cls(weights.shape[1])
        backend.add(weights)
        return backend

    def add(self, vectors: sp.csr_matrix) -> None:
        weights = vectors.tocsr().astype(np.float32, copy=False)
        self.weights = weights if len(self) == 0 else sp.vstack([self.weights, weights], format="csr")
        self.postings = inverted_index(self.weights)

    def search(self, queries: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products; only the posting lists of the queries' latents are read."""
        return sparse_search(queries, self.postings, k)

    def rows(self, ids: Sequence[int] | np.ndarray) -> sp.csr_matrix:
        return self.weights[np.asarray(ids, dtype=np.int64)]

    def __len__(self) -> int:
        return int(self.weights.shape[0])
