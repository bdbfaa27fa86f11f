"""Residual-stream capture: texts through the LLM up to a layer, activations per token out."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .llm import LoadedLlm
from .storage import save_npy_atomic, write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class TokenActivations:
    """Activations of every token of a list of texts.

    `values` is (n_tokens, d_model) float16; the tokens of text i are rows offsets[i]:offsets[i+1].
    """

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class _StopForward(Exception):
    """Raised by the last hook so that layers above the captured one never run."""


def check_layer(llm: LoadedLlm, layer: int) -> None:
    if not 0 <= layer <= llm.num_layers:
        raise ValueError(
            f"layer {layer} does not exist: {llm.model_id} has layers 0..{llm.num_layers} "
            "(0 = embeddings, N = after block N)"
        )


def tokenize(
    llm: LoadedLlm, texts: list[str], window: int, prefix: str = ""
) -> tuple[list[list[int]], int, list[tuple[str, list[tuple[int, int]]]]]:
    """Token ids per text (truncated to `window`) behind the BOS token and `prefix`; how many lead;
    and each text as fed (prefix joined) with its tokens' character spans.

    The leading tokens are fed to the model but never captured: the BOS position soaks up
    attention ("attention sink") with outlier norms, and a prefix (an instruction such as
    "Question: ") should shape the text's activations, not add codes of its own.
    """
    tok = llm.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    # Prefix and text are tokenised together, as the model reads them ("Question: what" keeps the
    # text's first word in its with-space form); the prefix alone gives the count of leading tokens.
    prefix = prefix.rstrip()
    n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    fed = [f"{prefix} {t}" for t in texts] if prefix else list(texts)
    encoded = tok(
        fed, add_special_tokens=False, truncation=True, max_length=window + n_prefix, return_offsets_mapping=True
    )
    spans = [(text, list(offsets)) for text, offsets in zip(fed, encoded["offset_mapping"])]
    return [bos + ids for ids in encoded["input_ids"]], len(bos) + n_prefix, spans


def content_mask(text: str, spans: list[tuple[int, int]], stopwords: frozenset[str]) -> np.ndarray:
    """True for tokens not inside a stopword (whole words, case-insensitive); all True if none would remain."""
    in_stopword = np.zeros(len(text) + 1, dtype=bool)
    for match in re.finditer(r"\w+", text):
        if match.group().lower() in stopwords:
            in_stopword[match.start() : match.end()] = True
    keep = np.ones(len(spans), dtype=bool)
    for i, (start, end) in enumerate(spans):
        while start < end and text[start].isspace():
            start += 1
        keep[i] = not (start < end and in_stopword[start])
    return keep if keep.any() else np.ones(len(spans), dtype=bool)


@torch.inference_mode()
def capture(
    llm: LoadedLlm,
    texts: list[str],
    layers: list[int],
    window: int = 256,
    batch_size: int = 16,
    prefix: str = "",
    progress: bool = False,
    stopwords: frozenset[str] = frozenset(),
) -> dict[int, TokenActivations]:
    """Residual-stream activations at each of `layers` for every token of every text.

    Only blocks up to max(layers) run: as plain tensor operations for Llama-family models
    (`trunk.py`), otherwise through the model's forward with hooks. Texts are batched by length
    (deterministic order), results come back in input order. Tokens of `stopwords` are fed but not
    returned.
    """
    for layer in layers:
        check_layer(llm, layer)
    if not texts:
        raise ValueError("capture needs at least one text")
    ids, skip, spans = tokenize(llm, texts, window, prefix)
    n_bos = len(ids[0]) - len(spans[0][1])
    masks = [content_mask(text, offsets[skip - n_bos :], stopwords) if stopwords else None for text, offsets in spans]
    fed = np.array([len(x) - skip for x in ids])
    lengths = np.array([fed[i] if m is None else int(m.sum()) for i, m in enumerate(masks)])
    if (lengths <= 0).any():
        bad = int(np.argmax(lengths <= 0))
        raise ValueError(f"text {bad} has no tokens after tokenisation: {texts[bad][:60]!r}")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = {layer: np.empty((int(offsets[-1]), llm.d_model), dtype=np.float16) for layer in layers}

    grabbed: dict[int, torch.Tensor] = {}
    top = max(layers)
    trunk = llm.trunk(top)  # same activations as the hooked forward, faster; None if unsupported
    blocks = llm.blocks()

    def make_hook(layer: int):
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            grabbed[layer] = output[0] if isinstance(output, tuple) else output
            if layer == top:
                raise _StopForward

        return hook

    handles = [
        (llm.model.get_input_embeddings() if layer == 0 else blocks[layer - 1]).register_forward_hook(make_hook(layer))
        for layer in set(layers)
    ]
    order = np.argsort(-lengths, kind="stable")
    pad = llm.tokenizer.pad_token_id
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=f"capture L{layers}", disable=not progress):
            batch = order[start : start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            if trunk is not None and trunk.accepts(width):
                grabbed.update(trunk(input_ids.to(llm.device), layers))
            else:
                try:
                    llm.model(input_ids=input_ids.to(llm.device), attention_mask=mask.to(llm.device), use_cache=False)
                except _StopForward:
                    pass
            for layer in layers:
                hidden = grabbed[layer].float().cpu().numpy()
                for row, i in enumerate(batch):
                    rows = hidden[row, skip : skip + fed[i]]
                    out[layer][offsets[i] : offsets[i + 1]] = rows if masks[i] is None else rows[masks[i]]
    finally:
        for handle in handles:
            handle.remove()
    for layer, values in out.items():
        if not np.isfinite(values).all():
            raise FloatingPointError(f"layer {layer} activations overflow float16 storage")
    return {layer: TokenActivations(values, offsets) for layer, values in out.items()}


class ActivationCache:
    """Activations on disk, keyed by model hash and dtype, layer, window, prefix and text fingerprint."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, model_key: str, layer: int, window: int, prefix: str, texts_fingerprint: str) -> Path:
        """Entry folder for `LoadedLlm.activation_key`, layer, window, prefix and texts."""
        raw = f"{model_key}|{layer}|{window}|{prefix}|{texts_fingerprint}"
        return self.root / hashlib.sha256(raw.encode()).hexdigest()[:24]

    def load(self, path: Path) -> TokenActivations | None:
        if not (path / "offsets.npy").is_file():
            return None
        offsets = np.load(path / "offsets.npy")
        values = np.load(path / "values.npy", mmap_mode="r")
        if values.shape[0] != offsets[-1]:
            logger.warning("activation cache %s is inconsistent; recomputing", path)
            return None
        return TokenActivations(values, offsets)

    def save(self, path: Path, acts: TokenActivations, timing: dict[str, Any] | None = None) -> None:
        """Write an entry; `timing` (the capture's seconds, device and layers) goes beside it."""
        path.mkdir(parents=True, exist_ok=True)
        (path / "offsets.npy").unlink(missing_ok=True)  # incomplete until rewritten below
        if timing is not None:
            write_json_atomic(path / "timing.json", timing)
        # values first, offsets last: offsets.npy present means the entry is complete.
        for name, array in (("values.npy", acts.values), ("offsets.npy", acts.offsets)):
            save_npy_atomic(path / name, array)

    def timing(self, path: Path) -> dict[str, Any] | None:
        """How long the entry's capture took, if it was timed."""
        meta = path / "timing.json"
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
) -> dict[int, TokenActivations]:
    """`capture`, reading and writing `cache` (if given) per layer; `refresh` captures again even
    what is cached. Entries written here carry the capture's timing (`ActivationCache.timing`)."""
    if stopwords:  # the cache key must tell token selections apart
        texts_fingerprint += "|stop:" + ",".join(sorted(stopwords))
    found: dict[int, TokenActivations] = {}
    if cache is not None and not refresh:
        for layer in layers:
            hit = cache.load(cache.key(llm.activation_key, layer, window, prefix, texts_fingerprint))
            if hit is not None:
                found[layer] = hit
    missing = [layer for layer in layers if layer not in found]
    if missing:
        start = time.perf_counter()
        fresh = capture(llm, texts, missing, window, batch_size, prefix, progress, stopwords)
        timing = {"seconds": time.perf_counter() - start, "device": str(llm.device), "layers": missing}
        if cache is not None:
            for layer, acts in fresh.items():
                cache.save(cache.key(llm.activation_key, layer, window, prefix, texts_fingerprint), acts, timing)
        found.update(fresh)
    return found
