"""`Collections`: several indexes over one LLM, a query routed to those whose signature it matches.

A query is captured through the shared LLM once; each index's SAE encodes those activations into its own
codes (`CodeEncoder.pool_activations`), which give its routing score (`routing_score`: signature match and
best-passage support) and, where the index is chosen, its search. Scores of indexes with different SAEs are
comparable because both parts are cosines in [0, 1] (`signature.py`); hit scores are not, so the hits of
several indexes are merged by rank. Indexes are ranked for a query by its routing score relative to the
index's background (`Collections.backgrounds`): a broad corpus scores every question higher than a narrow
one does, on its subject or not, and the ratio takes that out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..config import SearchMode
from ..errors import ConfigError, QueryError
from ..index import Hit, Index
from ..index.index import checked_queries
from ..lm import LoadedLlm
from .signature import Signature, signature

logger = logging.getLogger(__name__)

ROUTES = ("best", "top-n", "all")
"""How many indexes a query is sent to: the best-matching one, the `n` best, or all of them; in each
case only those whose routing score reaches the threshold."""

BACKGROUND_QUERIES = 64
"""Pseudo-queries cut from each index's passages to measure the other indexes' background routing scores."""
BACKGROUND_WORDS = 16
"""Words of a passage (its first) that make one pseudo-query: about a question's length."""
BACKGROUND_SEED = 0

QUERY_CAPTURE_FIELDS = ("layer", "window", "query_prefix", "query_stopwords")
"""The `CaptureConfig` fields that decide a query's activations: indexes that share a capture agree on them."""


@dataclass(frozen=True)
class RoutedHit(Hit):
    """A hit of one of the collections, tagged with the name of its index; `score` and `rank` are the
    index's own (scores of different indexes are not on one scale)."""

    index: str = ""


@dataclass
class Routed:
    """What `Collections.search` found for one query."""

    query: str
    routing: dict[str, float]
    """Every index's routing score in [0, 1] (`routing_score`: the query's match with the index's
    signature and its support by the index's best passage), in collection order."""
    chosen: list[str]
    """The indexes searched, best routing score first; empty when none reached the threshold."""
    hits: list[RoutedHit]
    """At most k hits merged from the chosen indexes: their rank-1 hits (best-routed index first), then
    their rank-2 hits, and so on."""
    by_index: dict[str, list[RoutedHit]] = field(default_factory=dict)
    """Each chosen index's own top-k hits, exactly as `Index.search` returns them (tagged)."""
    codes: dict[str, sp.csr_matrix] = field(default_factory=dict, repr=False)
    """The query's pooled code (1, num_latents) under each index's SAE, from the one capture."""
    relative: dict[str, float] = field(default_factory=dict)
    """Each index's routing score divided by its background (`Collections.backgrounds`), which orders
    `chosen`; empty where there is no background (a single index, or an index that stores no text)."""

    @property
    def retrieved(self) -> bool:
        """False when no index's routing score reached the threshold: nothing was searched."""
        return bool(self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "routing": self.routing,
            "relative": self.relative,
            "chosen": self.chosen,
            "retrieved": self.retrieved,
            "hits": [dataclasses.asdict(hit) for hit in self.hits],
        }


