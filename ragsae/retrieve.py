"""Scoring pooled codes: exact BM25-style sparse scoring, FAISS over decoder-space vectors, fusion."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from .config import FEEDBACK_WEIGHTINGS, SEARCH_MODES, ScoringConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One retrieved passage."""

    passage_id: str
    doc_id: str
    score: float
    rank: int
    text: str = ""
    latents: list[tuple[int, float]] = field(default_factory=list)
    """(latent, contribution) pairs that added most to the score, strongest first."""


def latent_idf(codes: sp.csr_matrix) -> np.ndarray:
    """BM25 IDF per latent from the number of passages on which it fires (Robertson-Sparck Jones, +1)."""
    n = codes.shape[0]
    df = np.bincount(codes.indices, minlength=codes.shape[1]).astype(np.float64)
    return np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)


def bm25_document_weights(
    codes: sp.csr_matrix, lengths: np.ndarray, idf: np.ndarray, k1: float, b: float, avg_length: float
) -> sp.csr_matrix:
    """Per-passage latent weights idf * tf (k1 + 1) / (tf + k1 (1 - b + b len / avglen)), with tf = pooled code."""
    weights = codes.copy().astype(np.float32)
    row_norm = k1 * (1 - b + b * lengths / avg_length)
    per_entry = np.repeat(row_norm, np.diff(weights.indptr))
    tf = weights.data
    weights.data = idf[weights.indices] * tf * (k1 + 1) / (tf + per_entry)
    return weights


def strongest_entries(ranking: sp.csr_matrix, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions into `ranking.data`, new indptr) of the `keep` highest entries of each row, in order."""
    rows = []
    for r in range(ranking.shape[0]):
        lo, hi = ranking.indptr[r], ranking.indptr[r + 1]
        rows.append(np.sort(np.argsort(-ranking.data[lo:hi], kind="stable")[:keep]) + lo)
    picked = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return picked, np.concatenate([[0], np.cumsum([len(r) for r in rows])])


def take_entries(matrix: sp.csr_matrix, picked: np.ndarray, indptr: np.ndarray) -> sp.csr_matrix:
    """The entries `strongest_entries` chose, from a matrix with the ranking's sparsity pattern."""
    return sp.csr_matrix((matrix.data[picked], matrix.indices[picked], indptr), shape=matrix.shape)


