"""`Index`: passages, their codes and the retriever over them; built, saved, loaded and searched."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..config import BuildConfig, SearchMode, to_dict
from ..encode import CodeEncoder, PooledCodes, check_sae_matches
from ..errors import IndexFolderError, QueryError
from ..layout import SAE_DIR
from ..lm import LoadedLlm, load_llm
from ..retrieval import Backend, Retriever
from ..sae import SparseAutoencoder, TrainReport
from ..storage import storage_precision
from ..text import Passage
from .build import encode_corpus
from .folder import IndexParts, check_writable, read_index_folder, read_manifest, write_index_folder
from .hit import Hit

logger = logging.getLogger(__name__)


class Index:
    """Passages, their pooled SAE codes and the machinery to search them.

    Build with `Index.build(corpus)`, reopen with `Index.load(path)`, query with `search`.
    Searching is safe from several threads at once.
    """

    def __init__(
        self,
        encoder: CodeEncoder,
        passages: list[Passage],
        pooled: PooledCodes,
        config: BuildConfig,
        dense: Backend | None = None,
        path: Path | None = None,
        sae_report: TrainReport | None = None,
        idf: np.ndarray | None = None,
    ):
        self.encoder = encoder
        self.passages = passages
        self.config = config
        self.path = path
        self.sae_report = sae_report
        w_dec = encoder.sae.W_dec.detach().cpu().numpy()
        # Codes are searched at the precision they are stored in, so a loaded index scores as built.
        pooled = PooledCodes(storage_precision(pooled.codes), pooled.lengths)
        self.retriever = Retriever(pooled.codes, pooled.lengths, w_dec, config.scoring, dense, idf)
        self.pooled = PooledCodes(self.retriever.codes, pooled.lengths)  # pruned when max_latents is set

    @property
    def llm(self) -> LoadedLlm:
        return self.encoder.llm

    @property
    def sae(self) -> SparseAutoencoder:
        return self.encoder.sae

    def __len__(self) -> int:
        return len(self.passages)

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
    ) -> Index:
        """Split, capture, (train an SAE,) encode and index a corpus; saved to `path` when given.

        Args:
            corpus: JSONL file, BEIR folder, folder of .txt/.md files, or an iterable of
                strings, dicts or `Document`s.
            sae: an SAE (or its folder) to reuse; None trains one on the corpus.
            cache_dir: where to cache captured activations (None: no cache).
        """
        config = config or BuildConfig()
        if path is not None:
            check_writable(path, overwrite, Path(corpus) if isinstance(corpus, (str, Path)) else None)
        built = encode_corpus(corpus, config, sae, llm, skip_empty, cache_dir, progress)
        index = cls(built.encoder, built.passages, built.pooled, built.config, sae_report=built.sae_report)
        if path is not None:
            index.save(path, overwrite=overwrite)
        return index

    # --- searching -----------------------------------------------------------------------
    def encode_queries(self, queries: list[str]) -> sp.csr_matrix:
        """Pooled codes (n_queries, num_latents) of query texts."""
        return self.encoder.encode_queries(queries).codes

    def search(self, query: str, k: int = 10, mode: str | None = None, per_doc: bool = False) -> list[Hit]:
        """Top-k passages for one query, with scores, document ids and contributing latents;
        `per_doc` keeps only each document's best passage (k documents)."""
        return self.batch_search([query], k, mode, per_doc)["0"]

    def batch_search(
        self, queries: dict[str, str] | list[str], k: int = 10, mode: str | None = None, per_doc: bool = False
    ) -> dict[str, list[Hit]]:
        """Top-k passages per query; `queries` is {qid: text} or a list (then qids are "0", "1", ...).

        With `per_doc`, hits are collapsed to each document's best passage, so that one long document
        cannot fill the results. `Hit.latents` always explains the exact sparse score, whatever the
        mode ranked by.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a whole number >= 1, got {k!r}")
        if isinstance(queries, list):
            queries = {str(i): q for i, q in enumerate(queries)}
        if not isinstance(queries, dict):
            raise QueryError(f"queries must be a list or a dict of strings, got {type(queries).__name__}")
        if not queries:
            return {}
        for qid, text in queries.items():
            if not isinstance(text, str):
                raise QueryError(f"query {qid!r} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise QueryError(f"query {qid!r} is empty")
        qcodes = self.encode_queries(list(queries.values()))
        weights = self.retriever.query_weights(qcodes)
        n = len(self.passages)
        depth = min(int(k), n)  # no more hits than passages, however large k is
        if per_doc:
            depth = min(n, max(4 * depth, 100))
        while True:
            scores, ids = self.retriever.search(qcodes, depth, mode, weights)
            chosen = [self._keep(row_ids, k, per_doc) for row_ids in ids]
            # Per document, search deeper until each query has k documents or every passage was seen.
            if not per_doc or depth == n or all(len(rows) == k for rows in chosen):
                break
            depth = min(n, 4 * depth)
        top = self.config.scoring.explain_top
        results: dict[str, list[Hit]] = {}
        for row, qid in enumerate(queries):
            pids, hit_scores = ids[row][chosen[row]], scores[row][chosen[row]]
            explained = self.retriever.explain(weights[row], pids, top)
            results[qid] = [
                Hit(
                    self.passages[pid].passage_id,
                    self.passages[pid].doc_id,
                    float(score),
                    rank,
                    self.passages[pid].text,
                    latents,
                )
                for rank, (pid, score, latents) in enumerate(zip(pids.tolist(), hit_scores, explained), 1)
            ]
        return results

    def _keep(self, ids: np.ndarray, k: int, per_doc: bool) -> np.ndarray:
        """Positions in one query's ranked `ids` to return: the first k real hits (-1 pads), or with
        `per_doc` the first k passages of distinct documents."""
        if not per_doc:
            return np.flatnonzero(ids >= 0)[:k]
        seen: set[str] = set()
        kept = []
        for position, pid in enumerate(ids.tolist()):
            if pid >= 0 and self.passages[pid].doc_id not in seen:
                seen.add(self.passages[pid].doc_id)
                kept.append(position)
                if len(kept) == k:
                    break
        return np.array(kept, dtype=np.int64)

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the index folder atomically (`index/folder.py`)."""
        path = Path(path)
        check_writable(path, overwrite)
        parts = IndexParts(
            self.config,
            self.sae,
            self.passages,
            self.pooled.codes,
            self.pooled.lengths,
            self.retriever.idf,
            self.retriever.dense,
        )
        self.path = write_index_folder(path, self.llm, parts, self.sae_report)
        return self.path

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
        llm = llm or load_llm(config.llm)
        if llm.model_hash != manifest["llm"]["model_hash"]:
            raise IndexFolderError(
                f"{path}: built with LLM {manifest['llm']['model_id']} (hash {manifest['llm']['model_hash'][:12]}), "
                f"but {llm.model_id} (hash {llm.model_hash[:12]}) was given"
            )
        sae = contents.sae
        check_sae_matches(sae, llm, config.capture, str(path / SAE_DIR))
        encoder = CodeEncoder(llm, sae.to(llm.device), config.capture, config.scoring.pooling)
        pooled = PooledCodes(contents.codes, contents.lengths)
        return cls(encoder, contents.passages, pooled, config, contents.dense, path, idf=contents.idf)

    def info(self) -> dict[str, Any]:
        """Summary for `ragsae info`."""
        codes = self.pooled.codes
        return {
            "path": str(self.path) if self.path else None,
            "llm": self.llm.model_id,
            "layer": self.config.capture.layer,
            "sae": {
                "architecture": self.sae.config.architecture,
                "num_latents": self.sae.num_latents,
                "k": self.sae.config.k,
                **({"train": self.sae.metadata["train"]} if "train" in self.sae.metadata else {}),
            },
            "passages": len(self.passages),
            "documents": len({p.doc_id for p in self.passages}),
            "mean_active_latents_per_passage": float(codes.nnz / max(1, codes.shape[0])),
            "scoring": to_dict(self.config.scoring),
        }