def check_route(route: str, n: int, threshold: float) -> None:
    """QueryError for a route, n or threshold out of range."""
    if route not in ROUTES:
        raise QueryError(f"route must be one of {ROUTES}, got {route!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise QueryError(f"n (indexes per query with route 'top-n') must be a whole number >= 1, got {n!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise QueryError(f"threshold must be a finite number, got {threshold!r}")


def choose(
    scores: dict[str, float], route: str, n: int, threshold: float, order: dict[str, float] | None = None
) -> list[str]:
    """The indexes a query goes to, best first by `order` (default: `scores`; ties in collection order):
    those whose score is at or above `threshold`, cut to one ('best'), `n` ('top-n') or none ('all')."""
    rank = order or scores
    ranked = [name for name in sorted(scores, key=lambda name: -rank[name]) if scores[name] >= threshold]
    if route == "best":
        return ranked[:1]
    if route == "top-n":
        return ranked[:n]
    return ranked


def interleave(lists: list[list[RoutedHit]], k: int) -> list[RoutedHit]:
    """Rank-1 hits of every list in order, then rank-2 hits, ..., at most k."""
    merged: list[RoutedHit] = []
    for depth in range(max((len(hits) for hits in lists), default=0)):
        merged.extend(hits[depth] for hits in lists if depth < len(hits))
    return merged[:k]


class Collections:
    """Several indexes built over one LLM, searched as one: each query is routed to the indexes whose
    signature its code matches.

    The indexes must share the LLM (same weights, dtype and device) and the query capture (layer, window,
    query prefix and stopwords): a query is captured once, by the first index's encoder, and encoded by
    every index's SAE. Load them with `Collections.load`, which loads the LLM once, or pass indexes loaded
    with `Index.load(path, llm=first.llm)`. Safe to search from several threads.

    Each index keeps a signature (`signature.py`): 16 centroids (spherical k-means) of its live passages'
    BM25 latent weights, each passage at unit length, computed on first use and kept until the index
    changes; several, because the mean of a corpus of many subjects is close to none of them. A query's
    routing score for an index is the highest cosine of its IDF-weighted code under that index's SAE with
    one centroid, in [0, 1] whatever the SAE, so the scores of different indexes compare. `route="best"`
    searches the best-scoring index, "top-n" the `n` best, "all" every one, none below `threshold`. Hit
    scores of different indexes are not on one scale, so the merged hits take each index's rank-1 hit
    first (best-routed index first), then the rank-2 hits; `Routed.by_index` has each index's own hits.

    Args:
        indexes: the indexes, at least one.
        names: a name per index (default: its folder's name, else "index0", "index1", ...).
    """

    def __init__(self, indexes: Sequence[Index], names: Sequence[str] | None = None):
        indexes = list(indexes)
        if not indexes:
            raise ConfigError("Collections needs at least one index")
        if not all(isinstance(index, Index) for index in indexes):
            raise ConfigError("Collections takes Index objects (load folders with Collections.load)")
        if names is None:
            names = [index.path.name if index.path is not None else f"index{i}" for i, index in enumerate(indexes)]
        names = list(names)
        if len(names) != len(indexes):
            raise ConfigError(f"names: {len(names)} names for {len(indexes)} indexes")
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"names must be distinct non-empty strings, got {names}")
        first = indexes[0]
        for name, index in zip(names[1:], indexes[1:]):
            check_shares_capture(names[0], first, name, index)
        self.indexes = indexes
        self.names = names
        self._by_name = dict(zip(names, indexes))
        self._captures = 0
        self._lock = threading.Lock()
        self._backgrounds: tuple[tuple[int, ...], dict[str, float] | None] | None = None
        self._background_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        paths: Sequence[str | Path],
        names: Sequence[str] | None = None,
        mode: SearchMode | None = None,
        device: str | None = None,
        llm: LoadedLlm | None = None,
    ) -> Collections:
        """Open index folders over one LLM: the first loads it (unless `llm` is given), the others reuse it."""
        if not paths:
            raise ConfigError("Collections.load needs at least one index folder")
        first = Index.load(paths[0], llm=llm, mode=mode, device=device)
        rest = [Index.load(path, llm=first.llm, mode=mode, device=device) for path in paths[1:]]
        return cls([first, *rest], names)

    @property
    def llm(self) -> LoadedLlm:
        return self.indexes[0].llm

    @property
    def captures(self) -> int:
        """LLM passes run to encode queries so far: one per batch of queries, whatever the number of indexes
        (one per distinct sanitised form of the batch where indexes sanitise queries differently)."""
        return self._captures

    def __len__(self) -> int:
        return len(self.indexes)

    def __iter__(self) -> Iterator[tuple[str, Index]]:
        return iter(self._by_name.items())

    def __getitem__(self, name: str) -> Index:
        try:
            return self._by_name[name]
        except KeyError:
            raise QueryError(f"no index named {name!r} (have {', '.join(self.names)})") from None

    def signatures(self) -> dict[str, Signature]:
        """Each index's signature (cached per index generation)."""
        return {name: signature(index) for name, index in self}

    # --- encoding and routing ----------------------------------------------------------------
    def encode_queries(self, queries: list[str], count: bool = True) -> dict[str, sp.csr_matrix]:
        """Pooled codes (n_queries, num_latents) of `queries` under each index's SAE, from one LLM pass:
        each index's codes equal its own `Index.encode_queries(queries)`. `count=False` leaves the pass
        out of `captures` (the pseudo-queries of `backgrounds`)."""
        sanitised: dict[tuple[str, ...], list[str]] = {}
        for name, index in self:
            sanitised.setdefault(tuple(index.sanitize_query(q) for q in queries), []).append(name)
        capturer = self.indexes[0].encoder
        codes: dict[str, sp.csr_matrix] = {}
        for texts, names in sanitised.items():
            acts = capturer.capture_queries(list(texts))
            with self._lock:
                self._captures += count
            for name in names:
                codes[name] = self._by_name[name].encoder.pool_activations(acts).codes
        return {name: codes[name] for name in self.names}

    def route(self, queries: list[str]) -> list[dict[str, float]]:
        """Each query's routing score per index (`routing_score` of its code under the index's SAE)."""
        queries = list(queries)
        check_queries(dict(enumerate(queries)))
        return self._scores(self.encode_queries(queries), len(queries)) if queries else []

    def _scores(self, codes: dict[str, sp.csr_matrix], nq: int) -> list[dict[str, float]]:
        matched = {name: routing_score(index, codes[name]) for name, index in self}
        return [{name: float(matched[name][row]) for name in self.names} for row in range(nq)]

    def backgrounds(self) -> dict[str, float] | None:
        """Each index's background: its mean routing score for pseudo-queries from every other index (the
        first `BACKGROUND_WORDS` words of `BACKGROUND_QUERIES` seeded random live passages of each), that is,
        how much text off its subject still scores there. None with a single index, or when an index
        stores no passage text (then indexes are ranked by their plain scores). Computed on first use and
        again after any index changes; one LLM capture."""
        state = tuple(index.generation for index in self.indexes)
        with self._background_lock:
            if self._backgrounds is None or self._backgrounds[0] != state:
                self._backgrounds = (state, self._measure_backgrounds())
            return self._backgrounds[1]

    def _measure_backgrounds(self) -> dict[str, float] | None:
        if len(self.indexes) < 2 or not all(index.stores_text for index in self.indexes):
            return None
        sources = {name: pseudo_queries(index) for name, index in self}
        texts = [text for name in self.names for text in sources[name]]
        if not texts:
            return None
        scores = self._scores(self.encode_queries(texts, count=False), len(texts))
        origin = [name for name in self.names for _ in sources[name]]
        backgrounds: dict[str, float] = {}
        for name in self.names:
            off_subject = [row[name] for row, source in zip(scores, origin) if source != name]
            if not off_subject or not np.mean(off_subject) > 0:
                return None
            backgrounds[name] = float(np.mean(off_subject))
        logger.info("routing backgrounds: %s", ", ".join(f"{n} {b:.3f}" for n, b in backgrounds.items()))
        return backgrounds

    def relative(self, scores: list[dict[str, float]]) -> list[dict[str, float]]:
        """Routing scores divided by each index's background (`backgrounds`); empty dicts where there is none."""
        backgrounds = self.backgrounds()
        if backgrounds is None:
            return [{} for _ in scores]
        return [{name: row[name] / backgrounds[name] for name in self.names} for row in scores]

    # --- searching -----------------------------------------------------------------------------
    def search(
        self,
        query: str,
        k: int = 10,
        route: str = "best",
        n: int = 2,
        threshold: float = 0.0,
        mode: str | None = None,
        per_doc: bool = False,
    ) -> Routed:
        """Route one query and search the indexes chosen (`ROUTES`); nothing is searched when no routing
        score reaches `threshold` (`Routed.retrieved` is then False)."""
        return self.batch_search([query], k, route, n, threshold, mode, per_doc)["0"]

    def batch_search(
        self,
        queries: dict[str, str] | list[str],
        k: int = 10,
        route: str = "best",
        n: int = 2,
        threshold: float = 0.0,
        mode: str | None = None,
        per_doc: bool = False,
    ) -> dict[str, Routed]:
        """`search` for many queries ({qid: text}, or a list: qids "0", "1", ...), captured in one pass."""
        check_route(route, n, threshold)
        queries = checked_queries(queries, k)
        if not queries:
            return {}
        qids, texts = list(queries), list(queries.values())
        codes = self.encode_queries(texts)
        scores = self._scores(codes, len(qids))
        relative = self.relative(scores)  # empty dicts without backgrounds (a single index)
        chosen = [choose(row, route, n, threshold, order) for row, order in zip(scores, relative)]
        found: dict[str, dict[str, list[Hit]]] = {}
        for name, index in self:
            rows = [row for row in range(len(qids)) if name in chosen[row]]
            if rows:
                asked = {qids[row]: texts[row] for row in rows}
                found[name] = index.batch_search(asked, k, mode, per_doc, codes=codes[name][rows])
        results: dict[str, Routed] = {}
        for row, qid in enumerate(qids):
            by_index = {name: [tag(hit, name) for hit in found[name][qid]] for name in chosen[row]}
            results[qid] = Routed(
                texts[row],
                scores[row],
                chosen[row],
                interleave(list(by_index.values()), k),
                by_index,
                {name: codes[name][row] for name in self.names},
                relative[row],
            )
        return results


