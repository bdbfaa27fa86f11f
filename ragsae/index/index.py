"""`Index`: passages, their codes and the retriever over them; built, changed, saved, loaded, searched.

An index is a list of segments (`segment.py`). Adding passages encodes them with the index's frozen
SAE into a new segment; deleting marks rows; `compact` merges the segments; `retrain` trains a new SAE
version and re-encodes. An index with a folder writes each change there as it is made (`folder.py`):
new files, then the manifest, under a lock that admits one writing process at a time.

With `BuildConfig.sanitize` on, documents are sanitised (`text/sanitize.py`) before they are split, by
build, add, upsert and drift, and queries before they are encoded; the index keeps one `Sanitizer`, the
hash-mode salt (from `salt_env`, or `layout.SALT_FILE` in its folder, never in the manifest) and the
audit of every build and add.

With `backend="milvus"` the live passages are also served from a Milvus collection
(`retrieval/backends/milvus.py`), recorded in the manifest's `serving` record: filled at build, kept in
step by every change after its commit, made anew by compact and retrain, checked (and filled again if
out of step) by `load`. The segments stay the source of truth; searches fall back to them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..config import BuildConfig, RayBuild, SanitizeConfig, SearchMode, to_dict
from ..encode import CodeEncoder, PooledCodes, check_sae_matches, fit_sae, passage_activations
from ..errors import ConfigError, CorpusError, IndexFolderError, QueryError
from ..latents import Explanation, LatentCatalog, explain_query
from ..layout import (
    LOCK_FILE,
    SAE_VERSIONS_DIR,
    SALT_FILE,
    deletes_file,
    history_file,
    sae_version_folder,
    segment_folder,
)
from ..lm import LoadedLlm, load_llm
from ..provenance import library_versions
from ..retrieval import Retriever
from ..retrieval.backends.milvus import (
    MilvusBackend,
    MilvusUnavailable,
    fill,
    moved_record,
    next_collection,
    release_lite,
    resolve_uri,
    serving_record,
    uri_token,
    view_records,
)
from ..retrieval.scoring import CorpusStatistics, prune_for_storage
from ..sae import SparseAutoencoder, TrainReport
from ..sae.compare import compare_saes
from ..storage import atomic_folder, atomic_output, exclusive_lock, file_sha256, lock_holder, storage_precision
from ..text import Audit, Document, Passage, Sanitizer, load_documents, resolve_salt, salt_fingerprint
from ..text.sanitize import env_salt, new_salt, write_salt
from .build import PreparedPassages, encode_corpus, pool_and_describe, prepare_passages
from .drift import drift_report
from .folder import (
    build_manifest,
    check_writable,
    collect_garbage,
    current_sae_version,
    is_index_folder,
    load_catalog,
    next_segment_number,
    now,
    read_index_folder,
    read_manifest,
    sae_files,
    unchanged_on_os_error,
    write_catalog,
    write_manifest,
)
from .hit import Hit
from .segment import Segment, write_deletes, write_segment

logger = logging.getLogger(__name__)

BACKENDS = ("csr", "milvus")
"""Where an index is served from: 'csr' (its segments in memory: exact CSR scoring and FAISS) or
'milvus' (a Milvus collection filled from the segments, which stay the reference)."""


def reference_of(sae: SparseAutoencoder) -> CorpusStatistics | None:
    """The statistics an SAE version weights and prunes passages with (`metadata['reference']`)."""
    data = sae.metadata.get("reference")
    if data is None:
        return None
    try:
        return CorpusStatistics.from_json(data, sae.num_latents)
    except ValueError as error:
        raise IndexFolderError(f"SAE metadata 'reference': {error}") from None


def with_reference(sae: SparseAutoencoder, reference: CorpusStatistics) -> SparseAutoencoder:
    """`sae` (sharing its weights) with `reference` in its metadata, leaving the caller's object as it is."""
    copied = copy.copy(sae)
    copied.metadata = {**sae.metadata, "reference": reference.to_json()}
    return copied


