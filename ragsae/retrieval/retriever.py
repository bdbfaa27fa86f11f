"""Scoring pooled query codes against an index's passages in one of the search modes.

Passages live in segments (one per build or add, as Lucene does): each segment's BM25 weights are
computed once, with the reference statistics of the SAE version, and never rewritten. Deleted rows
are masked, not removed. What depends on the live corpus (the latents' IDF) is applied to the query:
a latent's query weight is scaled by its live IDF over its reference IDF, which gives exactly the
scores of weights computed with the live IDF.

A serving engine (`Retriever.engine`, a Milvus collection holding every live row by its global id) may
answer searches and row reads in place of the segments; where it cannot, the segments answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from ..config import SEARCH_MODES, ScoringConfig
from ..errors import QueryError
from .backends import Backend, CsrBackend, FaissBackend
from .feedback import feedback_queries
from .fusion import reciprocal_rank_fusion
from .scoring import CorpusStatistics, bm25_document_weights, decoder_vectors, prune_for_storage, row_norms

logger = logging.getLogger(__name__)


class SearchSegment:
    """One segment's passage weights (sparse) and, built on first use unless given, its dense vectors."""

    def __init__(self, weights: sp.csr_matrix, w_dec: np.ndarray, dense: Backend | None = None):
        self.sparse = CsrBackend.of(weights)
        self._w_dec = w_dec
        self._dense = dense
        self._lock = threading.Lock()

    @property
    def dense(self) -> Backend:
        """8-bit FAISS over the decoder-space vectors of the segment's weights."""
        with self._lock:
            if self._dense is None:
                weights = self.sparse.weights
                self._dense = FaissBackend.build(decoder_vectors(weights, self._w_dec), quantized=True)
            return self._dense

    @property
    def dense_ready(self) -> bool:
        return self._dense is not None

    def __len__(self) -> int:
        return len(self.sparse)


@dataclass(frozen=True)
class SegmentsView:
    """An immutable snapshot of the searchable segments: searches read one view from start to end, while
    a writer in the same process builds the next one and swaps it in."""

    segments: tuple[SearchSegment, ...]
    deleted: tuple[np.ndarray, ...]
    """Per segment, bool (rows,): True where the passage was deleted."""
    offsets: np.ndarray
    """Global row id of each segment's first row, and the total row count last."""
    scale: np.ndarray
    """(num_latents,) float32: live IDF / reference IDF."""

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment number, row within it) of global `rows`."""
        segment = np.searchsorted(self.offsets, rows, side="right") - 1
        return segment, rows - self.offsets[segment]


class SegmentedSparse:
    """The sparse weights of every live passage, searched as one store (same calls as a `Backend`)."""

    def __init__(self, retriever: Retriever):
        self._retriever = retriever

    def search(self, queries: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
        view = self._retriever.view
        served = self._retriever.served(view, queries, k)
        if served is not None:
            return served
        return merge_segments(view, [(s.sparse, queries) for s in view.segments], k)

    def rows(self, ids: Sequence[int] | np.ndarray) -> sp.csr_matrix:
        return self._retriever.rows(ids)

    def __len__(self) -> int:
        return self._retriever.live_rows


def merge_segments(view: SegmentsView, searches: list[tuple[Backend, object]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` live rows per query over all segments as (scores, global ids), (nq, k), ties broken by
    row id; each segment is searched deep enough to find k live rows past its deleted ones."""
    all_scores, all_ids = [], []
    for (backend, queries), dead, offset in zip(searches, view.deleted, view.offsets[:-1]):
        rows = len(backend)
        if rows == 0:
            continue
        depth = min(rows, k + int(dead.sum()))
        scores, ids = backend.search(queries, depth)
        keep = ids >= 0
        keep[keep] &= ~dead[ids[keep]]
        all_scores.append(np.where(keep, scores, -np.inf))
        all_ids.append(np.where(keep, ids + offset, -1))
    if not all_scores:
        nq = _rows_of(searches[0][1]) if searches else 0
        return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
    scores, ids = np.concatenate(all_scores, axis=1), np.concatenate(all_ids, axis=1)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores.astype(np.float64)), axis=1)[:, :k]
    best, best_ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if best.shape[1] < k:
        pad = ((0, 0), (0, k - best.shape[1]))
        best, best_ids = np.pad(best, pad, constant_values=-np.inf), np.pad(best_ids, pad, constant_values=-1)
    return best.astype(np.float32), best_ids.astype(np.int64)


