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
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
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


LOG2_VALUE_RANGE = (-8.0, 12.0)
"""Stored code values are 8-bit steps on a log2 scale over [2**-8, 2**12] (clamped into it)."""
VALUE_LEVELS = 255


def log8_encode(values: np.ndarray, log2_range: tuple[float, float] = LOG2_VALUE_RANGE) -> np.ndarray:
    """Positive values as uint8 steps of a log2 grid over `log2_range`; refuses non-finite or non-positive ones.

    Pooled codes are positive sums of a few activations and BM25 saturates them, so a relative
    step of 2**(20/255) (at most 2.8% error; measured: no change in nDCG@10) is far below what the
    scores can tell apart. Values on the grid encode to themselves, so encoding is idempotent.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() <= 0):
        raise ValueError("8-bit log storage needs finite positive values")
    lo, hi = log2_range
    steps = np.rint((np.log2(values) - lo) * (VALUE_LEVELS / (hi - lo)))
    return np.clip(steps, 0, VALUE_LEVELS).astype(np.uint8)


def log8_decode(steps: np.ndarray, log2_range: tuple[float, float] = LOG2_VALUE_RANGE) -> np.ndarray:
    """float32 values of uint8 steps written by `log8_encode`."""
    lo, hi = log2_range
    return np.exp2(lo + steps.astype(np.float64) * ((hi - lo) / VALUE_LEVELS)).astype(np.float32)


COMPACT_CSR_ARRAYS = ("shape", "indptr", "indices", "values", "log2_range")
"""The arrays of a compact CSR file, in the order `load_compact_csr` reads them."""


def compact_csr_arrays(matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    """A CSR matrix as small arrays: uint16 column ids when they fit, 8-bit log-scale values."""
    index_dtype = np.uint16 if matrix.shape[1] <= 1 << 16 else np.int32
    return {
        "shape": np.array(matrix.shape, dtype=np.int64),
        "indptr": matrix.indptr.astype(np.int64),
        "indices": matrix.indices.astype(index_dtype),
        "values": log8_encode(matrix.data),
        "log2_range": np.array(LOG2_VALUE_RANGE, dtype=np.float64),
    }


def storage_precision(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """`matrix` with its values rounded as `save_compact_csr_atomic` stores them (float32 kept)."""
    rounded = matrix.astype(np.float32)  # a copy
    rounded.data = log8_decode(log8_encode(matrix.data))
    return rounded


def save_compact_csr_atomic(path: str | Path, matrix: sp.csr_matrix) -> None:
    """Write `compact_csr_arrays(matrix)` as an uncompressed .npz via a temporary file and a rename."""
    with atomic_output(path) as handle:
        np.savez(handle, **compact_csr_arrays(matrix))  # type: ignore[arg-type]  # numpy's stubs take **kwds as flags


def load_compact_csr(path: str | Path, error: type[Exception] = ValueError) -> sp.csr_matrix:
    """Read a file written by `save_compact_csr_atomic` (no pickle), checking structure; float32 CSR out."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            parts = {name: arrays[name] for name in COMPACT_CSR_ARRAYS}
    except KeyError as exc:
        raise error(f"{path}: missing array {exc}") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not a readable .npz file ({exc})") from None
    shape, indptr, indices, values, log2_range = (parts[name] for name in COMPACT_CSR_ARRAYS)
    if shape.shape != (2,) or indptr.shape != (int(shape[0]) + 1,):
        raise error(f"{path}: indptr has {indptr.shape[0]} entries for shape {tuple(shape)}")
    if indptr[0] != 0 or (np.diff(indptr) < 0).any() or indptr[-1] != len(indices) or len(values) != len(indices):
        raise error(f"{path}: inconsistent indptr / indices / values lengths")
    if len(indices) and (indices.min() < 0 or indices.max() >= shape[1]):
        raise error(f"{path}: column index outside [0, {int(shape[1])})")
    if values.dtype != np.uint8:
        raise error(f"{path}: values are {values.dtype}, expected uint8 log-scale steps")
    if log2_range.shape != (2,) or not np.isfinite(log2_range).all() or not log2_range[0] < log2_range[1]:
        raise error(f"{path}: log2_range must be two finite increasing numbers, got {log2_range.tolist()}")
    decoded = log8_decode(values, (float(log2_range[0]), float(log2_range[1])))
    return sp.csr_matrix((decoded, indices.astype(np.int32), indptr), shape=(int(shape[0]), int(shape[1])))
