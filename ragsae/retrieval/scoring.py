"""Latent weighting and exact sparse scoring: BM25 over latents, pruning, top-k, decoder-space vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp


def idf_from_counts(df: np.ndarray, passages: int) -> np.ndarray:
    """BM25 IDF per latent from the number of passages on which it fires (Robertson-Sparck Jones, +1)."""
    df = np.asarray(df, dtype=np.float64)
    return np.log1p((passages - df + 0.5) / (df + 0.5)).astype(np.float32)


def latent_counts(codes: sp.csr_matrix, rows: np.ndarray | None = None) -> np.ndarray:
    """(num_latents,) int64: on how many passages (rows of `codes`, or only `rows`) each latent fires."""
    indices = codes.indices if rows is None else codes[np.asarray(rows, dtype=np.int64)].indices
    return np.bincount(indices, minlength=codes.shape[1]).astype(np.int64)


def latent_idf(codes: sp.csr_matrix) -> np.ndarray:
    """BM25 IDF per latent over the passages of `codes`."""
    return idf_from_counts(latent_counts(codes), codes.shape[0])


@dataclass(frozen=True)
class CorpusStatistics:
    """What BM25 needs to know of a set of passages: how many, their mean length in tokens, and on how
    many of them each latent fires (counted on unpruned codes, so pruning cannot make a latent look rare)."""

    passages: int
    avg_length: float
    df: np.ndarray
    """(num_latents,) int64 passage counts."""

    @classmethod
    def of(cls, codes: sp.csr_matrix, lengths: np.ndarray) -> CorpusStatistics:
        return cls(codes.shape[0], float(lengths.mean()), latent_counts(codes))

    def idf(self) -> np.ndarray:
        return idf_from_counts(self.df, self.passages)

    def to_json(self) -> dict[str, Any]:
        return {"passages": self.passages, "avg_length": self.avg_length, "df": self.df.tolist()}

    @classmethod
    def from_json(cls, data: Any, num_latents: int) -> CorpusStatistics:
        """From `to_json`'s output; ValueError naming the field at fault."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        passages, avg_length, df = data.get("passages"), data.get("avg_length"), data.get("df")
        if isinstance(passages, bool) or not isinstance(passages, int) or passages < 1:
            raise ValueError(f"'passages' must be a whole number >= 1, got {passages!r}")
        if isinstance(avg_length, bool) or not isinstance(avg_length, (int, float)) or not avg_length > 0:
            raise ValueError(f"'avg_length' must be a positive number, got {avg_length!r}")
        if not isinstance(df, list) or len(df) != num_latents:
            raise ValueError(f"'df' must list {num_latents} counts")
        counts = np.asarray(df)
        if counts.dtype.kind not in "iu" or (counts < 0).any() or (counts > passages).any():
            raise ValueError(f"'df' must hold whole numbers in [0, {passages}]")
        return cls(passages, float(avg_length), counts.astype(np.int64))


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


def prune_for_storage(
    codes: sp.csr_matrix, lengths: np.ndarray, reference: CorpusStatistics, k1: float, b: float, keep: int | None
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(kept, dropped): `codes` cut to each passage's `keep` strongest latents by BM25 weight under the
    `reference` statistics, and the pattern of the entries cut (kept to count latent frequencies).

    The reference is frozen with the SAE version, so a passage is cut the same way whenever and in
    whatever batch it is added: the stored vector never depends on what else is indexed."""
    empty = sp.csr_matrix((codes.shape[0], codes.shape[1]), dtype=np.float32)
    if keep is None or np.diff(codes.indptr).max(initial=0) <= keep:
        return codes, empty
    weights = bm25_document_weights(codes, lengths, reference.idf(), k1, b, reference.avg_length)
    picked, indptr = strongest_entries(weights, keep)
    dropped = np.ones(codes.nnz, dtype=bool)
    dropped[picked] = False
    rows = np.repeat(np.arange(codes.shape[0]), np.diff(codes.indptr))[dropped]
    pattern = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, codes.indices[dropped])), shape=codes.shape)
    return take_entries(codes, picked, indptr), pattern


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

    Only the posting lists of the queries' latents are read (term-at-a-time over an inverted index), and
    their products are summed into a dense score array per query: a sparse-sparse product would build a
    sparse result that touches nearly every passage, about four times slower on 500k passages. Latents
    are added in ascending order either way, so the scores are the same to the bit.
    """
    queries = query_weights.tocsr()
    latents = np.unique(queries.indices)
    per_latent = queries[:, latents].toarray().T  # (latents, nq)
    scores = np.asarray(postings[latents].T @ per_latent).T  # postings[latents].T is (n, latents) CSC
    return top_k(np.ascontiguousarray(scores), k)


def row_norms(matrix: sp.csr_matrix) -> np.ndarray:
    """L2 norm of every row of a sparse matrix."""
    return np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1), dtype=np.float64).ravel())


def decoder_vectors(weights: sp.csr_matrix, w_dec: np.ndarray) -> np.ndarray:
    """Dense (n, d_model) L2-normalised vectors sum_j weight_j * W_dec[j]: codes mapped back to model space.

    Inner products of these compare latents through their decoder directions, so related
    latents match softly, which the exact sparse score cannot do.
    """
    dense = np.asarray(weights @ w_dec, dtype=np.float32)
    norms = np.linalg.norm(dense, axis=1, keepdims=True)
    return dense / np.maximum(norms, 1e-12)
