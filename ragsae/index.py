"""The on-disk index: manifest, CSR codes, FAISS index, passage store and SAE, built and loaded with checks."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from . import __version__
from .capture import ActivationCache, check_layer
from .config import BuildConfig, to_dict
from .corpus import Passage, fingerprint, load_documents, split_passages
from .encode import CodeEncoder, PooledCodes
from .llm import LoadedLlm, load_llm
from .retrieve import FaissSearcher, Hit, Retriever
from .sae import SparseAutoencoder, TrainReport, train_sae
from .storage import (
    file_sha256,
    load_compact_csr,
    read_versioned_json,
    save_compact_csr_atomic,
    storage_precision,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 3
"""3: compact codes (uint16 latent ids, 8-bit log-scale values) and an 8-bit scalar-quantised FAISS
index; the manifest's capture config records the passage prefix. (2: float16 values, no passage prefix.)"""
MANIFEST_FILE = "manifest.json"
CODES_FILE = "codes.npz"
LENGTHS_FILE = "lengths.npy"
IDF_FILE = "idf.npy"
DOCIDS_FILE = "docids.txt"
PASSAGES_FILE = "passages.jsonl"
FAISS_FILE = "faiss.index"
SAE_DIR = "sae"
CHECKED_FILES = (CODES_FILE, LENGTHS_FILE, IDF_FILE, DOCIDS_FILE, PASSAGES_FILE, FAISS_FILE)


class IndexFolderError(ValueError):
    """An index folder that cannot be written or read as asked; the message names the file or field."""


