"""Atomic writes, checksums and versioned JSON: the file handling every saved artefact shares."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path` to write to before renaming over it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A handle on a temporary sibling of `path`, renamed over `path` only if the block succeeds."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_output(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_output(path) as handle:
        np.save(handle, array)


def read_versioned_json(path: str | Path, version: int, error: type[Exception], what: str) -> dict[str, Any]:
    """JSON object of `path` whose `format_version` must equal `version`; else `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: missing (not {what} written by ragsae?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    found = data.get("format_version")
    if found != version:
        raise error(f"{path}: format_version {found!r}; this ragsae reads {version}")
    return data


def float16_values(matrix: sp.csr_matrix) -> np.ndarray:
    """The stored values of `matrix` as float16; refuses values that are not finite or overflow it.

    Pooled codes are non-negative sums of a few activations; float16 keeps 3 significant digits,
    far below what BM25 saturation can tell apart, and halves the values' size.
    """
    if matrix.nnz and (not np.isfinite(matrix.data).all() or np.abs(matrix.data).max() > np.finfo(np.float16).max):
        raise ValueError("values are not finite or overflow float16 storage")
    return matrix.data.astype(np.float16)


def compact_csr_arrays(matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    """A CSR matrix as small arrays: uint16 column ids when they fit, float16 values."""
    index_dtype = np.uint16 if matrix.shape[1] <= 1 << 16 else np.int32
    return {
        "shape": np.array(matrix.shape, dtype=np.int64),
        "indptr": matrix.indptr.astype(np.int64),
        "indices": matrix.indices.astype(index_dtype),
        "values": float16_values(matrix),
    }


def storage_precision(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """`matrix` with its values rounded to float16 as `save_compact_csr_atomic` stores them (float32 kept)."""
    rounded = matrix.copy()
    rounded.data = float16_values(matrix).astype(np.float32)
    return rounded


def save_compact_csr_atomic(path: str | Path, matrix: sp.csr_matrix) -> None:
    """Write `compact_csr_arrays(matrix)` as an uncompressed .npz via a temporary file and a rename."""
    with atomic_output(path) as handle:
        np.savez(handle, **compact_csr_arrays(matrix))


def load_compact_csr(path: str | Path, error: type[Exception] = ValueError) -> sp.csr_matrix:
    """Read a file written by `save_compact_csr_atomic` (no pickle), checking structure; float32 CSR out."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            parts = {name: arrays[name] for name in ("shape", "indptr", "indices", "values")}
    except KeyError as exc:
        raise error(f"{path}: missing array {exc}") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not a readable .npz file ({exc})") from None
    shape, indptr, indices, values = (parts[n] for n in ("shape", "indptr", "indices", "values"))
    if shape.shape != (2,) or indptr.shape != (int(shape[0]) + 1,):
        raise error(f"{path}: indptr has {indptr.shape[0]} entries for shape {tuple(shape)}")
    if indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != len(indices) or len(values) != len(indices):
        raise error(f"{path}: inconsistent indptr / indices / values lengths")
    if len(indices) and (indices.min() < 0 or indices.max() >= shape[1]):
        raise error(f"{path}: column index outside [0, {int(shape[1])})")
    if not np.isfinite(values).all():
        raise error(f"{path}: non-finite values")
    return sp.csr_matrix(
        (values.astype(np.float32), indices.astype(np.int32), indptr), shape=(int(shape[0]), int(shape[1]))
    )
