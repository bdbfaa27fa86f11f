"""Captured activations on disk, keyed by everything that determines them."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..layout import CACHE_OFFSETS_FILE, CACHE_TIMING_FILE, CACHE_VALUES_FILE
from ..lm import LoadedLlm
from ..storage import save_npy_atomic, write_json_atomic
from .forward import TokenActivations, capture

logger = logging.getLogger(__name__)


CAPTURE_SCHEME = "2"
"""Bumped when captured values change for the same model and texts (2: passages batch-invariant)."""


def activations_id(
    llm: LoadedLlm,
    layer: int,
    window: int,
    prefix: str,
    texts_fingerprint: str,
    stopwords: frozenset[str] = frozenset(),
) -> str:
    """Identity of captured activations: the model's weights and compute dtype, layer, window, prefix,
    texts and the stopwords left out. Keys the activation cache and, with the SAE config, trained SAEs."""
    parts = [llm.activation_key, CAPTURE_SCHEME, str(layer), str(window)]
    if prefix:
        parts.append(prefix)
    fingerprint = texts_fingerprint + ("|stop:" + ",".join(sorted(stopwords)) if stopwords else "")
    return "|".join([*parts, fingerprint])


class ActivationCache:
    """Activations on disk, one folder per `activations_id`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, identity: str) -> Path:
        """Folder of the entry for an `activations_id`."""
        return self.root / hashlib.sha256(identity.encode()).hexdigest()[:24]

    def load(self, path: Path) -> TokenActivations | None:
        """The entry's activations (values memory-mapped), or None if absent or incomplete."""
        if not (path / CACHE_OFFSETS_FILE).is_file():
            return None
        offsets = np.load(path / CACHE_OFFSETS_FILE)
        values = np.load(path / CACHE_VALUES_FILE, mmap_mode="r")
        if values.shape[0] != offsets[-1]:
            logger.warning("activation cache %s is inconsistent; recomputing", path)
            return None
        return TokenActivations(values, offsets)

    def save(self, path: Path, acts: TokenActivations, timing: dict[str, Any] | None = None) -> None:
        """Write an entry; `timing` (the capture's seconds, device and layers) goes beside it."""
        path.mkdir(parents=True, exist_ok=True)
        (path / CACHE_OFFSETS_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
        if timing is not None:
            write_json_atomic(path / CACHE_TIMING_FILE, timing)
        # values first, offsets last: the offsets file present means the entry is complete.
        for name, array in ((CACHE_VALUES_FILE, acts.values), (CACHE_OFFSETS_FILE, acts.offsets)):
            save_npy_atomic(path / name, array)

    def timing(self, path: Path) -> dict[str, Any] | None:
        """How long the entry's capture took, if it was timed."""
        meta = path / CACHE_TIMING_FILE
        return json.loads(meta.read_text()) if meta.is_file() else None


def capture_cached(
    llm: LoadedLlm,
    texts: list[str],
    layers: list[int],
    texts_fingerprint: str,
    cache: ActivationCache | None,
    window: int = 256,
    batch_size: int = 16,
    prefix: str = "",
    progress: bool = False,
    stopwords: frozenset[str] = frozenset(),
    refresh: bool = False,
    batch_invariant: bool = False,
) -> dict[int, TokenActivations]:
    """`capture`, reading and writing `cache` (if given) per layer; `refresh` captures again even
    what is cached. Entries written here carry the capture's timing (`ActivationCache.timing`)."""

    def entry(layer: int) -> Path:
        assert cache is not None
        return cache.entry(activations_id(llm, layer, window, prefix, texts_fingerprint, stopwords))

    found: dict[int, TokenActivations] = {}
    if cache is not None and not refresh:
        for layer in layers:
            hit = cache.load(entry(layer))
            if hit is not None:
                found[layer] = hit
    missing = [layer for layer in layers if layer not in found]
    if missing:
        start = time.perf_counter()
        fresh = capture(llm, texts, missing, window, batch_size, prefix, progress, stopwords, batch_invariant)
        timing = {"seconds": time.perf_counter() - start, "device": str(llm.device), "layers": missing}
        if cache is not None:
            for layer, acts in fresh.items():
                cache.save(entry(layer), acts, timing)
        found.update(fresh)
    return found
