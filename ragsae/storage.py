"""Atomic writes, checksums and versioned JSON: the file handling every saved artefact shares."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from .layout import PRIVATE_FILES


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


logger = logging.getLogger(__name__)


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `path` to write to before renaming over it: `.NAME.KIND-PID-TOKEN`, unique
    per process and call (several threads may write one path), with the writer's PID so that a later
    writer can tell a dead writer's leftovers from a live one's (`remove_stale_siblings`)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> list[Path]:
    """Delete what killed writers of `path` left beside it (temporary and backup siblings whose writer
    process is gone); returns what was removed. Siblings of live writers are left alone."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    removed = []
    for sibling in path.parent.iterdir() if path.parent.is_dir() else ():
        match = pattern.match(sibling.name)
        if match and not pid_alive(int(match.group(2))):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    if removed:
        logger.info("removed %d leftover(s) of interrupted writes beside %s", len(removed), path)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the system or
    file system cannot, so that the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and the folders themselves to disk (survives a power cut, not only a kill)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_folder(Path(root))


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` at `path`, replacing whatever folder was there, so that at every
    instant `path` holds either the old folder or the new one: an atomic exchange where the system has
    one; elsewhere the old folder is renamed to a backup sibling first (`recover_folder` puts it back
    if the process dies between the two renames)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if exchange_paths(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        return
    backup = temporary_sibling(path, "old")
    os.replace(path, backup)
    os.replace(tmp, path)
    shutil.rmtree(backup, ignore_errors=True)


def recover_folder(path: Path) -> bool:
    """Where a fallback `replace_folder` died between its renames (`path` gone, its backup beside it),
    put the backup back; True if it did."""
    if path.exists() or not path.parent.is_dir():
        return False
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.old-\d+-[0-9a-f]+$")
    backups = sorted((p for p in path.parent.iterdir() if pattern.match(p.name)), key=lambda p: p.stat().st_mtime)
    if not backups:
        return False
    os.replace(backups[-1], path)
    logger.warning("restored %s from %s, left by an interrupted save", path, backups[-1].name)
    return True


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A new temporary folder beside `path` to fill; when the block succeeds its permissions are made
    those of the umask and it replaces `path` (`replace_folder`), when it fails it is deleted and
    `path` is untouched. Leftovers of writers that were killed are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process's file-creation mask (read without changing it where Linux reports it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restored at once
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give everything under `folder` the permissions a plain file or folder made now would have: some
    writers (safetensors) create files readable by their owner only, which other users of an index
    could then not load. Files named in `layout.PRIVATE_FILES` (a secret salt) are kept to their owner."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o600 if name in PRIVATE_FILES else 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def json_checksum(data: dict[str, Any]) -> str:
    """SHA-256 of a JSON object's canonical form, its own `checksum` field left out."""
    body = {key: value for key, value in data.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb", durable: bool = False) -> Iterator[IO[Any]]:
    """A handle on a temporary sibling of `path`, renamed over `path` only if the block succeeds; with
    `durable`, the file and the rename are flushed to disk before returning (a commit point)."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    with atomic_output(path, "w", durable) as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, data: Any, durable: bool = False) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True), durable)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on file `path` (created if missing) for the block; BlockingIOError
    at once if another process holds it. The kernel releases it when its holder dies, however it dies."""
    import fcntl

    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def lock_holder(path: str | Path) -> str:
    """The PID written in a lock file by its last holder ('unknown' when unreadable)."""
    try:
        return Path(path).read_text(encoding="ascii").strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_output(path) as handle:
        np.save(handle, array)


def read_versioned_json(
    path: str | Path,
    versions: int | tuple[int, ...],
    error: type[Exception],
    what: str,
    checksummed_from: int | None = None,
) -> dict[str, Any]:
    """JSON object of `path` whose `format_version` is one of `versions`, and whose `checksum` field
    (`json_checksum`) must match from format version `checksummed_from` on; else `error` naming the file."""
    path = Path(path)
    versions = (versions,) if isinstance(versions, int) else versions
    if not path.is_file():
        raise error(f"{path}: missing (not {what} written by ragsae?)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    found = data.get("format_version")
    if isinstance(found, bool) or found not in versions:
        raise error(f"{path}: format_version {found!r}; this ragsae reads {' or '.join(map(str, versions))}")
    if checksummed_from is not None and found >= checksummed_from and data.get("checksum") != json_checksum(data):
        raise error(f"{path}: checksum mismatch (a field was edited or the file is damaged)")
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
