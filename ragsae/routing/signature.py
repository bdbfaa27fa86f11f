"""An index's signature in latent space, and how well a query's code matches it.

Each live passage is represented by its BM25 latent weights (which carry the live IDF) scaled to unit
length, so that long passages count as much as short ones. The signature of an index is a few centroids
of those vectors: spherical k-means (`clusters`, 16 by default) over the live passages, or over a seeded
sample of `SAMPLE` of them in a large index. A query matches it by the highest cosine of its IDF-weighted
code (pooled activation times live IDF, the query side of `Retriever.support`) with one of the centroids.
Latents that fire on most passages have a low IDF on both sides, so the score is carried by the latents
specific to the corpus: a query on one of its subjects shares them, a query on something else does not.

Several centroids rather than one: the mean of a corpus of many subjects is close to none of them, so a
single centroid favours narrow corpora over broad ones; with one centroid per group of passages a query
is compared with the group nearest its subject (`benchmarks/routing.py` compares the two, and
`compute_signature(index, clusters=1)` gives the single centroid).

The cosine is in [0, 1] whatever the SAE, its width or the corpus size, which is what lets scores of
indexes with different SAEs be compared (`Collections` routes by them).

A signature depends on the live passages and their statistics; it is computed on first use and kept
until the index changes (a new generation: add, delete, upsert, compact, retrain).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..index import Index
from ..retrieval import Retriever
from ..retrieval.retriever import SegmentsView
from ..retrieval.scoring import row_norms

CLUSTERS = 16
"""Centroids per signature (fewer when the index has fewer passages)."""
SAMPLE = 20_000
"""At most this many live passages (a seeded sample) are clustered; the centroids of a sample that size
already place every subject of any size that matters for routing."""
ITERATIONS = 20
"""Most k-means rounds (it stops earlier when no passage changes cluster)."""
SEED = 0


@dataclass(frozen=True)
class Signature:
    """An index's live passages summed up in its latent space."""

    centroids: np.ndarray
    """(clusters, num_latents) float64: k-means centroids (means) of the live passages' unit-length BM25
    latent weights; no rows for an index without live passages."""
    live_idf: np.ndarray
    """(num_latents,) float64: the IDF of each latent over the live passages; a query's code is weighted
    by it before it is matched against the centroids."""
    passages: int
    """Live passages clustered: those with at least one latent, or a sample of `SAMPLE` of them."""
    generation: int
    """The index generation it was computed at."""

    def match(self, codes: sp.csr_matrix) -> np.ndarray:
        """(n_queries,) highest cosine in [0, 1] of each row of pooled query codes (n_queries, num_latents),
        the index's own SAE's, weighted by the live IDF, with a centroid; 0 for a code that shares nothing."""
        q = sp.csr_matrix(codes, dtype=np.float64).multiply(self.live_idf[None, :]).tocsr()
        if len(self.centroids) == 0:
            return np.zeros(q.shape[0])
        dots = np.asarray(q @ self.centroids.T)
        norms = row_norms(q)[:, None] * np.linalg.norm(self.centroids, axis=1)[None, :]
        return np.where(norms > 0, dots / np.maximum(norms, 1e-300), 0.0).max(axis=1)


def compute_signature(index: Index, clusters: int = CLUSTERS) -> Signature:
    """The signature of `index` as it is now, computed afresh (`signature` caches the default one)."""
    retriever = index._snapshot[0]
    return _compute(retriever, retriever.view, index.generation, clusters)