def routing_score(index: Index, codes: sp.csr_matrix) -> np.ndarray:
    """(n_queries,) how well each query's pooled code (under the index's SAE) belongs to the index: the
    geometric mean of two cosines in [0, 1], its match with the index's signature (the subject of the
    corpus) and its support by the index's best passage for it (`Retriever.support`: a passage that
    shares the query's specific latents). Either alone confuses a collection that is broad (the best
    passage of a large general corpus supports many off-subject questions) or narrow (a centroid of
    few subjects matches little); a query must score on both (`benchmarks/routing.py` compares them)."""
    retriever = index.retriever
    weights = retriever.scaled(codes)
    _, best = retriever.sparse.search(weights, 1)
    support = retriever.support(weights, best[:, 0])
    return np.sqrt(signature(index).match(codes) * np.clip(support, 0.0, 1.0))


def pseudo_queries(index: Index, count: int = BACKGROUND_QUERIES, words: int = BACKGROUND_WORDS) -> list[str]:
    """The first `words` words of `count` seeded random live passages of `index` (fewer if it has fewer)."""
    rows = sorted(row for rows in index.doc_rows.values() for row in rows)
    chosen = np.random.default_rng(BACKGROUND_SEED).choice(len(rows), min(count, len(rows)), replace=False)
    texts = (" ".join((index.passages[rows[i]].text or "").split()[:words]) for i in sorted(chosen))
    return [text for text in texts if text]


