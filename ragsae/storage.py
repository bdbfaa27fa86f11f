"""Atomic writes, checksums and versioned JSON: the file handling every saved artefact shares."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path` to write to before renaming over it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = temporary_sibling(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = temporary_sibling(path)
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


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