def unit_passages(view: SegmentsView, sample: int = SAMPLE) -> sp.csr_matrix:
    """(n, num_latents) float64 live BM25 weights of the live passages (a seeded sample of `sample` of
    them when there are more), each row at unit length; passages without latents left out."""
    live = [np.flatnonzero(~np.asarray(dead, dtype=bool)) for dead in view.deleted]
    total = sum(len(rows) for rows in live)
    if total > sample:  # choose among all live rows, then read only those
        chosen = np.sort(np.random.default_rng(SEED).choice(total, sample, replace=False))
        bounds = np.cumsum([0] + [len(rows) for rows in live])
        live = [rows[chosen[(chosen >= lo) & (chosen < hi)] - lo] for rows, lo, hi in zip(live, bounds, bounds[1:])]
    scale = view.scale.astype(np.float64)
    parts = []
    for segment, rows in zip(view.segments, live):
        if len(rows):
            # Stored weights carry the reference IDF; times `scale`, the live IDF (as every search does).
            weights = sp.csr_matrix(segment.sparse.rows(rows), dtype=np.float64)
            parts.append(weights.multiply(scale[None, :]).tocsr())
    if not parts:
        return sp.csr_matrix((0, len(scale)), dtype=np.float64)
    weights = sp.vstack(parts, format="csr")
    norms = row_norms(weights)
    kept = weights[norms > 0]
    return sp.csr_matrix(sp.diags(1.0 / norms[norms > 0]) @ kept)


def spherical_kmeans(units: sp.csr_matrix, clusters: int, iterations: int = ITERATIONS) -> np.ndarray:
    """(clusters, m) centroids (member means) of unit rows (n, m), each row assigned to the centroid of
    highest cosine; started from rows chosen by k-means++ (Arthur and Vassilvitskii 2007: each next one
    drawn with probability growing with its distance to those chosen) with a fixed seed, so deterministic."""
    n = units.shape[0]
    clusters = min(clusters, n)
    if clusters == 0:
        return np.zeros((0, units.shape[1]))
    rng = np.random.default_rng(SEED)
    start = [int(rng.integers(n))]
    nearest_similarity = np.asarray(units @ units[start[0]].T.toarray()).ravel()
    for _ in range(1, clusters):
        distance = np.clip(1.0 - nearest_similarity, 0.0, None) ** 2
        distance[start] = 0.0
        if distance.sum() <= 0:  # every other row is a copy of a chosen one
            rest = np.setdiff1d(np.arange(n), start)
            start.append(int(rest[0]))
        else:
            start.append(int(rng.choice(n, p=distance / distance.sum())))
        similarity = np.asarray(units @ units[start[-1]].T.toarray()).ravel()
        nearest_similarity = np.maximum(nearest_similarity, similarity)
    centroids = units[start].toarray()
    assigned = np.full(n, -1)
    for _ in range(iterations):
        norms = np.maximum(np.linalg.norm(centroids, axis=1), 1e-300)
        nearest = (np.asarray(units @ centroids.T) / norms[None, :]).argmax(axis=1)
        if (nearest == assigned).all():
            break
        assigned = nearest
        counts = np.bincount(assigned, minlength=clusters)
        filled = counts > 0  # an emptied cluster keeps its centroid
        members = sp.csr_matrix((np.ones(n), (assigned, np.arange(n))), shape=(clusters, n))
        sums = np.asarray((members @ units).todense())
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def _compute(retriever: Retriever, view: SegmentsView, generation: int, clusters: int = CLUSTERS) -> Signature:
    units = unit_passages(view)
    live_idf = retriever.reference_idf.astype(np.float64) * view.scale.astype(np.float64)
    return Signature(spherical_kmeans(units, clusters), live_idf, units.shape[0], generation)


_cache: weakref.WeakKeyDictionary[Index, tuple[SegmentsView, Signature]] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def signature(index: Index) -> Signature:
    """The signature of `index`, computed once per state of its passages and kept until the index
    changes (each change swaps in a new search view, and moves the index to a new generation).
    Safe from several threads."""
    retriever = index._snapshot[0]
    view = retriever.view
    with _cache_lock:
        cached = _cache.get(index)
        if cached is not None and cached[0] is view and cached[1].generation == index.generation:
            return cached[1]
    computed = _compute(retriever, view, index.generation)
    with _cache_lock:
        _cache[index] = (view, computed)
    return computed