def prune_rows(codes: sp.csr_matrix, ranking: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """`codes` with only the `keep` entries per row that rank highest in `ranking` (same sparsity pattern)."""
    return take_entries(codes, *strongest_entries(ranking, keep))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` columns per row of (nq, n) scores as (scores, ids), each (nq, k), padded with -inf / -1."""
    nq, n = scores.shape
    kk = min(k, n)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    best = np.take_along_axis(part_scores, order, axis=1)
    if kk < k:
        ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        best = np.pad(best, ((0, 0), (0, k - kk)), constant_values=-np.inf)
    return best, ids


def inverted_index(doc_weights: sp.csr_matrix) -> sp.csr_matrix:
    """Latent-major copy (m, n) of passage weights (n, m): row j is latent j's posting list."""
    return doc_weights.T.tocsr()


def sparse_search(query_weights: sp.csr_matrix, postings: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of sparse queries (nq, m) with the passages of `postings` (m, n); best k per query.

    Only the posting lists of the query's latents are read (term-at-a-time over an inverted index).
    """
    scores = (query_weights @ postings).toarray()
    return top_k(scores, k)


def row_norms(matrix: sp.csr_matrix) -> np.ndarray:
    """L2 norm of every row of a sparse matrix."""
    return np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1), dtype=np.float64).ravel())


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


def decoder_vectors(weights: sp.csr_matrix, w_dec: np.ndarray) -> np.ndarray:
    """Dense (n, d_model) L2-normalised vectors sum_j weight_j * W_dec[j]: codes mapped back to model space.

    Inner products of these compare latents through their decoder directions, so related
    latents match softly, which the exact sparse score cannot do.
    """
    dense = np.asarray(weights @ w_dec, dtype=np.float32)
    norms = np.linalg.norm(dense, axis=1, keepdims=True)
    return dense / np.maximum(norms, 1e-12)


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


class FaissSearcher:
    """Inner-product FAISS index over dense vectors, searched on the GPU when faiss-gpu and CUDA are
    there. `index` is the CPU index (what is saved); `searched` is what answers queries."""

    def __init__(self, index: Any, use_gpu: bool = True):
        self.index = index
        self.searched = to_gpu_if_available(index) if use_gpu else index

    @classmethod
    def build(cls, vectors: np.ndarray, use_gpu: bool = True, quantized: bool = False) -> FaissSearcher:
        """Exact float32 inner products, or with `quantized` 8-bit scalar quantisation (a quarter of the bytes)."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if quantized:
            quantizer = faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexScalarQuantizer(vectors.shape[1], quantizer, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        else:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index, use_gpu)

    @property
    def on_gpu(self) -> bool:
        return self.searched is not self.index

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.searched.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return scores, ids.astype(np.int64)

    def save(self, path: str) -> None:
        import faiss

        faiss.write_index(self.index, path)

    @classmethod
    def load(cls, path: str, use_gpu: bool = True) -> FaissSearcher:
        import faiss

        return cls(faiss.read_index(path), use_gpu)


_gpu_resources: Any = None


def shared_gpu_resources() -> Any:
    """One `StandardGpuResources` per process: each reserves scratch memory on the GPU."""
    global _gpu_resources
    if _gpu_resources is None:
        import faiss

        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def to_gpu_if_available(index: Any, block: int = 1 << 20) -> Any:
    """`index` copied to GPU 0 when this FAISS build has GPU support and sees a GPU, else `index`.

    FAISS has no GPU version of the flat 8-bit scalar quantiser that ragsae saves: its vectors are
    decoded (`block` at a time) into a float16 scalar-quantised index, which FAISS serves from a
    float16 flat GPU index. Scores then differ from the CPU's by float16 rounding of the decoded values.
    """
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    source = index
    if isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype != faiss.ScalarQuantizer.QT_fp16:
        source = faiss.IndexScalarQuantizer(index.d, faiss.ScalarQuantizer.QT_fp16, index.metric_type)
        for start in range(0, index.ntotal, block):
            source.add(index.reconstruct_n(start, min(block, index.ntotal - start)))
    try:
        return faiss.index_cpu_to_gpu(shared_gpu_resources(), 0, source)
    except RuntimeError as error:  # an index type this FAISS build cannot place on the GPU
        logger.warning("FAISS GPU transfer failed (%s); searching on the CPU", error)
        return index


class Retriever:
    """Scores pooled query codes against an index's passage codes in the configured mode."""

    def __init__(
        self,
        codes: sp.csr_matrix,
        lengths: np.ndarray,
        w_dec: np.ndarray,
        config: ScoringConfig,
        faiss_searcher: FaissSearcher | None = None,
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
        self.doc_weights = weights
        self.postings = inverted_index(self.doc_weights)
        self.doc_norms = row_norms(self.doc_weights)
        self.w_dec = w_dec
        self._faiss = faiss_searcher

    @property
    def faiss(self) -> FaissSearcher:
        if self._faiss is None:
            self._faiss = FaissSearcher.build(decoder_vectors(self.doc_weights, self.w_dec), quantized=True)
        return self._faiss

    def query_weights(self, query_codes: sp.csr_matrix) -> sp.csr_matrix:
        """Latent weights that sparse scoring uses: the pooled activations (BM25's query term
        frequency), joined by pseudo-relevance feedback latents when `feedback_passages` > 0."""
        q, cfg = query_codes.astype(np.float32), self.config
        if cfg.feedback_passages == 0 or q.shape[0] == 0:
            return q
        _, top = sparse_search(q, self.postings, cfg.feedback_passages)
        return feedback_queries(
            q, top, self.doc_weights, self.doc_norms, cfg.feedback_weight, cfg.feedback_latents, cfg.feedback_weighting
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
            raise ValueError(f"unknown search mode {mode!r}")
        if mode != "faiss" and weights is None:
            weights = self.query_weights(query_codes)
        if mode == "sparse":
            return sparse_search(weights, self.postings, k)
        # Queries are mapped to decoder space with idf weighting, as documents are (no feedback).
        q = query_codes.astype(np.float32)
        dense_q = decoder_vectors(q.multiply(self.idf[None, :]).tocsr(), self.w_dec)
        if mode == "faiss":
            return self.faiss.search(dense_q, k)
        depth = max(k, 100)
        runs = [sparse_search(weights, self.postings, depth), self.faiss.search(dense_q, depth)]
        weight = self.config.fusion_weight
        return reciprocal_rank_fusion(runs, [weight, 1 - weight], k)

    def explain(self, weights: sp.csr_matrix, rows: Sequence[int], top: int) -> list[list[tuple[int, float]]]:
        """For each passage in `rows`, the latents of one query's sparse weights (1, m; from
        `query_weights`) that contribute most to its sparse score, as (latent, contribution)."""
        contrib = self.doc_weights[np.asarray(rows, dtype=np.int64)].multiply(weights).tocsr()
        explained = []
        for i in range(len(rows)):
            lo, hi = contrib.indptr[i], contrib.indptr[i + 1]
            data, latents = contrib.data[lo:hi], contrib.indices[lo:hi]
            order = np.argsort(-data)[:top]
            explained.append([(int(latents[j]), float(data[j])) for j in order])
        return explained
