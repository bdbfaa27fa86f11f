"""Micro-batching: concurrent /encode and /search requests gathered for a few milliseconds and sent
through the LLM forward pass and the SAE together, by one worker thread.

A request is a job on a queue; the worker takes the first job, waits up to `max_wait_ms` (from that
job's arrival) for more until `max_batch` texts are queued, then computes the jobs together: texts
to encode of one kind in one capture, searches with the same (k, mode, per_doc) in one
`Index.batch_search`, and, over several indexes, routed searches with the same settings in one
`Collections.batch_search` (one capture for every index). Jobs that piled up while a batch was
computed are taken at once, so under load batches fill without waiting. `max_batch=1` turns batching
off (one request at a time, in order). Every use of the LLM holds `gate`, which the service's other LLM
users (/ask) take too: the model is shared, and a capture hooks into its modules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ..capture import TokenActivations, content_mask, tokenize
from ..encode import encode_tokens, passage_activations, pool, selection_dtype
from ..errors import QueryError
from ..index import Index
from ..routing import Collections
from ..text import STOPWORD_LISTS
from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)

TEXT_KINDS = ("query", "document")
"""How /encode reads a text: as a query ("Question: " prefix, stopwords left out) or as a passage."""


class ServiceBusy(RuntimeError):
    """The queue is full; the client should retry later (HTTP 503)."""


class ServiceClosed(RuntimeError):
    """The batcher was closed before the job ran."""


@dataclass(frozen=True)
class TokenCode:
    """The SAE code of one token: its character span in the text, latents strongest first."""

    start: int
    end: int
    latents: list[int]
    values: list[float]


@dataclass(frozen=True)
class SparseCode:
    """The code of one text (pooled over its tokens) or of one activation vector: latents strongest first."""

    latents: list[int]
    values: list[float]
    tokens: int = 1
    """Tokens pooled (1 for an activation vector)."""
    token_codes: list[TokenCode] | None = None
    """Per-token codes when asked for."""
    text: str | None = None
    """With per-token codes: the text as encoded (sanitised where the index sanitises), which their
    spans index."""


@dataclass
class _Job:
    kind: str
    """'encode', 'vectors', 'search' or 'routed'."""
    key: tuple[Any, ...]
    """Jobs with the same key are computed together."""
    payload: Any
    size: int
    """Texts or vectors in this job (what `max_batch` counts)."""
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _EncodeJob:
    texts: list[str]
    per_token: bool


class MicroBatcher:
    """One worker thread that computes /encode and /search requests in micro-batches; thread-safe.

    Args:
        index: the index searched, and whose LLM and SAE encode texts and vectors (with `collections`, their
            first index).
        collections: the indexes that `routed_search` routes among; None when the service has one index.
        max_batch: texts (or vectors) per batch; 1 turns batching off.
        max_wait_ms: how long the first job of a batch waits for others.
        max_queue: jobs waiting at most; more are refused with `ServiceBusy`.
        monitor_interval_s: at most one search batch per this many seconds is also fed to the sparsity
            monitor (that costs a second forward pass of its queries; /encode inputs are monitored
            always, from the token codes computed for them).
    """

    def __init__(
        self,
        index: Index,
        metrics: ServiceMetrics | None = None,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 256,
        monitor_interval_s: float = 1.0,
        collections: Collections | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or monitor_interval_s < 0:
            raise ValueError(f"bad batcher settings: {max_batch=}, {max_queue=}, {max_wait_ms=}, {monitor_interval_s=}")
        self.index = index
        self.collections = collections
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.monitor_interval = monitor_interval_s
        self.gate = threading.Lock()
        """Held while the LLM or the index is in use; other users of the index's model take it too."""
        self._jobs: deque[_Job] = deque()
        self._queued_items = 0
        self._computing = 0
        self._cond = threading.Condition()
        self._closed = False
        self._last_search_monitor = -float("inf")
        self._thread = threading.Thread(target=self._run, name="ragsae-batcher", daemon=True)
        self._thread.start()

    # --- submitting ----------------------------------------------------------------------
    def encode(self, texts: Sequence[str], kind: str = "query", per_token: bool = False) -> Future:
        """Future of `list[SparseCode]`, one per text, read as a query or a document (`TEXT_KINDS`)."""
        if kind not in TEXT_KINDS:
            raise QueryError(f"kind must be one of {TEXT_KINDS}, got {kind!r}")
        return self._submit(_Job("encode", ("encode", kind), _EncodeJob(list(texts), per_token), len(texts)))

    def encode_vectors(self, vectors: np.ndarray) -> Future:
        """Future of `list[SparseCode]`: the SAE code of each raw activation vector (n, d_model)."""
        return self._submit(_Job("vectors", ("vectors",), np.asarray(vectors, dtype=np.float32), len(vectors)))

    def search(self, query: str, k: int = 10, mode: str | None = None, per_doc: bool = False) -> Future:
        """Future of `list[Hit]`: `Index.search(query, k, mode, per_doc)`."""
        return self._submit(_Job("search", ("search", k, mode, per_doc), query, 1))

    def routed_search(
        self,
        query: str,
        k: int = 10,
        route: str = "best",
        n: int = 2,
        threshold: float = 0.0,
        mode: str | None = None,
        per_doc: bool = False,
    ) -> Future:
        """Future of `Routed`: `Collections.batch_search` of the query among the batcher's `collections`."""
        if self.collections is None:
            raise RuntimeError("routed_search needs a batcher made with collections")
        return self._submit(_Job("routed", ("routed", k, route, n, threshold, mode, per_doc), query, 1))

    def _submit(self, job: _Job) -> Future:
        with self._cond:
            if self._closed:
                raise ServiceClosed("the batcher is closed")
            if len(self._jobs) >= self.max_queue:
                raise ServiceBusy(f"{len(self._jobs)} requests are queued (the service's max_queue); retry later")
            self._jobs.append(job)
            self._queued_items += job.size
            self._cond.notify()
        return job.future

    def depth(self) -> int:
        """Jobs waiting (not counting the batch being computed)."""
        return len(self._jobs)

    def computing(self) -> int:
        """Jobs in the batch being computed."""
        return self._computing

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the batch in hand; jobs still queued fail with `ServiceClosed`."""
        with self._cond:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._queued_items = 0
            self._cond.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServiceClosed("the service shut down before this request ran"))
        self._thread.join(timeout)

    # --- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._compute(batch)
            except BaseException as error:  # never let the worker die: fail the jobs instead
                logger.exception("micro-batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
            finally:
                self._computing = 0

    def _next_batch(self) -> list[_Job] | None:
        """The next jobs to compute together (None once closed); waits for the first, then up to
        `max_wait` from its arrival for more."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = self._jobs[0].arrived + self.max_wait
            while self._queued_items < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed:
                return None
            batch: list[_Job] = []
            items = 0
            while self._jobs and (not batch or items + self._jobs[0].size <= self.max_batch):
                job = self._jobs.popleft()
                self._queued_items -= job.size
                if job.future.set_running_or_notify_cancel():  # False: the client gave up
                    batch.append(job)
                    items += job.size
            self._computing = len(batch)
            return batch

    def _compute(self, batch: list[_Job]) -> None:
        start = time.perf_counter()
        groups: dict[tuple[Any, ...], list[_Job]] = {}
        for job in batch:
            groups.setdefault(job.key, []).append(job)
        searched: list[str] = []
        with self.gate:
            for key, jobs in groups.items():
                self._compute_group(key, jobs)
                if key[0] in ("search", "routed"):
                    searched += [job.payload for job in jobs]
            if self.metrics is not None:
                self.metrics.observe_batch(sum(job.size for job in batch), len(batch), time.perf_counter() - start)
                if searched and time.monotonic() - self._last_search_monitor >= self.monitor_interval:
                    self._last_search_monitor = time.monotonic()
                    self._monitor_queries(searched[:8])

    def _compute_group(self, key: tuple[Any, ...], jobs: list[_Job]) -> None:
        """Compute jobs of one key together; if that fails and there were several, each alone, so that an
        error reaches only the request that caused it."""
        try:
            results = self._results(key, jobs)
        except Exception as error:
            if len(jobs) == 1:
                jobs[0].future.set_exception(error)
                return
            for job in jobs:
                self._compute_group(key, [job])
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _results(self, key: tuple[Any, ...], jobs: list[_Job]) -> list[Any]:
        if key[0] == "search":
            _, k, mode, per_doc = key
            found = self.index.batch_search({str(i): job.payload for i, job in enumerate(jobs)}, k, mode, per_doc)
            return [found[str(i)] for i in range(len(jobs))]
        if key[0] == "routed":
            assert self.collections is not None  # routed_search refuses otherwise
            _, k, route, n, threshold, mode, per_doc = key
            queries = {str(i): job.payload for i, job in enumerate(jobs)}
            routed = self.collections.batch_search(queries, k, route, n, threshold, mode, per_doc)
            return [routed[str(i)] for i in range(len(jobs))]
        if key[0] == "vectors":
            return split(self._encode_vectors(np.concatenate([job.payload for job in jobs])), [j.size for j in jobs])
        texts = [text for job in jobs for text in job.payload.texts]
        per_token = [job.payload.per_token for job in jobs for _ in job.payload.texts]
        return split(self._encode_texts(texts, key[1], per_token), [job.size for job in jobs])

    # --- encoding ------------------------------------------------------------------------
    def _activations(self, texts: list[str], kind: str) -> TokenActivations:
        """Token activations as `CodeEncoder.encode_queries` / `encode_documents` capture them (of texts
        already as encoded: `encoded_texts`)."""
        encoder = self.index.encoder
        if kind == "document":
            return passage_activations(encoder.llm, texts, encoder.capture)
        return encoder.capture_queries(texts)

    def _token_codes(self, acts: TokenActivations) -> tuple[np.ndarray, np.ndarray]:
        encoder = self.index.encoder
        return encode_tokens(encoder.sae, acts.values, select_dtype=selection_dtype(encoder.llm))

    def encoded_texts(self, texts: list[str], kind: str) -> list[str]:
        """`texts` as the index encodes them: sanitised as its queries (`Index.sanitize_query`) or as its
        documents, where the index sanitises."""
        if kind == "query":
            return [self.index.sanitize_query(text) for text in texts]
        sanitizer = self.index.sanitizer
        return texts if sanitizer is None else [sanitizer.sanitize(text).text for text in texts]

    def _encode_texts(self, texts: list[str], kind: str, per_token: list[bool]) -> list[SparseCode]:
        encoder = self.index.encoder
        texts = self.encoded_texts(texts, kind)
        acts = self._activations(texts, kind)
        values, indices = self._token_codes(acts)
        pooled = pool(values, indices, acts.offsets, encoder.sae.num_latents, encoder.pooling)
        self._observe(acts.values, values, indices)
        wanted = [i for i, flag in enumerate(per_token) if flag]
        spans = dict(zip(wanted, self._token_spans([texts[i] for i in wanted], kind))) if wanted else {}
        codes = []
        for i in range(len(texts)):
            lo, hi = int(acts.offsets[i]), int(acts.offsets[i + 1])
            token_codes = None
            if i in spans:
                if len(spans[i]) != hi - lo:
                    raise RuntimeError(f"text {i}: {len(spans[i])} token spans for {hi - lo} captured tokens")
                token_codes = [
                    TokenCode(start, end, *strongest(indices[row], values[row]))
                    for (start, end), row in zip(spans[i], range(lo, hi))
                ]
            text = texts[i] if token_codes is not None else None
            codes.append(SparseCode(*row_code(pooled, i), tokens=hi - lo, token_codes=token_codes, text=text))
        return codes

    def _encode_vectors(self, vectors: np.ndarray) -> list[SparseCode]:
        values, indices = encode_tokens(self.index.sae, vectors, select_dtype=selection_dtype(self.index.llm))
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise QueryError(f"activations.{int(np.argmax(bad))}: values too large, the SAE's code is not finite")
        self._observe(vectors, values, indices)
        return [SparseCode(*strongest(i, v)) for v, i in zip(values, indices)]

    def _token_spans(self, texts: list[str], kind: str) -> list[list[tuple[int, int]]]:
        """(start, end) in each text of every token `_activations` keeps (the same tokenisation, prefix
        and stopword choice as `capture`), leading whitespace left out."""
        cfg = self.index.encoder.capture
        prefix = cfg.passage_prefix if kind == "document" else cfg.query_prefix
        stopwords = STOPWORD_LISTS[cfg.query_stopwords] if kind == "query" else frozenset()
        ids, skip, fed = tokenize(self.index.llm, texts, cfg.window, prefix)
        shift = len(prefix.rstrip()) + 1 if prefix.strip() else 0  # `tokenize` feeds f"{prefix} {text}"
        out = []
        for text, token_ids, (fed_text, offsets) in zip(texts, ids, fed):
            captured = offsets[skip - (len(token_ids) - len(offsets)) :]
            keep = content_mask(fed_text, captured, stopwords) if stopwords else np.ones(len(captured), dtype=bool)
            spans = []
            for (start, end), kept in zip(captured, keep):
                if kept:
                    start, end = max(start - shift, 0), max(end - shift, 0)
                    while start < end and text[start].isspace():
                        start += 1
                    spans.append((start, end))
            out.append(spans)
        return out

    # --- monitoring ----------------------------------------------------------------------
    def _observe(self, acts: np.ndarray, values: np.ndarray, indices: np.ndarray) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.observe_codes(
                torch.from_numpy(np.asarray(acts, dtype=np.float32)),
                torch.from_numpy(values),
                torch.from_numpy(indices),
            )
        except Exception:  # the monitor must never fail a request
            logger.exception("sparsity monitor failed")

    def _monitor_queries(self, queries: list[str]) -> None:
        """Feed the sparsity monitor the token codes of a few searched queries (another forward pass)."""
        try:
            acts = self._activations(self.encoded_texts(queries, "query"), "query")
            values, indices = self._token_codes(acts)
        except Exception:
            logger.exception("sparsity monitor failed")
            return
        self._observe(acts.values, values, indices)


def strongest(indices: np.ndarray, values: np.ndarray) -> tuple[list[int], list[float]]:
    """Non-zero (latents, values) of one code, strongest first."""
    keep = values > 0
    indices, values = indices[keep], values[keep]
    order = np.argsort(-values, kind="stable")
    return indices[order].astype(int).tolist(), values[order].astype(float).tolist()


def row_code(codes: sp.csr_matrix, row: int) -> tuple[list[int], list[float]]:
    lo, hi = codes.indptr[row], codes.indptr[row + 1]
    return strongest(codes.indices[lo:hi], codes.data[lo:hi])


def split(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    """`items` cut into consecutive runs of `sizes`."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
