"""The index folder format: what `Index.save` writes and `Index.load` reads, with every check.

A folder holds `manifest.json` (format version, LLM id and hash, layer, configs, SAE checksum,
counts, per-file SHA-256, library versions, creation time), `codes.npz` (compact CSR),
`lengths.npy`, `idf.npy`, `docids.txt` (line i = passage row i), `passages.jsonl`, the dense
backend's files (`faiss.index`) and `sae/`. File names and the format version are in `layout.py`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..config import BuildConfig, to_dict
from ..errors import IndexFolderError
from ..layout import (
    CHECKED_FILES,
    CODES_FILE,
    DOCIDS_FILE,
    FAISS_FILE,
    IDF_FILE,
    INDEX_FORMAT_VERSION,
    LENGTHS_FILE,
    MANIFEST_FILE,
    PASSAGES_FILE,
    SAE_DIR,
)
from ..lm import LoadedLlm
from ..provenance import library_versions
from ..retrieval import Backend, FaissBackend
from ..sae import SparseAutoencoder, TrainReport, load_sae
from ..storage import file_sha256, load_compact_csr, read_versioned_json, save_compact_csr_atomic, write_json_atomic
from ..text import Passage


def occupied(path: str | Path) -> bool:
    """True when `path` exists and is not an empty folder (an empty folder may be built into)."""
    path = Path(path)
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


@dataclass
class IndexContents:
    """Everything an index folder holds, checked against its manifest."""

    manifest: dict[str, Any]
    config: BuildConfig
    sae: SparseAutoencoder
    codes: sp.csr_matrix
    lengths: np.ndarray
    idf: np.ndarray
    passages: list[Passage]
    dense: Backend


def write_index_folder(
    path: str | Path,
    llm: LoadedLlm,
    sae: SparseAutoencoder,
    config: BuildConfig,
    passages: list[Passage],
    codes: sp.csr_matrix,
    lengths: np.ndarray,
    idf: np.ndarray,
    dense: Backend,
    sae_report: TrainReport | None = None,
) -> Path:
    """Write an index folder atomically: into a temporary sibling folder, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sae_hash = sae.save(tmp / SAE_DIR)
    save_compact_csr_atomic(tmp / CODES_FILE, codes)
    np.save(tmp / LENGTHS_FILE, lengths)
    np.save(tmp / IDF_FILE, idf)
    (tmp / DOCIDS_FILE).write_text("".join(p.passage_id + "\n" for p in passages), encoding="utf-8")
    with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as handle:
        for passage in passages:
            handle.write(json.dumps(passage.to_json(), ensure_ascii=False) + "\n")
    dense.save(tmp)
    manifest: dict[str, Any] = {
        "format_version": INDEX_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "llm": {
            "model_id": llm.model_id,
            "model_hash": llm.model_hash,
            "compute_dtype": llm.dtype_name,
            **to_dict(config.llm),
        },
        "layer": config.capture.layer,
        "config": to_dict(config),
        "sae": {
            "weights_sha256": sae_hash,
            "architecture": sae.config.architecture,
            "num_latents": sae.num_latents,
            "k": sae.config.k,
        },
        "counts": {
            "passages": len(passages),
            "documents": len({p.doc_id for p in passages}),
            "nonzeros": int(codes.nnz),
        },
        "files": {name: file_sha256(tmp / name) for name in CHECKED_FILES},
    }
    if sae_report is not None:
        manifest["sae"]["train"] = sae_report.to_json()
    write_json_atomic(tmp / MANIFEST_FILE, manifest)
    backup = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, backup)
    os.replace(tmp, path)
    shutil.rmtree(backup, ignore_errors=True)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of an index folder."""
    manifest_path = Path(path) / MANIFEST_FILE
    manifest = read_versioned_json(manifest_path, INDEX_FORMAT_VERSION, IndexFolderError, "a ragsae index")
    for key in ("llm", "layer", "config", "sae", "counts", "files"):
        if key not in manifest:
            raise IndexFolderError(f"{manifest_path}: missing field {key!r}")
    return manifest


def read_index_folder(path: str | Path) -> IndexContents:
    """Read an index folder, verifying checksums and shapes against the manifest (the LLM is checked by
    the caller, which has it). Nothing is unpickled."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise IndexFolderError(f"{file}: missing")
        if file_sha256(file) != digest:
            raise IndexFolderError(f"{file}: checksum mismatch with {MANIFEST_FILE} (corrupted or edited)")
    config = BuildConfig.from_dict(manifest["config"])
    sae = load_sae(path / SAE_DIR)  # verifies the weights against its own header
    if sae.weights_sha256 != manifest["sae"]["weights_sha256"]:
        raise IndexFolderError(f"{path / SAE_DIR}: SAE weights do not match the manifest's sae.weights_sha256")
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
    dense = FaissBackend.load(path)
    if len(dense) != n or dense.index.d != sae.d_model:
        raise IndexFolderError(
            f"{path / FAISS_FILE}: {len(dense)} vectors of dim {dense.index.d}, expected {n} of {sae.d_model}"
        )
    idf = np.load(path / IDF_FILE, allow_pickle=False)
    if idf.shape != (sae.num_latents,):
        raise IndexFolderError(f"{path / IDF_FILE}: shape {idf.shape}, expected ({sae.num_latents},)")
    return IndexContents(manifest, config, sae, codes, lengths, idf, passages, dense)
