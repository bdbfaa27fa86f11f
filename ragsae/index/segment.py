"""A segment: passages added together, their codes and dense vectors, written once into their own
folder and never changed; deletes are recorded beside them as tombstone files (`layout.deletes_file`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import IndexFolderError
from ..layout import (
    CODES_FILE,
    DOCIDS_FILE,
    DROPPED_FILE,
    FAISS_FILE,
    LENGTHS_FILE,
    PASSAGES_FILE,
    SEGMENT_FILES,
)
from ..retrieval import Backend, FaissBackend
from ..retrieval.retriever import SearchSegment
from ..retrieval.scoring import latent_counts
from ..storage import atomic_output, file_sha256, fsync_tree, load_compact_csr, save_compact_csr_atomic
from ..text import Passage


@dataclass
class Segment:
    """One segment in memory, and where it is on disk once written."""

    passages: list[Passage]
    codes: sp.csr_matrix
    """Pooled codes (rows, num_latents), pruned and at storage precision: what is searched."""
    dropped: sp.csr_matrix
    """Pattern of the entries pruning cut (values 1): with `codes`, on which latents each passage fires."""
    lengths: np.ndarray
    sae_version: int
    deleted: np.ndarray
    """bool (rows,): True where the passage was deleted."""
    search: SearchSegment | None = None
    """The retriever's segment (weights, dense vectors) once added to one."""
    dense: Backend | None = None
    """Dense vectors read from disk, handed to the retriever."""
    name: str | None = None
    """Folder relative to the index (`segments/000001`) once written."""
    files: dict[str, str] = field(default_factory=dict)
    """SHA-256 of each file written, by name."""
    deletes: dict[str, Any] | None = None
    """The tombstone file on disk: {"file", "sha256", "count"}; None when nothing was deleted."""

    @property
    def rows(self) -> int:
        return len(self.passages)

    @property
    def live(self) -> np.ndarray:
        return np.flatnonzero(~self.deleted)

    def counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """On how many of `rows` (all when None) each latent fires, before pruning."""
        return latent_counts(self.codes, rows) + latent_counts(self.dropped, rows)

    @property
    def deletes_written(self) -> bool:
        return int(self.deleted.sum()) == (self.deletes["count"] if self.deletes else 0)


def save_pattern(path: Path, matrix: sp.csr_matrix) -> None:
    """The sparsity pattern of a CSR matrix (no values): uint16 column ids where they fit."""
    kind = np.uint16 if matrix.shape[1] <= 1 << 16 else np.int32
    with atomic_output(path) as handle:
        np.savez(
            handle,
            shape=np.array(matrix.shape, dtype=np.int64),
            indptr=matrix.indptr.astype(np.int64),
            indices=matrix.indices.astype(kind),
        )


def load_pattern(path: Path) -> sp.csr_matrix:
    """A pattern `save_pattern` wrote, as a float32 CSR of ones, checked; IndexFolderError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            shape, indptr, indices = (np.asarray(data[key]) for key in ("shape", "indptr", "indices"))
        rows, cols = (int(x) for x in shape)
        if len(indptr) != rows + 1 or indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
            raise ValueError("inconsistent indptr")
        if len(indices) and (indices.min() < 0 or indices.max() >= cols):
            raise ValueError("column ids out of range")
        ones = np.ones(len(indices), dtype=np.float32)
        return sp.csr_matrix((ones, indices.astype(np.int32), indptr), shape=(rows, cols))
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise IndexFolderError(f"{path}: not a readable sparsity pattern ({error})") from None


def write_segment(folder: Path, segment: Segment, dense: Backend) -> dict[str, str]:
    """Write a segment's files into the new folder `folder` (flushed to disk); their SHA-256 by name."""
    folder.mkdir(parents=True)
    save_compact_csr_atomic(folder / CODES_FILE, segment.codes)
    save_pattern(folder / DROPPED_FILE, segment.dropped)
    np.save(folder / LENGTHS_FILE, segment.lengths)
    (folder / DOCIDS_FILE).write_text("".join(p.passage_id + "\n" for p in segment.passages), encoding="utf-8")
    with open(folder / PASSAGES_FILE, "w", encoding="utf-8") as handle:
        for passage in segment.passages:
            handle.write(json.dumps(passage.to_json(), ensure_ascii=False) + "\n")
    dense.save(folder)
    fsync_tree(folder)
    return {name: file_sha256(folder / name) for name in SEGMENT_FILES}