def _rows_of(queries: object) -> int:
    return int(queries.shape[0])  # type: ignore[attr-defined]


def live_hits(
    view: SegmentsView, scores: np.ndarray, ids: np.ndarray, k: int, sparse: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A serving engine's (scores, global ids) kept to the live rows of `view` and ranked as
    `merge_segments` ranks (ties by row id). A sparse engine returns only rows sharing a latent with the
    query: the other live rows follow with score 0, in row order, as exact scoring ranks them."""
    total = int(view.offsets[-1])
    keep = (ids >= 0) & (ids < total)
    segment, local = view.locate(np.where(keep, ids, 0))
    for s in np.unique(segment[keep]):
        where = keep & (segment == s)
        keep[where] = ~view.deleted[s][local[where]]
    best = np.full((ids.shape[0], k), -np.inf, dtype=np.float32)
    best_ids = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for q in range(ids.shape[0]):
        row_ids, row_scores = ids[q][keep[q]], scores[q][keep[q]].astype(np.float32)
        if sparse and len(row_ids) < k:
            extra = _unmatched_rows(view, row_ids, k - len(row_ids))
            row_ids = np.concatenate([row_ids, extra])
            row_scores = np.concatenate([row_scores, np.zeros(len(extra), dtype=np.float32)])
        order = np.lexsort((row_ids, -row_scores.astype(np.float64)))[:k]
        best[q, : len(order)], best_ids[q, : len(order)] = row_scores[order], row_ids[order]
    return best, best_ids


def _unmatched_rows(view: SegmentsView, found: np.ndarray, count: int) -> np.ndarray:
    """The first `count` live rows of `view`, in row order, that are not in `found`."""
    picked: list[np.ndarray] = []
    for dead, offset in zip(view.deleted, view.offsets[:-1]):
        live = np.flatnonzero(~dead) + int(offset)
        live = live[~np.isin(live, found)][:count]
        picked.append(live)
        count -= len(live)
        if count == 0:
            break
    return np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)


class Retriever:
    """Scores pooled query codes against an index's passage segments in the configured mode."""

    def __init__(self, w_dec: np.ndarray, config: ScoringConfig, reference: CorpusStatistics):
        self.config = config
        self.w_dec = w_dec
        self.reference = reference
        self.reference_idf = reference.idf()
        self.view = SegmentsView((), (), np.zeros(1, dtype=np.int64), np.ones(len(self.reference_idf), np.float32))
        self.sparse = SegmentedSparse(self)
        self.engine: Backend | None = None
        """A serving copy of every live row (`backends/milvus.py`) that answers searches and row reads
        when set; None: the segments answer. It raises LookupError where it cannot, and the segments answer."""
        self._write_lock = threading.Lock()

    @classmethod
    def over(cls, codes: sp.csr_matrix, lengths: np.ndarray, w_dec: np.ndarray, config: ScoringConfig) -> Retriever:
        """A one-segment retriever over passage codes, with their own statistics as the reference (pruned
        to `config.max_latents`): what an index built from these passages searches."""
        reference = CorpusStatistics.of(codes, lengths)
        kept, _ = prune_for_storage(codes, lengths, reference, config.k1, config.b, config.max_latents)
        retriever = cls(w_dec, config, reference)
        retriever.add_segment(retriever.new_segment(kept, lengths))
        return retriever

    # --- the passages ------------------------------------------------------------------
    def document_weights(self, codes: sp.csr_matrix, lengths: np.ndarray) -> sp.csr_matrix:
        """BM25 weights of (already pruned) passage codes under the reference statistics."""
        cfg = self.config
        return bm25_document_weights(codes, lengths, self.reference_idf, cfg.k1, cfg.b, self.reference.avg_length)

    def new_segment(self, codes: sp.csr_matrix, lengths: np.ndarray, dense: Backend | None = None) -> SearchSegment:
        """A searchable segment of passage codes (pruned, at storage precision), not yet added."""
        return SearchSegment(self.document_weights(codes, lengths), self.w_dec, dense)

    def add_segment(self, segment: SearchSegment, deleted: np.ndarray | None = None) -> None:
        """Append a segment as the next rows (`deleted` ones masked)."""
        dead = np.zeros(len(segment), dtype=bool) if deleted is None else np.asarray(deleted, dtype=bool)
        with self._write_lock:
            view = self.view
            self.view = replace(
                view,
                segments=view.segments + (segment,),
                deleted=view.deleted + (dead,),
                offsets=np.append(view.offsets, view.offsets[-1] + len(segment)),
            )

    def delete_rows(self, rows: Sequence[int] | np.ndarray) -> None:
        """Mask global `rows`: they are never returned again."""
        rows = np.asarray(rows, dtype=np.int64)
        with self._write_lock:
            view = self.view
            deleted = list(view.deleted)
            segment, local = view.locate(rows)
            for s in np.unique(segment):
                deleted[s] = deleted[s].copy()
                deleted[s][local[segment == s]] = True
            self.view = replace(view, deleted=tuple(deleted))

    def set_live_statistics(self, live: CorpusStatistics) -> None:
        """Apply the live corpus's IDF at query time (see the module's docstring)."""
        scale = (live.idf().astype(np.float64) / self.reference_idf.astype(np.float64)).astype(np.float32)
        with self._write_lock:
            self.view = replace(self.view, scale=scale)

    @property
    def rows_total(self) -> int:
        return int(self.view.offsets[-1])

    @property
    def live_rows(self) -> int:
        return self.rows_total - sum(int(d.sum()) for d in self.view.deleted)

    def served(self, view: SegmentsView, queries: object, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The serving engine's best `k` live rows of `view` for `queries` (sparse weights or dense
        vectors), or None when there is no engine or it cannot answer."""
        engine = self.engine
        if engine is None:
            return None
        try:
            scores, ids = engine.search(queries, k)
        except LookupError as error:
            logger.warning("%s; searching the index's segments", error)
            return None
        return live_hits(view, scores, ids, k, sparse=sp.issparse(queries))

    def rows(self, ids: Sequence[int] | np.ndarray, view: SegmentsView | None = None) -> sp.csr_matrix:
        """Stored BM25 weights (reference statistics) of global rows `ids`, in that order."""
        view = view or self.view
        ids = np.asarray(ids, dtype=np.int64)
        engine = self.engine
        if engine is not None and len(ids):
            try:
                return engine.rows(ids)
            except LookupError as error:
                logger.debug("%s; reading the index's segments", error)
        if len(view.segments) == 1:
            return view.segments[0].sparse.rows(ids)
        segment, local = view.locate(ids)
        parts = [view.segments[s].sparse.rows(local[i : i + 1]) for i, s in enumerate(segment)]
        if not parts:
            return sp.csr_matrix((0, len(self.reference_idf)), dtype=np.float32)
        return sp.vstack(parts, format="csr")

    def memory_bytes(self) -> int:
        """Bytes of the CSR arrays kept in memory (weights and postings)."""
        return sum(
            int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
            for s in self.view.segments
            for m in (s.sparse.weights, s.sparse.postings)
        )

    # --- queries -----------------------------------------------------------------------
    def scaled(self, query_codes: sp.csr_matrix) -> sp.csr_matrix:
        """Query codes with each latent scaled to the live IDF: what is matched against stored weights."""
        return query_codes.astype(np.float32).multiply(self.view.scale[None, :]).tocsr()

    def query_weights(self, query_codes: sp.csr_matrix) -> sp.csr_matrix:
        """Latent weights that sparse scoring uses: the pooled activations (BM25's query term
        frequency), joined by pseudo-relevance feedback latents when `feedback_passages` > 0, scaled
        to the live IDF."""
        view = self.view
        q, cfg = query_codes.astype(np.float32), self.config
        if cfg.feedback_passages == 0 or q.shape[0] == 0:
            return q.multiply(view.scale[None, :]).tocsr()
        _, top = self.sparse.search(q.multiply(view.scale[None, :]).tocsr(), cfg.feedback_passages)
        # Only the first search's passages are read, from whichever segment holds them.
        found, local = np.unique(top[top >= 0], return_inverse=True)
        top_local = np.full(top.shape, -1, dtype=np.int64)
        top_local[top >= 0] = local
        rows = self.rows(found, view).multiply(view.scale[None, :]).tocsr()  # live BM25 weights
        combined = feedback_queries(
            q, top_local, rows, row_norms(rows), cfg.feedback_weight, cfg.feedback_latents, cfg.feedback_weighting
        )
        return combined.multiply(view.scale[None, :]).tocsr()

    def search(
        self,
        query_codes: sp.csr_matrix,
        k: int,
        mode: str | None = None,
        weights: sp.csr_matrix | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of shape (nq, k) for pooled query codes; ids are global passage rows, -1 padded.

        `weights` are the query's sparse weights if already computed (`query_weights`).
        """
        mode = mode or self.config.mode
        if mode not in SEARCH_MODES:
            raise QueryError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        if mode != "faiss" and weights is None:
            weights = self.query_weights(query_codes)
        if mode == "sparse":
            return self.sparse.search(weights, k)
        # Queries are mapped to decoder space with the reference IDF, as documents are (no feedback).
        q = query_codes.astype(np.float32)
        dense_q = decoder_vectors(q.multiply(self.reference_idf[None, :]).tocsr(), self.w_dec)
        view = self.view
        depth = k if mode == "faiss" else max(k, 100)
        dense = self.served(view, dense_q, depth)
        if dense is None:
            dense = merge_segments(view, [(s.dense, dense_q) for s in view.segments], depth)
        if mode == "faiss":
            return dense
        runs = [self.sparse.search(weights, max(k, 100)), dense]
        weight = self.config.fusion_weight
        return reciprocal_rank_fusion(runs, [weight, 1 - weight], k)

    def support(self, weights: sp.csr_matrix, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(nq,) how well passage `rows[i]` matches query row i of `weights` (nq, m; from `scaled`): the
        cosine between the query's latent weights times their IDF and the passage's BM25 latent
        weights (which carry IDF already); 0 where `rows[i]` is -1 or nothing is shared.

        A passage on the question's subject shares its specific latents; the best passage for a
        question the index cannot answer shares few of them. Without IDF on the query side, the
        latents that fire on most passages (and on any long question) would dominate the cosine and
        make it depend on question length more than on subject. `RAG` abstains below a threshold on
        it (`benchmarks/abstain.py`)."""
        view = self.view
        rows = np.asarray(rows, dtype=np.int64)
        found = rows >= 0
        # `weights` carry live IDF / reference IDF; times the reference IDF gives query tf * live IDF.
        q = weights.tocsr().astype(np.float64).multiply(self.reference_idf.astype(np.float64)[None, :]).tocsr()
        d = self.rows(np.where(found, rows, 0), view).astype(np.float64).multiply(view.scale[None, :]).tocsr()
        dot = np.asarray(q.multiply(d).sum(axis=1)).ravel()
        norms = row_norms(q) * row_norms(d)
        return np.where(found & (norms > 0), dot / np.maximum(norms, 1e-300), 0.0)

    def explain(self, weights: sp.csr_matrix, rows: Sequence[int], top: int) -> list[list[tuple[int, float]]]:
        """For each passage in `rows`, the latents of one query's sparse weights (1, m; from
        `query_weights`) that contribute most to its sparse score, as (latent, contribution)."""
        contrib = self.rows(rows).multiply(weights).tocsr()
        explained = []
        for i in range(len(rows)):
            lo, hi = contrib.indptr[i], contrib.indptr[i + 1]
            data, latents = contrib.data[lo:hi], contrib.indices[lo:hi]
            order = np.argsort(-data)[:top]
            explained.append([(int(latents[j]), float(data[j])) for j in order])
        return explained
