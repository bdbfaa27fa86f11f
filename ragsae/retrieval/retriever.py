"""Scoring pooled query codes against an index's passages in one of the search modes."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..config import SEARCH_MODES, ScoringConfig
from ..errors import QueryError
from .backends import Backend, CsrBackend, FaissBackend
from .feedback import feedback_queries
from .fusion import reciprocal_rank_fusion
from .scoring import bm25_document_weights, decoder_vectors, latent_idf, row_norms, strongest_entries, take_entries


class Retriever:
    """Scores pooled query codes against an index's passage codes in the configured mode."""

    def __init__(
        self,
        codes: sp.csr_matrix,
        lengths: np.ndarray,
        w_dec: np.ndarray,
        config: ScoringConfig,
        dense: Backend | None = None,
        idf: np.ndarray | None = None,
    ):
        self.config = config
        self.avg_length = float(lengths.mean())
        # IDF comes from the unpruned codes (given back by a saved index): pruning must not make a
        # latent look rarer than it is.
        self.idf = latent_idf(codes) if idf is None else idf
        weights = bm25_document_weights(codes, lengths, self.idf, config.k1, config.b, self.avg_length)
        if config.max_latents is not None and np.diff(codes.indptr).max(initial=0) > config.max_latents:
            # A BM25 weight depends only on its own entry and the passage length: pruning the weights
            # as the codes are pruned gives what recomputing them on the pruned codes would.
            kept = strongest_entries(weights, config.max_latents)
            codes, weights = take_entries(codes, *kept), take_entries(weights, *kept)
        self.codes = codes
        self.sparse = CsrBackend.of(weights)
        self.w_dec = w_dec
        self._dense = dense
        self._dense_lock = threading.Lock()

    @property
    def dense(self) -> Backend:
        """The dense backend (8-bit FAISS over decoder-space vectors), built on first use unless given."""
        with self._dense_lock:
            if self._dense is None:
                weights = self.sparse.rows(np.arange(len(self.sparse)))
                self._dense = FaissBackend.build(decoder_vectors(weights, self.w_dec), quantized=True)
            return self._dense

    def query_weights(self, query_codes: sp.csr_matrix) -> sp.csr_matrix:
        """Latent weights that sparse scoring uses: the pooled activations (BM25's query term
        frequency), joined by pseudo-relevance feedback latents when `feedback_passages` > 0."""
        q, cfg = query_codes.astype(np.float32), self.config
        if cfg.feedback_passages == 0 or q.shape[0] == 0:
            return q
        _, top = self.sparse.search(q, cfg.feedback_passages)
        # Only the first search's passages are read, from whichever backend holds them.
        found, local = np.unique(top[top >= 0], return_inverse=True)
        top_local = np.full(top.shape, -1, dtype=np.int64)
        top_local[top >= 0] = local
        rows = self.sparse.rows(found)
        return feedback_queries(
            q, top_local, rows, row_norms(rows), cfg.feedback_weight, cfg.feedback_latents, cfg.feedback_weighting
        )

    def search(
        self,
        query_codes: sp.csr_matrix,
        k: int,
        mode: str | None = None,
        weights: sp.csr_matrix | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of shape (nq, k) for pooled query codes; ids are passage rows, -1 padded.

        `weights` are the query's sparse weights if already computed (`query_weights`).
        """
        mode = mode or self.config.mode
        if mode not in SEARCH_MODES:
            raise QueryError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if mode != "faiss" and weights is None:
            weights = self.query_weights(query_codes)
        if mode == "sparse":
            return self.sparse.search(weights, k)
        # Queries are mapped to decoder space with idf weighting, as documents are (no feedback).
        q = query_codes.astype(np.float32)
        dense_q = decoder_vectors(q.multiply(self.idf[None, :]).tocsr(), self.w_dec)
        if mode == "faiss":
            return self.dense.search(dense_q, k)
        depth = max(k, 100)
        runs = [self.sparse.search(weights, depth), self.dense.search(dense_q, depth)]
        weight = self.config.fusion_weight
        return reciprocal_rank_fusion(runs, [weight, 1 - weight], k)

    def support(self, weights: sp.csr_matrix, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(nq,) how well passage `rows[i]` matches query row i of `weights` (nq, m): the cosine between
        the query's latent weights times their IDF and the passage's BM25 latent weights (which carry
        IDF already); 0 where `rows[i]` is -1 or nothing is shared.

        A passage on the question's subject shares its specific latents; the best passage for a
        question the index cannot answer shares few of them. Without IDF on the query side, the
        latents that fire on most passages (and on any long question) would dominate the cosine and
        make it depend on question length more than on subject. `RAG` abstains below a threshold on
        it (`benchmarks/abstain.py`)."""
        rows = np.asarray(rows, dtype=np.int64)
        found = rows >= 0
        q = weights.tocsr().astype(np.float64).multiply(self.idf.astype(np.float64)[None, :]).tocsr()
        d = self.sparse.rows(np.where(found, rows, 0)).astype(np.float64)
        dot = np.asarray(q.multiply(d).sum(axis=1)).ravel()
        norms = row_norms(q) * row_norms(d)
        return np.where(found & (norms > 0), dot / np.maximum(norms, 1e-300), 0.0)

    def explain(self, weights: sp.csr_matrix, rows: Sequence[int], top: int) -> list[list[tuple[int, float]]]:
        """For each passage in `rows`, the latents of one query's sparse weights (1, m; from
        `query_weights`) that contribute most to its sparse score, as (latent, contribution)."""
        contrib = self.sparse.rows(rows).multiply(weights).tocsr()
        explained = []
        for i in range(len(rows)):
            lo, hi = contrib.indptr[i], contrib.indptr[i + 1]
            data, latents = contrib.data[lo:hi], contrib.indices[lo:hi]
            order = np.argsort(-data)[:top]
            explained.append([(int(latents[j]), float(data[j])) for j in order])
        return explained