def write_deletes(path: Path, deleted: np.ndarray) -> dict[str, Any]:
    """Write a segment's tombstones (sorted deleted rows) to the new file `path`; its manifest record."""
    rows = np.flatnonzero(deleted).astype(np.int64)
    with atomic_output(path, durable=True) as handle:
        np.save(handle, rows)
    return {"sha256": file_sha256(path), "count": int(len(rows))}


def verify_file(path: Path, digest: str) -> None:
    """IndexFolderError unless file `path` exists and has the SHA-256 the manifest gives it."""
    if not path.is_file():
        raise IndexFolderError(f"{path}: missing")
    if file_sha256(path) != digest:
        raise IndexFolderError(f"{path}: checksum mismatch with the manifest (corrupted or edited)")


def read_segment(root: Path, record: dict[str, Any], num_latents: int, d_model: int) -> Segment:
    """A segment as its manifest `record` describes it, every file checked against its checksum, and
    shapes and values against each other. Nothing is unpickled."""
    folder = root / record["name"]
    for name, digest in record["files"].items():
        verify_file(folder / name, digest)
    codes = load_compact_csr(folder / CODES_FILE, IndexFolderError)
    dropped = load_pattern(folder / DROPPED_FILE)
    lengths = load_array(folder / LENGTHS_FILE)
    docids = read_docids(folder / DOCIDS_FILE)
    passages = read_passages(folder / PASSAGES_FILE)
    n = record["rows"]
    for name, rows in {
        CODES_FILE: codes.shape[0],
        DROPPED_FILE: dropped.shape[0],
        LENGTHS_FILE: len(lengths),
        DOCIDS_FILE: len(docids),
        PASSAGES_FILE: len(passages),
    }.items():
        if rows != n:
            raise IndexFolderError(f"{folder / name}: {rows} rows, the manifest says {n}")
    for name, matrix in ((CODES_FILE, codes), (DROPPED_FILE, dropped)):
        if matrix.shape[1] != num_latents:
            raise IndexFolderError(f"{folder / name}: {matrix.shape[1]} latent columns, the SAE has {num_latents}")
    if [p.passage_id for p in passages] != docids:
        raise IndexFolderError(f"{folder / DOCIDS_FILE}: ids disagree with {PASSAGES_FILE}")
    if lengths.ndim != 1 or not np.isfinite(lengths).all() or (lengths <= 0).any():
        raise IndexFolderError(f"{folder / LENGTHS_FILE}: passage lengths must be finite and positive")
    try:
        dense = FaissBackend.load(folder)
    except RuntimeError as error:  # FAISS reports a malformed file as a RuntimeError
        raise IndexFolderError(f"{folder / FAISS_FILE}: not a readable FAISS index ({error})") from None
    if len(dense) != n or dense.index.d != d_model:
        raise IndexFolderError(
            f"{folder / FAISS_FILE}: {len(dense)} vectors of dim {dense.index.d}, expected {n} of {d_model}"
        )
    deleted = np.zeros(n, dtype=bool)
    if record["deleted"] is not None:
        deleted[read_deletes(root, record["deleted"], n)] = True
    segment = Segment(passages, codes, dropped, lengths.astype(np.float32), record["sae_version"], deleted)
    segment.dense, segment.name, segment.files, segment.deletes = (
        dense,
        record["name"],
        record["files"],
        record["deleted"],
    )
    return segment


def read_deletes(root: Path, record: dict[str, Any], rows: int) -> np.ndarray:
    """Deleted rows of a segment of `rows` rows, checked against the manifest's record."""
    path = root / record["file"]
    verify_file(path, record["sha256"])
    deleted = load_array(path)
    if deleted.ndim != 1 or len(deleted) != record["count"] or deleted.dtype.kind not in "iu":
        raise IndexFolderError(f"{path}: expected {record['count']} row numbers")
    if len(deleted) and (deleted.min() < 0 or deleted.max() >= rows or (np.diff(deleted) <= 0).any()):
        raise IndexFolderError(f"{path}: row numbers must be sorted, distinct and below {rows}")
    return deleted.astype(np.int64)


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
