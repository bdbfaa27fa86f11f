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
from .folder import occupied, read_index_folder, read_manifest, write_index_folder
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
        if path is not None and occupied(path) and not overwrite:
            raise IndexFolderError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
        built = encode_corpus(corpus, config, sae, llm, skip_empty, cache_dir, progress)
        index = cls(built.encoder, built.passages, built.pooled, built.config, sae_report=built.sae_report)
        if path is not None:
            index.save(path, overwrite=overwrite)
        return index

    # --- searching -----------------------------------------------------------------------
    def encode_queries(self, queries: list[str]) -> sp.csr_matrix:
        """Pooled codes (n_queries, num_latents) of query texts."""
        return self.encoder.encode_queries(queries).codes

    def search(self, query: str, k: int = 10, mode: str | None = None) -> list[Hit]:
        """Top-k passages for one query, with scores, document ids and contributing latents."""
        return self.batch_search([query], k, mode)["0"]

    def batch_search(
        self, queries: dict[str, str] | list[str], k: int = 10, mode: str | None = None
    ) -> dict[str, list[Hit]]:
        """Top-k passages per query; `queries` is {qid: text} or a list (then qids are "0", "1", ...).

        `Hit.latents` always explains the exact sparse score, whatever the mode ranked by.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a whole number >= 1, got {k!r}")
        k = min(int(k), len(self.passages))  # no more hits than passages, however large k is
        if isinstance(queries, list):
            queries = {str(i): q for i, q in enumerate(queries)}
        if not queries:
            return {}
        for qid, text in queries.items():
            if not isinstance(text, str):
                raise QueryError(f"query {qid!r} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise QueryError(f"query {qid!r} is empty")
        qcodes = self.encode_queries(list(queries.values()))
        weights = self.retriever.query_weights(qcodes)
        scores, ids = self.retriever.search(qcodes, k, mode, weights)
        top = self.config.scoring.explain_top
        results: dict[str, list[Hit]] = {}
        for row, qid in enumerate(queries):
            found = ids[row] >= 0  # -1 pads fewer than k hits
            pids, hit_scores = ids[row][found], scores[row][found]
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

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the index folder atomically (`index/folder.py`)."""
        path = Path(path)
        if occupied(path) and not overwrite:
            raise IndexFolderError(f"{path}: already exists (pass overwrite=True to replace it)")
        self.path = write_index_folder(
            path,
            self.llm,
            self.sae,
            self.config,
            self.passages,
            self.pooled.codes,
            self.pooled.lengths,
            self.retriever.idf,
            self.retriever.dense,
            self.sae_report,
        )
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