def occupied(path: str | Path) -> bool:
    """True when `path` exists and is not an empty folder (an empty folder may be built into)."""
    path = Path(path)
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def library_versions() -> dict[str, str]:
    import faiss
    import scipy
    import transformers

    return {
        "ragsae": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def check_sae_matches(sae: SparseAutoencoder, llm: LoadedLlm, layer: int, source: str) -> None:
    """Refuse an SAE trained on another LLM, layer or width."""
    if sae.d_model != llm.d_model:
        raise IndexFolderError(f"SAE {source}: d_model {sae.d_model} but {llm.model_id} has hidden size {llm.d_model}")
    meta = sae.metadata
    if meta.get("llm_hash") not in (None, llm.model_hash):
        raise IndexFolderError(
            f"SAE {source} was trained on {meta.get('llm_id')} (hash {str(meta.get('llm_hash'))[:12]}), "
            f"not on {llm.model_id} (hash {llm.model_hash[:12]})"
        )
    if meta.get("layer") not in (None, layer):
        raise IndexFolderError(f"SAE {source} was trained on layer {meta.get('layer')}, the index uses layer {layer}")


class Index:
    """Passages, their pooled SAE codes and the machinery to search them.

    Build with `Index.build(corpus)`, reopen with `Index.load(path)`, query with `search`.
    """

    def __init__(
        self,
        encoder: CodeEncoder,
        passages: list[Passage],
        pooled: PooledCodes,
        config: BuildConfig,
        faiss_searcher: FaissSearcher | None = None,
        path: Path | None = None,
        sae_report: TrainReport | None = None,
        idf: np.ndarray | None = None,
    ):
        self.encoder = encoder
        self.passages = passages
        self.pooled = pooled
        self.config = config
        self.path = path
        self.sae_report = sae_report
        w_dec = encoder.sae.W_dec.detach().cpu().numpy()
        # Codes are searched at the precision they are stored in, so a loaded index scores as built.
        pooled = PooledCodes(storage_precision(pooled.codes), pooled.lengths)
        self.retriever = Retriever(pooled.codes, pooled.lengths, w_dec, config.scoring, faiss_searcher, idf)
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
        documents = load_documents(corpus, skip_empty=skip_empty)
        llm = llm or load_llm(config.llm, progress)
        check_layer(llm, config.capture.layer)
        passages = split_passages(documents, llm.tokenizer, config.capture.window, config.capture.overlap)
        logger.info("%d documents -> %d passages", len(documents), len(passages))
        cache = ActivationCache(cache_dir) if cache_dir else None
        report = None
        if sae is None:
            placeholder = SparseAutoencoder(config.sae, llm.d_model)
            encoder = CodeEncoder(llm, placeholder, config.capture, config.scoring.pooling, cache)
            acts = encoder.passage_activations([p.text for p in passages], progress=progress)
            trained, report = train_sae(acts.values, config.sae, llm.device, progress)
            trained.metadata.update(
                llm_id=llm.model_id,
                llm_hash=llm.model_hash,
                layer=config.capture.layer,
                train_fingerprint=fingerprint(p.text for p in passages),
                train_passages=len(passages),
            )
            encoder.sae = trained.to(llm.device).eval()
        else:
            source = str(sae) if not isinstance(sae, SparseAutoencoder) else "(given)"
            loaded = sae if isinstance(sae, SparseAutoencoder) else SparseAutoencoder.load(sae)
            check_sae_matches(loaded, llm, config.capture.layer, source)
            config = replace(config, sae=loaded.config)
            encoder = CodeEncoder(llm, loaded.to(llm.device).eval(), config.capture, config.scoring.pooling, cache)
            acts = encoder.passage_activations([p.text for p in passages], progress=progress)
        pooled = encoder.pool_activations(acts, progress=progress)
        index = cls(encoder, passages, pooled, config, sae_report=report)
        if path is not None:
            index.save(path, overwrite=overwrite)
        return index

    # --- searching -----------------------------------------------------------------------
    def encode_queries(self, queries: list[str]) -> sp.csr_matrix:
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
        if isinstance(queries, list):
            queries = {str(i): q for i, q in enumerate(queries)}
        if not queries:
            return {}
        for qid, text in queries.items():
            if not text.strip():
                raise ValueError(f"query {qid!r} is empty")
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
        """Write the index folder atomically: a temporary sibling folder, then a rename."""
        path = Path(path)
        if occupied(path) and not overwrite:
            raise IndexFolderError(f"{path}: already exists (pass overwrite=True to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        sae_hash = self.sae.save(tmp / SAE_DIR)
        save_compact_csr_atomic(tmp / CODES_FILE, self.pooled.codes)
        np.save(tmp / LENGTHS_FILE, self.pooled.lengths)
        np.save(tmp / IDF_FILE, self.retriever.idf)
        (tmp / DOCIDS_FILE).write_text("".join(p.passage_id + "\n" for p in self.passages), encoding="utf-8")
        with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as handle:
            for passage in self.passages:
                handle.write(json.dumps(passage.to_json(), ensure_ascii=False) + "\n")
        self.retriever.faiss.save(str(tmp / FAISS_FILE))
        manifest = {
            "format_version": INDEX_FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            "llm": {
                "model_id": self.llm.model_id,
                "model_hash": self.llm.model_hash,
                "compute_dtype": self.llm.dtype_name,
                **to_dict(self.config.llm),
            },
            "layer": self.config.capture.layer,
            "config": to_dict(self.config),
            "sae": {
                "weights_sha256": sae_hash,
                "architecture": self.sae.config.architecture,
                "num_latents": self.sae.num_latents,
                "k": self.sae.config.k,
            },
            "counts": {
                "passages": len(self.passages),
                "documents": len({p.doc_id for p in self.passages}),
                "nonzeros": int(self.pooled.codes.nnz),
            },
            "files": {name: file_sha256(tmp / name) for name in CHECKED_FILES},
        }
        if self.sae_report is not None:
            manifest["sae"]["train"] = self.sae_report.to_json()
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        backup = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
        shutil.rmtree(backup, ignore_errors=True)
        self.path = path
        return path

    @staticmethod
    def read_manifest(path: str | Path) -> dict[str, Any]:
        """The validated manifest of an index folder."""
        manifest_path = Path(path) / MANIFEST_FILE
        manifest = read_versioned_json(manifest_path, INDEX_FORMAT_VERSION, IndexFolderError, "a ragsae index")
        for key in ("llm", "layer", "config", "sae", "counts", "files"):
            if key not in manifest:
                raise IndexFolderError(f"{manifest_path}: missing field {key!r}")
        return manifest

    @classmethod
    def load(
        cls, path: str | Path, llm: LoadedLlm | None = None, mode: str | None = None, device: str | None = None
    ) -> Index:
        """Open an index folder, verifying checksums, shapes, the SAE and the LLM against the manifest."""
        path = Path(path)
        manifest = cls.read_manifest(path)
        for name, digest in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise IndexFolderError(f"{file}: missing")
            if file_sha256(file) != digest:
                raise IndexFolderError(f"{file}: checksum mismatch with {MANIFEST_FILE} (corrupted or edited)")
        config = BuildConfig.from_dict(manifest["config"])
        if mode is not None:
            config = replace(config, scoring=replace(config.scoring, mode=mode))
        if device is not None:
            config = replace(config, llm=replace(config.llm, device=device))
        sae = SparseAutoencoder.load(path / SAE_DIR)  # verifies the weights against its own header
        if sae.weights_sha256 != manifest["sae"]["weights_sha256"]:
            raise IndexFolderError(f"{path / SAE_DIR}: SAE weights do not match the manifest's sae.weights_sha256")
        llm = llm or load_llm(config.llm)
        if llm.model_hash != manifest["llm"]["model_hash"]:
            raise IndexFolderError(
                f"{path}: built with LLM {manifest['llm']['model_id']} (hash {manifest['llm']['model_hash'][:12]}), "
                f"but {llm.model_id} (hash {llm.model_hash[:12]}) was given"
            )
        check_sae_matches(sae, llm, int(manifest["layer"]), str(path / SAE_DIR))
        codes = load_compact_csr(path / CODES_FILE, IndexFolderError)
        lengths = np.load(path / LENGTHS_FILE, allow_pickle=False)
        docids = (path / DOCIDS_FILE).read_text(encoding="utf-8").splitlines()
        with open(path / PASSAGES_FILE, encoding="utf-8") as handle:
            passages = [Passage.from_json(json.loads(line)) for line in handle]
        n = manifest["counts"]["passages"]
        shapes = {
            CODES_FILE: codes.shape[0],
            LENGTHS_FILE: len(lengths),
            DOCIDS_FILE: len(docids),
            PASSAGES_FILE: len(passages),
        }
        for name, rows in shapes.items():
            if rows != n:
                raise IndexFolderError(f"{path / name}: {rows} rows, manifest counts {n} passages")
        if codes.shape[1] != sae.num_latents:
            raise IndexFolderError(f"{path / CODES_FILE}: {codes.shape[1]} latent columns, SAE has {sae.num_latents}")
        if [p.passage_id for p in passages] != docids:
            raise IndexFolderError(f"{path / DOCIDS_FILE}: ids disagree with {PASSAGES_FILE}")
        searcher = FaissSearcher.load(str(path / FAISS_FILE))
        if searcher.index.ntotal != n or searcher.index.d != sae.d_model:
            raise IndexFolderError(
                f"{path / FAISS_FILE}: {searcher.index.ntotal} vectors of dim {searcher.index.d}, "
                f"expected {n} of {sae.d_model}"
            )
        encoder = CodeEncoder(llm, sae.to(llm.device), config.capture, config.scoring.pooling)
        idf = np.load(path / IDF_FILE, allow_pickle=False)
        if idf.shape != (sae.num_latents,):
            raise IndexFolderError(f"{path / IDF_FILE}: shape {idf.shape}, expected ({sae.num_latents},)")
        return cls(encoder, passages, PooledCodes(codes, lengths), config, searcher, path, idf=idf)

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
