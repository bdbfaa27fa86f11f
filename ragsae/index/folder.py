"""The index folder format: what `Index.save` writes and `Index.load` reads, with every check.

A folder holds `manifest.json` (format version, LLM id and hash, layer, configs, SAE checksum,
counts, per-file SHA-256, library versions, creation time), `codes.npz` (compact CSR),
`lengths.npy`, `idf.npy`, `docids.txt` (line i = passage row i), `passages.jsonl`, the dense
backend's files (`faiss.index`) and `sae/`. File names and the format version are in `layout.py`.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..config import BuildConfig, to_dict
from ..errors import IndexFolderError, RagsaeError, SaeLoadError
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
from ..storage import (
    atomic_folder,
    file_sha256,
    json_checksum,
    load_compact_csr,
    read_versioned_json,
    recover_folder,
    save_compact_csr_atomic,
    write_json_atomic,
)
from ..text import Passage


def occupied(path: str | Path) -> bool:
    """True when `path` exists and is not an empty folder (an empty folder may be built into)."""
    path = Path(path)
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def is_index_folder(path: str | Path) -> bool:
    """True for a folder with a manifest that says it is a ragsae index (of any format version)."""
    manifest = Path(path) / MANIFEST_FILE
    try:
        return Path(path).is_dir() and "format_version" in json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_writable(path: str | Path, overwrite: bool, protected: Path | None = None) -> None:
    """IndexFolderError unless an index may be written at `path`: nothing there, an empty folder, or
    (with `overwrite`) an index folder. `overwrite` never replaces a file or a folder that is not an
    index, nor a folder holding `protected` (the corpus being indexed)."""
    path = Path(path)
    if protected is not None:
        target, source = path.resolve(), protected.resolve()
        if target == source or target in source.parents:
            raise IndexFolderError(f"{path}: holds the corpus {protected}; choose another output folder")
    if not occupied(path):
        return
    if not overwrite:
        raise IndexFolderError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not is_index_folder(path):
        raise IndexFolderError(f"{path}: exists and is not a ragsae index folder; refusing to replace it")


@dataclass
class IndexParts:
    """What an index folder stores besides its manifest."""

    config: BuildConfig
    sae: SparseAutoencoder
    passages: list[Passage]
    codes: sp.csr_matrix
    """Pooled codes (n_passages, num_latents), as stored (8-bit values)."""
    lengths: np.ndarray
    idf: np.ndarray
    dense: Backend


@dataclass
class IndexContents(IndexParts):
    """Everything an index folder holds, checked against its manifest."""

    manifest: dict[str, Any]


def write_index_folder(path: str | Path, llm: LoadedLlm, parts: IndexParts, sae_report: TrainReport | None) -> Path:
    """Write an index folder atomically: into a temporary sibling folder, then swapped into place, so
    that a crash at any moment leaves the previous index (or none) loadable and never a mix."""
    path = Path(path)
    try:
        with atomic_folder(path) as tmp:
            write_index_files(tmp, llm, parts, sae_report)
    except OSError as error:
        reason = "disk full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise IndexFolderError(
            f"{path}: could not write the index ({reason}: {error.filename or path}); "
            "whatever was at this path before is unchanged"
        ) from error
    return path


def write_index_files(folder: Path, llm: LoadedLlm, parts: IndexParts, sae_report: TrainReport | None) -> None:
    """The files of an index folder, written into the (new, empty) `folder`; the manifest last."""
    config, sae, passages, codes = parts.config, parts.sae, parts.passages, parts.codes
    sae_hash = sae.save(folder / SAE_DIR)
    save_compact_csr_atomic(folder / CODES_FILE, codes)
    np.save(folder / LENGTHS_FILE, parts.lengths)
    np.save(folder / IDF_FILE, parts.idf)
    (folder / DOCIDS_FILE).write_text("".join(p.passage_id + "\n" for p in passages), encoding="utf-8")
    with open(folder / PASSAGES_FILE, "w", encoding="utf-8") as handle:
        for passage in passages:
            handle.write(json.dumps(passage.to_json(), ensure_ascii=False) + "\n")
    parts.dense.save(folder)
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
        "files": {name: file_sha256(folder / name) for name in CHECKED_FILES},
    }
    if sae_report is not None:
        manifest["sae"]["train"] = sae_report.to_json()
    manifest["checksum"] = json_checksum(manifest)
    write_json_atomic(folder / MANIFEST_FILE, manifest)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, checked: format version, its own checksum (which covers the
    configs and the list of file checksums), and the type of every field the loader reads."""
    path = Path(path)
    recover_folder(path)
    manifest_path = path / MANIFEST_FILE
    manifest = read_versioned_json(
        manifest_path, INDEX_FORMAT_VERSION, IndexFolderError, "a ragsae index", checksummed_from=INDEX_FORMAT_VERSION
    )

    def field(dotted: str, kind: type | tuple[type, ...]) -> Any:
        value: Any = manifest
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                raise IndexFolderError(f"{manifest_path}: missing field {dotted!r}")
            value = value[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise IndexFolderError(f"{manifest_path}: field {dotted!r} has the wrong type ({type(value).__name__})")
        return value

    for dotted, kind in (
        ("llm.model_id", str),
        ("llm.model_hash", str),
        ("layer", int),
        ("config", dict),
        ("sae.weights_sha256", str),
        ("counts.passages", int),
        ("files", dict),
    ):
        field(dotted, kind)
    if set(manifest["files"]) != set(CHECKED_FILES):
        raise IndexFolderError(f"{manifest_path}: field 'files' must list exactly {', '.join(CHECKED_FILES)}")
    if manifest["counts"]["passages"] < 1:
        raise IndexFolderError(f"{manifest_path}: field 'counts.passages' must be >= 1")
    return manifest


def read_index_folder(path: str | Path) -> IndexContents:
    """Read an index folder, verifying every file's checksum, shapes and values against the manifest
    (the LLM is checked by the caller, which has it). Nothing is unpickled."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise IndexFolderError(f"{file}: missing")
        if file_sha256(file) != digest:
            raise IndexFolderError(f"{file}: checksum mismatch with {MANIFEST_FILE} (corrupted or edited)")
    try:
        config = BuildConfig.from_dict(manifest["config"])
    except RagsaeError as error:
        raise IndexFolderError(f"{path / MANIFEST_FILE}: field 'config': {error}") from None
    if config.capture.layer != manifest["layer"]:
        raise IndexFolderError(f"{path / MANIFEST_FILE}: 'layer' disagrees with 'config.capture.layer'")
    try:
        sae = load_sae(path / SAE_DIR)  # verifies the weights against its own header
    except SaeLoadError as error:
        raise IndexFolderError(str(error)) from None
    if sae.weights_sha256 != manifest["sae"]["weights_sha256"]:
        raise IndexFolderError(f"{path / SAE_DIR}: SAE weights do not match the manifest's sae.weights_sha256")
    codes = load_compact_csr(path / CODES_FILE, IndexFolderError)
    lengths = load_array(path / LENGTHS_FILE)
    idf = load_array(path / IDF_FILE)
    docids = read_docids(path / DOCIDS_FILE)
    passages = read_passages(path / PASSAGES_FILE)
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
    if len(set(docids)) != len(docids):
        raise IndexFolderError(f"{path / DOCIDS_FILE}: passage ids are not unique")
    if lengths.ndim != 1 or not np.isfinite(lengths).all() or (lengths <= 0).any():
        raise IndexFolderError(f"{path / LENGTHS_FILE}: passage lengths must be finite and positive")
    if idf.shape != (sae.num_latents,) or not np.isfinite(idf).all() or (idf < 0).any():
        raise IndexFolderError(f"{path / IDF_FILE}: expected {sae.num_latents} finite non-negative values")
    try:
        dense = FaissBackend.load(path)
    except RuntimeError as error:  # FAISS reports a malformed file as a RuntimeError
        raise IndexFolderError(f"{path / FAISS_FILE}: not a readable FAISS index ({error})") from None
    if len(dense) != n or dense.index.d != sae.d_model:
        raise IndexFolderError(
            f"{path / FAISS_FILE}: {len(dense)} vectors of dim {dense.index.d}, expected {n} of {sae.d_model}"
        )
    return IndexContents(config, sae, passages, codes, lengths, idf, dense, manifest)


def verify_index_folder(path: str | Path) -> dict[str, Any]:
    """Check everything in an index folder that can be checked without the LLM (`read_index_folder`);
    a summary of what was checked, or IndexFolderError naming the first fault."""
    contents = read_index_folder(path)
    return {
        "path": str(path),
        "format_version": contents.manifest["format_version"],
        "passages": len(contents.passages),
        "documents": len({p.doc_id for p in contents.passages}),
        "files_checked": len(contents.manifest["files"]),
        "llm": contents.manifest["llm"]["model_id"],
    }


def load_array(path: Path) -> np.ndarray:
    """A .npy array of numbers (no pickled objects), or IndexFolderError naming the file."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise IndexFolderError(f"{path}: not a readable .npy array ({error})") from None
    if array.dtype.kind not in "fiu":
        raise IndexFolderError(f"{path}: expected numbers, got dtype {array.dtype}")
    return array


def read_docids(path: Path) -> list[str]:
    """Passage ids, one per line (split on newlines only: ids may hold other line-break characters)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise IndexFolderError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if text and not text.endswith("\n"):
        raise IndexFolderError(f"{path}: truncated (no final newline)")
    return text.split("\n")[:-1]


def read_passages(path: Path) -> list[Passage]:
    """Passages of `passages.jsonl`, or IndexFolderError naming the line at fault."""
    passages = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                passages.append(Passage.from_json(json.loads(raw.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise IndexFolderError(f"{path}:{number}: not a passage record ({error})") from None
    return passages