class Index:
    """Passages, their pooled SAE codes and the machinery to search and change them.

    Build with `Index.build(corpus)`, reopen with `Index.load(path)`, query with `search`, change with
    `add`, `delete`, `upsert`, `compact` and `retrain`. Searching is safe from several threads at
    once, and while one thread changes the index (a search sees the index before or after a change).
    """

    def __init__(self, encoder: CodeEncoder, config: BuildConfig, path: Path | None = None):
        reference = reference_of(encoder.sae)
        if reference is None:
            raise IndexFolderError("the SAE has no reference statistics; build the index with Index.build")
        self.encoder = encoder
        self.config = config
        self.path = path
        self.reference = reference
        self.retriever = Retriever(encoder.sae.W_dec.detach().cpu().numpy(), config.scoring, reference)
        self.segments: list[Segment] = []
        self.passages: list[Passage] = []
        """Every row, deleted ones included (`Hit`s point into it)."""
        self._snapshot = (self.retriever, self.passages)
        """What a search reads, swapped as one: rows only grow within a retriever's life."""
        self.doc_rows: dict[str, list[int]] = {}
        """Live document id -> its rows."""
        self.df = np.zeros(encoder.sae.num_latents, dtype=np.int64)
        """On how many live passages each latent fires (unpruned)."""
        self.history: list[dict[str, Any]] = []
        self.sae_version = 1
        self.sae_versions: list[dict[str, Any]] = []
        self.generation = 0
        self.created = now()
        self._write_lock = threading.RLock()
        self._catalog: LatentCatalog | None = None
        self._catalog_loaded = False
        self._catalog_lock = threading.Lock()
        self.sanitize_audit: Audit | None = None
        """What sanitisation replaced in every build and add so far (counts, never values); None when off."""
        self._salt: bytes | None = None
        """The hash-mode salt: kept in memory, written to the folder's `SALT_FILE` unless it comes from
        `salt_env`; never in the manifest."""
        self._sanitizer: Sanitizer | None = None
        self._sanitizer_lock = threading.Lock()
        self.serving: dict[str, Any] | None = None
        """The manifest's `serving` record (backend, uri, collection) of a Milvus-served index; None: served
        from the segments alone."""
        self.engine: MilvusBackend | None = None
        """The connected Milvus collection, also set as the retriever's engine while in step."""
        self._milvus_token = ""
        """Credentials for the Milvus server (from the build uri or `$RAGSAE_MILVUS_TOKEN`), never saved."""

    @classmethod
    def from_codes(
        cls,
        encoder: CodeEncoder,
        passages: list[Passage],
        pooled: PooledCodes,
        config: BuildConfig,
        sae_report: TrainReport | None = None,
        catalog: LatentCatalog | None = None,
    ) -> Index:
        """A one-segment index over pooled codes. An SAE without reference statistics gets those of these
        passages (an SAE trained on them has them already). `catalog` describes the SAE's latents."""
        codes = storage_precision(pooled.codes)  # searched at the precision they are stored in
        reference = reference_of(encoder.sae) or CorpusStatistics.of(codes, pooled.lengths)
        sae = with_reference(encoder.sae, reference)
        encoder = CodeEncoder(encoder.llm, sae, encoder.capture, encoder.pooling, encoder.cache)
        index = cls(encoder, config)
        index.sae_versions = [version_record(1, sae, None, "scratch" if sae_report else "given", len(passages))]
        index._append(index._segment(passages, codes, pooled.lengths))
        index._catalog = catalog
        return index

    @property
    def llm(self) -> LoadedLlm:
        return self.encoder.llm

    @property
    def sae(self) -> SparseAutoencoder:
        return self.encoder.sae

    def __len__(self) -> int:
        """Live passages."""
        return self.retriever.live_rows

    @property
    def codes(self) -> sp.csr_matrix:
        """Stored (pruned) codes of every row, deleted ones included, in row order."""
        return sp.vstack([s.codes for s in self.segments], format="csr")

    @property
    def catalog(self) -> LatentCatalog | None:
        """The current SAE's latents described on the passages it was built or retrained on (labels, top
        contexts, characteristic tokens); read from the folder on first use; None when there is none.
        Passages added later do not change what a latent means, so adds leave it as it is."""
        with self._catalog_lock:
            if self._catalog is None and not self._catalog_loaded and self.path is not None:
                self._catalog = load_catalog(self.path, self.sae.num_latents)
            self._catalog_loaded = True
            return self._catalog

    @staticmethod
    def latent_catalog(path: str | Path) -> LatentCatalog:
        """The latent catalog of an index folder, checked against its manifest (the LLM is not loaded)."""
        manifest = read_manifest(path)
        current = current_sae_version(manifest)
        catalog = load_catalog(path, current["num_latents"], manifest)
        if catalog is None:
            raise IndexFolderError(f"{path}: has no latent catalog (built with describe_latents=False); rebuild it")
        return catalog

    def explain(self, query: str, doc_id: str | None = None) -> Explanation:
        """Why the top hit for `query` (or document / passage `doc_id`) matched: every latent query and
        passage share, with its label, its share of the sparse score and the passage tokens where it fires."""
        catalog = self.catalog
        if catalog is None:
            raise IndexFolderError("this index has no latent catalog (built with describe_latents=False)")
        return explain_query(self, catalog, query, doc_id)

    @property
    def documents(self) -> list[str]:
        """Live document ids, in the order they were added."""
        return list(self.doc_rows)

    # --- building ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        corpus: str | Path | Iterable[Any],
        path: str | Path | None = None,
        config: BuildConfig | None = None,
        sae: SparseAutoencoder | str | Path | None = None,
        llm: LoadedLlm | None = None,
        skip_empty: bool = False,
        cache_dir: str | Path | None = None,
        overwrite: bool = False,
        progress: bool = False,
        describe_latents: bool = True,
        backend: str = "csr",
        uri: str | None = None,
        ray: RayBuild | None = None,
    ) -> Index:
        """Split, capture, (train an SAE,) encode and index a corpus; saved to `path` when given.

        Args:
            corpus: JSONL file, BEIR folder, folder of .txt/.md files, or an iterable of
                strings, dicts or `Document`s.
            sae: an SAE, its folder, or an index folder (its current SAE) to reuse; None trains one.
            cache_dir: where to cache captured activations (None: no cache).
            describe_latents: describe the SAE's latents on the corpus (labels, contexts: `latents/`),
                for labelled hits, `explain`, `ragsae latents` and the atlas.
            backend: 'csr' (the segments in memory) or 'milvus' (also a Milvus collection: `BACKENDS`).
            uri: the Milvus to use: a Milvus Lite file ('file.db') or a server ('http://host:19530');
                None: `milvus.db` inside the index folder. Credentials in the URL are used, never saved
                (`$RAGSAE_MILVUS_TOKEN` gives them to later loads).
            ray: capture and encode on Ray workers (`RayBuild`: a local Ray or a cluster; the SAE, when
                not given, is trained first on a sample of the passages); the index is the one a
                single process builds with that SAE. Not with `cache_dir`.
        """
        config = config or BuildConfig()
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "milvus" and uri is not None:
            raise ConfigError("uri is for backend='milvus'")
        serving = serving_record(uri, Path(path) if path is not None else None) if backend == "milvus" else None
        if path is not None:
            check_writable(path, overwrite, Path(corpus) if isinstance(corpus, (str, Path)) else None)
        if isinstance(sae, (str, Path)):
            sae = Path(sae)
            if is_index_folder(sae.parent) and sae.name == SAE_VERSIONS_DIR:  # INDEX/sae: its versions' folder
                sae = sae.parent
            if is_index_folder(sae):
                sae = Index.current_sae_folder(sae)
        salt = new_index_salt(config.sanitize)
        sanitizer = Sanitizer(config.sanitize, salt) if config.sanitize.mode != "off" else None
        built = encode_corpus(
            corpus, config, sae, llm, skip_empty, cache_dir, progress, sanitizer, describe_latents, ray
        )
        index = cls.from_codes(
            built.encoder, built.passages, built.pooled, built.config, built.sae_report, built.catalog
        )
        index._salt, index._sanitizer, index.sanitize_audit = salt, sanitizer, built.audit
        index.serving, index._milvus_token = serving, uri_token(uri)
        if path is not None:
            index.save(path, overwrite=overwrite)
        elif serving is not None:
            try:
                index._fill_serving(moved_record(serving, None), index.generation)
            except MilvusUnavailable as error:
                raise IndexFolderError(f"filling the Milvus collection failed: {error}") from None
        return index

    @staticmethod
    def current_sae_folder(path: str | Path) -> Path:
        """The folder of an index's current SAE version."""
        manifest = read_manifest(path)
        current = current_sae_version(manifest)
        return Path(path) / current["folder"]

    # --- segments in memory ------------------------------------------------------------------
    def _segment(self, passages: list[Passage], codes: sp.csr_matrix, lengths: np.ndarray) -> Segment:
        """A new segment of passage codes (at storage precision), pruned with the reference statistics."""
        cfg = self.config.scoring
        kept, dropped = prune_for_storage(codes, lengths, self.reference, cfg.k1, cfg.b, cfg.max_latents)
        lengths = np.asarray(lengths, dtype=np.float32)
        segment = Segment(passages, kept, dropped, lengths, self.sae_version, np.zeros(len(passages), dtype=bool))
        segment.search = self.retriever.new_segment(kept, lengths)
        return segment

    def _append(self, segment: Segment) -> None:
        """Make a segment searchable (its deleted rows masked) and count its live passages."""
        if segment.search is None:
            segment.search = self.retriever.new_segment(segment.codes, segment.lengths, segment.dense)
        start = len(self.passages)
        self.retriever.add_segment(segment.search, segment.deleted)
        self.segments.append(segment)
        self.passages.extend(segment.passages)
        for row in segment.live:
            self.doc_rows.setdefault(segment.passages[row].doc_id, []).append(start + int(row))
        self.df += segment.counts(segment.live)
        self._refresh_statistics()

    def _refresh_statistics(self) -> None:
        self.retriever.set_live_statistics(CorpusStatistics(max(1, len(self)), self.reference.avg_length, self.df))

    def live_statistics(self) -> dict[str, Any]:
        """Passages, mean length and latents in use over the live passages."""
        lengths = [s.lengths[s.live] for s in self.segments]
        joined = np.concatenate(lengths) if lengths else np.zeros(0)
        return {
            "passages": len(self),
            "avg_length": float(joined.mean()) if len(joined) else 0.0,
            "latents_in_use": int((self.df > 0).sum()),
        }

    # --- sanitisation --------------------------------------------------------------------
    @property
    def sanitizer(self) -> Sanitizer | None:
        """The index's `Sanitizer` (built on first use, once, under a lock); None when sanitisation is off."""
        if self.config.sanitize.mode == "off":
            return None
        if self._sanitizer is None:
            with self._sanitizer_lock:
                if self._sanitizer is None:
                    self._sanitizer = Sanitizer(self.config.sanitize, self._salt)
        return self._sanitizer

    def sanitize_query(self, query: str) -> str:
        """`query` as this index encodes it: sanitised like its documents unless sanitisation or
        `SanitizeConfig.queries` is off. Use it before logging or showing a query to an LLM."""
        sanitizer = self.sanitizer
        return query if sanitizer is None else sanitizer.sanitize_query(query)

    @property
    def stores_text(self) -> bool:
        """False when passages are stored without text (`store_text='none'`): hits then carry ids and
        offsets into the original documents (`passage`), which the caller resolves."""
        return self.config.sanitize.stored_text != "none"

    def passage(self, passage_id: str) -> Passage:
        """The stored record of a live passage: document id and character offsets (into the original
        document, or into the sanitised one with store_text 'redacted'), and its text if stored."""
        owners = [passage_id] + ([passage_id.rsplit("#", 1)[0]] if "#" in passage_id else [])
        for owner in owners:
            for row in self.doc_rows.get(owner, []):
                if self.passages[row].passage_id == passage_id:
                    return self.passages[row]
        raise QueryError(f"no live passage with id {passage_id!r}")

    def _read_texts(self, passages: list[Passage]) -> list[str]:
        """What the LLM reads of stored passages (to re-encode them): the stored text, sanitised again
        when the index stores the original ('full'); a ConfigError when it stores none."""
        if not self.stores_text:
            raise ConfigError(
                "store_text='none': the index keeps no passage text to re-encode; rebuild it from the corpus"
            )
        texts = [p.text for p in passages]
        sanitizer = self.sanitizer
        if sanitizer is not None and self.config.sanitize.stored_text == "full":
            texts = [sanitizer.sanitize(text).text for text in texts]
        return texts

    # --- searching -----------------------------------------------------------------------
    def encode_queries(self, queries: list[str]) -> sp.csr_matrix:
        """Pooled codes (n_queries, num_latents) of query texts, each sanitised first (`sanitize_query`)."""
        return self.encoder.encode_queries([self.sanitize_query(q) for q in queries]).codes

    def search(
        self,
        query: str,
        k: int = 10,
        mode: str | None = None,
        per_doc: bool = False,
        profile: Any = None,
        weight: float = 1.0,
    ) -> list[Hit]:
        """Top-k passages for one query, with scores, document ids and contributing latents;
        `per_doc` keeps only each document's best passage (k documents); `profile`, `weight` as in
        `batch_search`."""
        return self.batch_search([query], k, mode, per_doc, profile=profile, weight=weight)["0"]

    def batch_search(
        self,
        queries: dict[str, str] | list[str],
        k: int = 10,
        mode: str | None = None,
        per_doc: bool = False,
        profile: Any = None,
        weight: float = 1.0,
        codes: sp.csr_matrix | None = None,
    ) -> dict[str, list[Hit]]:
        """Top-k passages per query; `queries` is {qid: text} or a list (then qids are "0", "1", ...).

        With `per_doc`, hits are collapsed to each document's best passage, so that one long document
        cannot fill the results. `Hit.latents` always explains the exact sparse score, whatever the
        mode ranked by. A `profile` (`ragsae.routing.Profile` of this index) re-weights each query's
        latents by `weight` before scoring (`weight=0`: the plain search). `codes`: the queries' pooled
        codes (n_queries, num_latents) from this index's encoder, when already encoded (`Collections`
        captures a query once for several indexes).
        """
        queries = checked_queries(queries, k)
        if not queries:
            return {}
        if codes is not None and codes.shape != (len(queries), self.sae.num_latents):
            raise QueryError(f"codes: shape {codes.shape}, expected {(len(queries), self.sae.num_latents)}")
        qcodes = self.encode_queries(list(queries.values())) if codes is None else codes
        if profile is not None:
            qcodes = profile.reweight(self, qcodes, weight)
        retriever, passages = self._snapshot
        weights = retriever.query_weights(qcodes)
        n = max(1, retriever.live_rows)
        depth = min(int(k), n)  # no more hits than passages, however large k is
        if per_doc:
            depth = min(n, max(4 * depth, 100))
        while True:
            scores, ids = retriever.search(qcodes, depth, mode, weights)
            chosen = [self._keep(passages, row_ids, k, per_doc) for row_ids in ids]
            # Per document, search deeper until each query has k documents or every passage was seen.
            if not per_doc or depth == n or all(len(rows) == k for rows in chosen):
                break
            depth = min(n, 4 * depth)
        top = self.config.scoring.explain_top
        catalog = self.catalog
        results: dict[str, list[Hit]] = {}
        for row, qid in enumerate(queries):
            pids, hit_scores = ids[row][chosen[row]], scores[row][chosen[row]]
            explained = retriever.explain(weights[row], pids, top)
            results[qid] = [
                Hit(
                    passages[pid].passage_id,
                    passages[pid].doc_id,
                    float(score),
                    rank,
                    passages[pid].text,
                    latents,
                    [catalog.label(j) for j, _ in latents] if catalog is not None else [],
                )
                for rank, (pid, score, latents) in enumerate(zip(pids.tolist(), hit_scores, explained), 1)
            ]
        return results

    @staticmethod
    def _keep(passages: list[Passage], ids: np.ndarray, k: int, per_doc: bool) -> np.ndarray:
        """Positions in one query's ranked `ids` to return: the first k real hits (-1 pads), or with
        `per_doc` the first k passages of distinct documents."""
        if not per_doc:
            return np.flatnonzero(ids >= 0)[:k]
        seen: set[str] = set()
        kept = []
        for position, pid in enumerate(ids.tolist()):
            if pid >= 0 and passages[pid].doc_id not in seen:
                seen.add(passages[pid].doc_id)
                kept.append(position)
                if len(kept) == k:
                    break
        return np.array(kept, dtype=np.int64)

    # --- changing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One change at a time: in this process (a thread lock) and across processes (the folder's lock)."""
        with self._write_lock:
            if self.path is None:
                yield
                return
            lock = self.path / LOCK_FILE
            try:
                with exclusive_lock(lock):
                    on_disk = read_manifest(self.path)["generation"]
                    if on_disk != self.generation:
                        raise IndexFolderError(
                            f"{self.path}: changed by another process since it was loaded (generation "
                            f"{on_disk}, loaded {self.generation}); load it again"
                        )
                    yield
            except BlockingIOError:
                raise IndexFolderError(
                    f"{self.path}: another process (pid {lock_holder(lock)}) is changing this index; "
                    "try again when it has finished"
                ) from None

    def add(self, documents: Any, skip_empty: bool = False, progress: bool = False) -> dict[str, Any]:
        """Encode new documents with the index's SAE into a new segment; their ids must be new
        (`upsert` replaces). Returns the drift report of the new passages (also kept in `history`)."""
        return self._change(documents, replace_existing=False, skip_empty=skip_empty, progress=progress)

    def upsert(self, documents: Any, skip_empty: bool = False, progress: bool = False) -> dict[str, Any]:
        """Add documents, replacing the live documents with the same ids, in one change."""
        return self._change(documents, replace_existing=True, skip_empty=skip_empty, progress=progress)

    def delete(self, doc_ids: Iterable[str], missing_ok: bool = False) -> int:
        """Delete documents by id; the number of passages deleted. An id that is not a live document is
        a CorpusError unless `missing_ok`."""
        doc_ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
        with self._writing():
            missing = [d for d in doc_ids if d not in self.doc_rows]
            if missing and not missing_ok:
                raise CorpusError(f"no live document with id {', '.join(map(repr, missing[:5]))}")
            rows = self._rows_of([d for d in doc_ids if d in self.doc_rows])
            if len(rows):
                self._commit_and_apply(deleted_rows=rows)
            return len(rows)

    def _rows_of(self, doc_ids: list[str]) -> np.ndarray:
        return np.array(sorted({r for d in doc_ids for r in self.doc_rows.get(d, [])}), dtype=np.int64)

    def _change(self, documents: Any, replace_existing: bool, skip_empty: bool, progress: bool) -> dict[str, Any]:
        docs = load_documents(documents, skip_empty=skip_empty)
        with self._writing():
            ids = [d.doc_id for d in docs]
            existing = [d for d in ids if d in self.doc_rows]
            if existing and not replace_existing:
                raise CorpusError(
                    f"document id {existing[0]!r} is already in the index ({len(existing)} such); "
                    "use upsert to replace documents"
                )
            replaced = self._rows_of(existing)
            capture = self.config.capture
            prepared = self._prepare(docs)
            passages = prepared.stored
            clash = [p.passage_id for p in passages if self._is_live_passage_id(p.passage_id, set(existing))]
            if clash:
                raise CorpusError(f"passage id {clash[0]!r} of a new document is already a live passage's id")
            acts = passage_activations(self.llm, prepared.texts, capture, self.encoder.cache, progress)
            pooled = self.encoder.pool_activations(acts, progress)
            segment = self._segment(passages, storage_precision(pooled.codes), pooled.lengths)
            report = self._drift(acts.values, segment, replaced, "upsert" if replace_existing else "add")
            audit = self.sanitize_audit
            if prepared.audit is not None:
                audit = prepared.audit if audit is None else audit + prepared.audit
            self._commit_and_apply(new_segment=segment, deleted_rows=replaced, report=report, audit=audit)
            if report["needs_retrain"]:
                logger.warning("drift: %s (ragsae retrain)", "; ".join(report["reasons"]))
            return report

    def _is_live_passage_id(self, passage_id: str, leaving: set[str]) -> bool:
        """Whether a live passage (of a document not in `leaving`) has this id: a one-passage document's
        id, or `ID#N` of a longer document `ID` (`text/passages.py`). Cost independent of the index size."""
        owners = [passage_id]
        if "#" in passage_id:
            owners.append(passage_id.rsplit("#", 1)[0])
        return any(
            self.passages[row].passage_id == passage_id
            for owner in owners
            if owner not in leaving
            for row in self.doc_rows.get(owner, [])
        )

    def _prepare(self, docs: list[Document]) -> PreparedPassages:
        """`build.prepare_passages` of documents with this index's sanitiser and store_text."""
        sanitize = self.config.sanitize
        return prepare_passages(docs, self.llm.tokenizer, self.config.capture, self.sanitizer, sanitize.stored_text)

    def drift(self, documents: Any, skip_empty: bool = False, progress: bool = False) -> dict[str, Any]:
        """The drift report `add` would give for these documents, without adding them."""
        docs = load_documents(documents, skip_empty=skip_empty)
        capture = self.config.capture
        prepared = self._prepare(docs)
        acts = passage_activations(self.llm, prepared.texts, capture, self.encoder.cache, progress)
        pooled = self.encoder.pool_activations(acts, progress)
        segment = self._segment(prepared.stored, storage_precision(pooled.codes), pooled.lengths)
        return self._drift(acts.values, segment, np.zeros(0, dtype=np.int64), "check")

    def _drift(
        self, token_values: np.ndarray, segment: Segment, replaced: np.ndarray, operation: str
    ) -> dict[str, Any]:
        """Drift of a new segment against the live passages (those it replaces left out)."""
        indexed = self.df - self._counts_of_rows(replaced)
        live = np.concatenate([s.live + int(o) for s, o in zip(self.segments, self.retriever.view.offsets)])
        live = np.setdiff1d(live, replaced)
        # The baseline sample is at most half the index, so that it differs from the whole.
        rng = np.random.default_rng(len(live))
        sample = np.sort(rng.choice(live, min(len(live) // 2, segment.rows), replace=False))
        return drift_report(
            self.sae,
            token_values,
            segment.counts(),
            segment.rows,
            indexed,
            len(live),
            self._counts_of_rows(sample),
            len(sample),
            self.config.drift,
            operation,
        )

    def _counts_of_rows(self, rows: np.ndarray) -> np.ndarray:
        counts = np.zeros(self.sae.num_latents, dtype=np.int64)
        if len(rows) == 0:
            return counts
        segment_of, local = self.retriever.view.locate(np.asarray(rows, dtype=np.int64))
        for s in np.unique(segment_of):
            counts += self.segments[s].counts(local[segment_of == s])
        return counts

    def compact(self, progress: bool = False) -> dict[str, Any]:
        """Merge every segment into one, leaving deleted passages out; what was merged."""
        with self._writing():
            before = {
                "segments": len(self.segments),
                "rows": len(self.passages),
                "deleted": len(self.passages) - len(self),
            }
            if len(self) == 0:
                raise IndexFolderError("every passage is deleted: nothing to compact into (add documents first)")
            codes = sp.vstack([s.codes[s.live] for s in self.segments], format="csr")
            dropped = sp.vstack([s.dropped[s.live] for s in self.segments], format="csr")
            lengths = np.concatenate([s.lengths[s.live] for s in self.segments])
            passages = [s.passages[i] for s in self.segments for i in s.live]
            merged = Segment(passages, codes, dropped, lengths, self.sae_version, np.zeros(len(passages), dtype=bool))
            merged.search = self.retriever.new_segment(codes, lengths)
            self._commit_and_apply(new_segment=merged, replace_all=True)
            return {**before, "after": {"segments": 1, "rows": len(passages)}}

    def retrain(
        self,
        from_current: bool = True,
        epochs: int | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Train a new SAE version on the live passages (continuing from the current SAE, the light
        re-training, or from scratch), re-encode them into one segment and swap it in atomically.
        Returns the new version's record, with a comparison to the previous SAE."""
        with self._writing():
            if len(self) == 0:
                raise IndexFolderError("every passage is deleted: nothing to train on")
            passages = [s.passages[i] for s in self.segments for i in s.live]
            texts = self._read_texts(passages)
            capture = self.config.capture
            sae_config = self.sae.config if epochs is None else replace(self.sae.config, epochs=epochs)
            acts = passage_activations(self.llm, texts, capture, self.encoder.cache, progress)
            start = self.sae if from_current else None
            trained, report = fit_sae(self.llm, texts, acts, capture, sae_config, progress, start)
            trained = trained.to(self.llm.device).eval()
            encoder = CodeEncoder(self.llm, trained, capture, self.encoder.pooling, self.encoder.cache)
            read = [dataclasses.replace(p, text=t) for p, t in zip(passages, texts)]
            pooled, catalog = pool_and_describe(encoder, read, acts, self.catalog is not None, progress)
            codes = storage_precision(pooled.codes)
            reference = CorpusStatistics.of(codes, pooled.lengths)
            trained.metadata["reference"] = reference.to_json()
            comparison = compare_saes(self.sae, trained, self.df > 0, reference.df > 0)
            version = max(v["version"] for v in self.sae_versions) + 1
            record = version_record(
                version, trained, self.sae_version, f"v{self.sae_version}" if from_current else "scratch", len(passages)
            )
            record["comparison"] = comparison
            successor = Index(encoder, replace(self.config, sae=trained.config), self.path)
            successor.sae_version = version
            successor._catalog = catalog
            segment = successor._segment(passages, codes, pooled.lengths)
            self._commit_and_apply(new_segment=segment, replace_all=True, new_sae=(successor, record))
            return record

    def _commit_and_apply(
        self,
        new_segment: Segment | None = None,
        deleted_rows: np.ndarray | None = None,
        report: dict[str, Any] | None = None,
        replace_all: bool = False,
        new_sae: tuple[Index, dict[str, Any]] | None = None,
        audit: Audit | None = None,
    ) -> None:
        """Write one change (when the index has a folder), then apply it in memory. Nothing in memory
        changes unless the change was committed. `audit`: the sanitisation audit after the change
        (None: unchanged)."""
        segments = [] if replace_all else [replace(s) for s in self.segments]
        if deleted_rows is not None and len(deleted_rows):
            segment_of, local = self.retriever.view.locate(deleted_rows)
            for s in np.unique(segment_of):
                segments[s].deleted = segments[s].deleted.copy()
                segments[s].deleted[local[segment_of == s]] = True
        if new_segment is not None:
            segments.append(new_segment)
        history = self.history + ([report] if report is not None else [])
        versions = self.sae_versions + ([new_sae[1]] if new_sae else [])
        current = new_sae[1]["version"] if new_sae else self.sae_version
        generation = self.generation + 1
        audit = audit if audit is not None else self.sanitize_audit
        rebuilt = replace_all or new_sae is not None
        serving = self.serving
        if serving is not None and rebuilt:  # rows renumber: a new collection, never the old one changed
            serving = {**serving, "collection": next_collection(serving["collection"])}
        if self.path is not None:
            sae = new_sae[0].sae if new_sae else None
            catalog = new_sae[0]._catalog if new_sae else None
            unchanged_on_os_error(
                lambda: self._write_change(
                    segments, history, versions, current, generation, sae, audit, catalog, serving
                ),
                self.path,
            )
        # Committed: apply in memory.
        if new_sae is not None:
            successor = new_sae[0]
            self.encoder, self.config, self.reference = successor.encoder, successor.config, successor.reference
            self.sae_version = current
            with self._catalog_lock:
                self._catalog, self._catalog_loaded = successor._catalog, True
        if replace_all or new_sae is not None:
            self._rebuild(segments)
        else:
            if deleted_rows is not None and len(deleted_rows):
                self.df -= self._counts_of_rows(deleted_rows)
                self.retriever.delete_rows(deleted_rows)
                gone = set(deleted_rows.tolist())
                for doc in {self.passages[r].doc_id for r in gone}:
                    rows = [r for r in self.doc_rows[doc] if r not in gone]
                    if rows:
                        self.doc_rows[doc] = rows
                    else:
                        del self.doc_rows[doc]
            self.segments = segments[: len(self.segments)]
            if new_segment is not None:
                self._append(new_segment)
            else:
                self._refresh_statistics()
        self.history, self.sae_versions, self.generation = history, versions, generation
        self.sanitize_audit = audit
        if serving is not None:
            self._sync_serving(serving, deleted_rows, new_segment is not None, rebuilt)

    # --- the Milvus serving copy ----------------------------------------------------------------------
    def _connect_serving(self, record: dict[str, Any]) -> MilvusBackend:
        return MilvusBackend.connect(
            resolve_uri(record["uri"], self.path),
            record["collection"],
            self.sae.num_latents,
            self.sae.d_model,
            self._milvus_token or uri_token(None),
        )

    def _fill_serving(self, record: dict[str, Any], generation: int) -> None:
        """Fill the collection `record` names with every live passage and serve from it."""
        engine = self._connect_serving(record)
        fill(engine, self.retriever.view, self.passages, generation)
        self.serving, self.engine = record, engine
        self.retriever.engine = engine

    def _sync_serving(
        self, record: dict[str, Any], deleted_rows: np.ndarray | None, added: bool, rebuilt: bool
    ) -> None:
        """Bring the Milvus collection in step with a committed change: rows deleted and added, or a new
        collection when rows were renumbered (the old one dropped after). On failure, searches are served
        from the segments and the next `load` fills the collection again."""
        old = self.engine
        try:
            if rebuilt or old is None or old.collection != record["collection"]:
                self._fill_serving(record, self.generation)
                if old is not None and old.collection != record["collection"]:
                    old.drop()
                return
            if deleted_rows is not None and len(deleted_rows):
                old.delete(deleted_rows)
            if added:
                view = self.retriever.view
                for records in view_records(view, self.passages, [len(view.segments) - 1]):
                    old.insert(records)
                old.flush()
            old.mark(self.generation)
        except (MilvusUnavailable, IndexFolderError) as error:
            logger.error("%s; searching the index's segments until it is filled again (by Index.load)", error)
            self.serving, self.engine = record, None
            self.retriever.engine = None

    def _reconnect_serving(self, generation: int) -> None:
        """Connect to the manifest's collection at load; fill it again (under the write lock) when it is
        missing or out of step with the index, or serve from the segments if another process is writing."""
        assert self.serving is not None
        engine = self._connect_serving(self.serving)
        if not engine.in_step(len(self), generation):
            logger.warning(
                "the Milvus collection %r at %s is not in step with %s; filling it from the index's segments",
                engine.collection,
                engine.uri,
                self.path,
            )
            try:
                with self._writing():
                    fill(engine, self.retriever.view, self.passages, generation)
            except (IndexFolderError, MilvusUnavailable) as error:
                logger.warning("%s; searching the index's segments", error)
                return
        self.engine = engine
        self.retriever.engine = engine

    def _rebuild(self, segments: list[Segment]) -> None:
        """Search state made anew from `segments` (after a compaction or a new SAE version), then swapped in."""
        fresh = Index(self.encoder, self.config, self.path)
        for segment in segments:
            fresh._append(segment)
        self.retriever, self.segments, self.passages = fresh.retriever, fresh.segments, fresh.passages
        self.doc_rows, self.df = fresh.doc_rows, fresh.df
        self._snapshot = fresh._snapshot

    def _write_change(
        self,
        segments: list[Segment],
        history: list[dict[str, Any]],
        versions: list[dict[str, Any]],
        current: int,
        generation: int,
        new_sae: SparseAutoencoder | None,
        audit: Audit | None,
        new_catalog: LatentCatalog | None = None,
        serving: dict[str, Any] | None = None,
    ) -> None:
        """New files under new names, then the manifest (the commit), then what it no longer names goes."""
        assert self.path is not None
        root = self.path
        named = self._write_files(
            root, segments, history, versions, current, generation, new_sae, False, audit, new_catalog, serving
        )
        write_manifest(root, named)
        removed = collect_garbage(root, named)
        logger.debug("committed generation %d of %s; removed %d stale files", generation, root, len(removed))

    def _write_files(
        self,
        root: Path,
        segments: list[Segment],
        history: list[dict[str, Any]],
        versions: list[dict[str, Any]],
        current: int,
        generation: int,
        new_sae: SparseAutoencoder | None,
        fresh: bool,
        audit: Audit | None,
        new_catalog: LatentCatalog | None = None,
        serving: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write whatever of this state is not on disk at `root` yet (everything when `fresh`, the
        hash-mode salt file included); the manifest that describes it, not yet written."""
        if fresh and self._salt is not None and self.config.sanitize.salt_env is None:
            write_salt(root / SALT_FILE, self._salt)
        number = 1 if fresh else next_segment_number(root)
        for segment in segments:
            if fresh or segment.name is None:
                name = segment_folder(number)
                number += 1
                assert segment.search is not None
                segment.files = write_segment(root / name, segment, segment.search.dense)
                segment.name, segment.deletes = name, None
            if segment.deleted.any() and (fresh or not segment.deletes_written):
                assert segment.name is not None
                file = deletes_file(segment.name, generation)
                segment.deletes = {"file": file, **write_deletes(root / file, segment.deleted)}
        for record in versions:
            if record["version"] == current and (fresh or new_sae is not None):
                sae = new_sae if new_sae is not None else self.sae
                record["folder"] = sae_version_folder(current)
                record["weights_sha256"] = sae.save(root / record["folder"])
                record["files"] = sae_files(root, record["folder"])
                record["latents"] = write_catalog(root, record["folder"], new_catalog if new_sae else self.catalog)
            elif fresh:
                record["folder"], record["files"] = None, None  # lineage only: the weights stay behind
        history_record = None
        if history:
            file = history_file(generation)
            (root / file).parent.mkdir(exist_ok=True)
            with atomic_output(root / file, "w", durable=True) as handle:
                handle.writelines(_json_line(report) for report in history)
            history_record = {
                "file": file,
                "sha256": file_sha256(root / file),
                "reports": len(history),
                "needs_retrain": bool(history[-1]["needs_retrain"]),
                "last": history[-1],
            }
        return build_manifest(
            created=self.created,
            generation=generation,
            llm={
                "model_id": self.llm.model_id,
                "model_hash": self.llm.model_hash,
                "compute_dtype": self.llm.dtype_name,
                **to_dict(self.config.llm),
            },
            config=to_dict(self.config),
            sae_versions=versions,
            current_sae=current,
            segments=segments,
            history=history_record,
            library_versions=library_versions(),
            sanitize_audit=audit.to_dict() if audit is not None else None,
            salt_fingerprint=salt_fingerprint(self._salt) if self._salt is not None else None,
            serving=serving,
        )

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the whole index as a new folder, atomically (a crash leaves what was at `path` before).
        Older SAE versions are kept as lineage records, without their weights."""
        path = Path(path)
        check_writable(path, overwrite)
        with self._write_lock:
            segments = [replace(s) for s in self.segments]
            versions = [dict(v) for v in self.sae_versions]
            generation = self.generation + 1
            serving = moved_record(self.serving, path) if self.serving is not None else None
            if serving is not None and resolve_uri(serving["uri"], path) != serving["uri"]:
                release_lite(resolve_uri(serving["uri"], path))  # a Lite store inside `path` goes with the folder

            def write() -> dict[str, Any]:
                with atomic_folder(path) as tmp:
                    manifest = self._write_files(
                        tmp,
                        segments,
                        self.history,
                        versions,
                        self.sae_version,
                        generation,
                        None,
                        True,
                        self.sanitize_audit,
                        serving=serving,
                    )
                    write_manifest(tmp, manifest)
                return manifest

            unchanged_on_os_error(write, path)
            self.segments, self.sae_versions, self.generation, self.path = segments, versions, generation, path
            if serving is not None:
                try:
                    self._fill_serving(serving, generation)
                except MilvusUnavailable as error:
                    raise IndexFolderError(
                        f"{path}: saved, but filling its Milvus collection failed ({error}); Index.load fills it"
                    ) from None
            return path

    @staticmethod
    def read_manifest(path: str | Path) -> dict[str, Any]:
        """The validated manifest of an index folder."""
        return read_manifest(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        llm: LoadedLlm | None = None,
        mode: SearchMode | None = None,
        device: str | None = None,
    ) -> Index:
        """Open an index folder, verifying checksums, shapes, the SAE and the LLM against the manifest."""
        path = Path(path)
        contents = read_index_folder(path)
        config, manifest = contents.config, contents.manifest
        if mode is not None:
            config = replace(config, scoring=replace(config.scoring, mode=mode))
        if device is not None:
            config = replace(config, llm=replace(config.llm, device=device))
        salt = index_salt(path, config.sanitize, manifest)
        llm = llm or load_llm(config.llm)
        if llm.model_hash != manifest["llm"]["model_hash"]:
            raise IndexFolderError(
                f"{path}: built with LLM {manifest['llm']['model_id']} (hash {manifest['llm']['model_hash'][:12]}), "
                f"but {llm.model_id} (hash {llm.model_hash[:12]}) was given"
            )
        sae = contents.sae
        check_sae_matches(sae, llm, config.capture, str(cls.current_sae_folder(path)))
        encoder = CodeEncoder(llm, sae.to(llm.device), config.capture, config.scoring.pooling)
        index = cls(encoder, config, path)
        index.sae_version = manifest["sae"]["current"]
        index.sae_versions = manifest["sae"]["versions"]
        index.generation, index.created, index.history = manifest["generation"], manifest["created"], contents.history
        index._salt = salt
        audit = manifest.get("sanitize_audit")
        index.sanitize_audit = Audit.from_dict(audit) if audit is not None else None
        for segment in contents.segments:
            index._append(segment)
        if manifest.get("serving") is not None:
            index.serving = manifest["serving"]
            index._reconnect_serving(index.generation)
        return index

    def info(self) -> dict[str, Any]:
        """Summary for `ragsae info`."""
        nonzeros = sum(int(s.codes[s.live].nnz) for s in self.segments)
        last = self.history[-1] if self.history else None
        return {
            "path": str(self.path) if self.path else None,
            "llm": self.llm.model_id,
            "layer": self.config.capture.layer,
            "sae": {
                "version": self.sae_version,
                "architecture": self.sae.config.architecture,
                "num_latents": self.sae.num_latents,
                "k": self.sae.config.k,
                **{key: self.sae.metadata[key] for key in ("train", "fidelity") if key in self.sae.metadata},
            },
            "sae_versions": [
                {key: v.get(key) for key in ("version", "parent", "started_from", "created", "passages", "comparison")}
                for v in self.sae_versions
            ],
            "passages": len(self),
            "documents": len(self.doc_rows),
            "segments": len(self.segments),
            "deleted_rows": len(self.passages) - len(self),
            "generation": self.generation,
            "mean_active_latents_per_passage": nonzeros / max(1, len(self)),
            "live": self.live_statistics(),
            "reference": {"passages": self.reference.passages, "avg_length": self.reference.avg_length},
            "needs_retrain": bool(last and last["needs_retrain"]),
            "last_drift": last,
            "drift_reports": len(self.history),
            "scoring": to_dict(self.config.scoring),
            "sanitize": self.sanitize_info(),
            "serving": self.serving,
        }

    def sanitize_info(self) -> dict[str, Any]:
        """Sanitisation settings (store_text resolved), the audit and the salt's fingerprint (never the salt)."""
        sanitize = self.config.sanitize
        return {
            "mode": sanitize.mode,
            "store_text": sanitize.stored_text,
            "entities": list(sanitize.entities) if sanitize.entities is not None else None,
            "queries": sanitize.queries,
            "audit": self.sanitize_audit.to_dict() if self.sanitize_audit is not None else None,
            "salt_fingerprint": salt_fingerprint(self._salt) if self._salt is not None else None,
        }


def new_index_salt(config: SanitizeConfig) -> bytes | None:
    """The hash-mode salt of a new index: from `config.salt_env`, else new random bytes (written to the
    index folder on save); None in other modes."""
    if config.mode != "hash":
        return None
    return env_salt(config) or new_salt()


def index_salt(path: Path, config: SanitizeConfig, manifest: dict[str, Any]) -> bytes | None:
    """The hash-mode salt of an index folder (from `salt_env` or its `SALT_FILE`), checked against the
    manifest's fingerprint: a query hashed with another salt would silently match nothing."""
    if config.mode != "hash":
        return None
    try:
        salt = resolve_salt(config, path / SALT_FILE)
    except ConfigError as error:
        raise IndexFolderError(f"{path}: {error}") from None
    assert salt is not None
    expected = manifest.get("salt_fingerprint")
    if expected is not None and salt_fingerprint(salt) != expected:
        source = f"${config.salt_env}" if config.salt_env else str(path / SALT_FILE)
        raise IndexFolderError(
            f"{path}: the hash-mode salt from {source} is not the one this index was built with (fingerprint "
            f"{salt_fingerprint(salt)}, the manifest says {expected}); its placeholders would not match"
        )
    return salt


def checked_queries(queries: dict[str, str] | list[str], k: int) -> dict[str, str]:
    """Queries of a search as {qid: text} (a list gets qids "0", "1", ...), after QueryError for a `k` that
    is not a whole number >= 1 or a query that is not a non-empty string."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QueryError(f"k must be a whole number >= 1, got {k!r}")
    if isinstance(queries, list):
        queries = {str(i): q for i, q in enumerate(queries)}
    if not isinstance(queries, dict):
        raise QueryError(f"queries must be a list or a dict of strings, got {type(queries).__name__}")
    for qid, text in queries.items():
        if not isinstance(text, str):
            raise QueryError(f"query {qid!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise QueryError(f"query {qid!r} is empty")
    return queries


def version_record(
    version: int, sae: SparseAutoencoder, parent: int | None, started_from: str, passages: int
) -> dict[str, Any]:
    """An SAE version's manifest entry (its folder and file checksums are added when it is written)."""
    return {
        "version": version,
        "folder": None,
        "files": None,
        "architecture": sae.config.architecture,
        "num_latents": sae.num_latents,
        "k": sae.config.k,
        "created": now(),
        "parent": parent,
        "started_from": started_from,
        "passages": passages,
        "train": sae.metadata.get("train"),
        "fidelity": sae.metadata.get("fidelity"),
    }


def _json_line(report: dict[str, Any]) -> str:
    return json.dumps(report, sort_keys=True) + "\n"