def check_queries(queries: dict[Any, Any]) -> None:
    """QueryError naming the first query that is not a non-empty string."""
    for qid, text in queries.items():
        if not isinstance(text, str) or not text.strip():
            raise QueryError(f"query {qid!r} must be a non-empty string, got {text!r}")


def tag(hit: Hit, name: str) -> RoutedHit:
    return RoutedHit(**{f.name: getattr(hit, f.name) for f in dataclasses.fields(Hit)}, index=name)


def check_shares_capture(first_name: str, first: Index, name: str, index: Index) -> None:
    """ConfigError unless `index` reads queries exactly as `first` does (one capture serves both)."""
    a, b = first.llm, index.llm
    if a.model_hash != b.model_hash:
        raise ConfigError(
            f"index {name!r} was built on LLM {b.model_id} (hash {b.model_hash[:12]}), index {first_name!r} on "
            f"{a.model_id} (hash {a.model_hash[:12]}): collections share one LLM"
        )
    if (a.dtype_name, str(a.device)) != (b.dtype_name, str(b.device)):
        raise ConfigError(
            f"index {name!r} runs its LLM in {b.dtype_name} on {b.device}, index {first_name!r} in {a.dtype_name} "
            f"on {a.device}: load them over one LLM (Collections.load, or Index.load(path, llm=first.llm))"
        )
    for key in QUERY_CAPTURE_FIELDS:
        mine, theirs = getattr(first.config.capture, key), getattr(index.config.capture, key)
        if mine != theirs:
            raise ConfigError(
                f"index {name!r} captures queries with {key}={theirs!r}, index {first_name!r} with {key}={mine!r}: "
                "collections capture a query once for every index"
            )
    if a is not b:
        logger.warning("index %r holds its own copy of the LLM; load it with llm= the first's to share memory", name)
