"""Residual-stream capture: texts through the LLM up to a layer, activations per token out."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CorpusError, ModelError
from ..lm import LoadedLlm

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
    """ModelError unless `llm` has a residual stream at `layer`."""
    if not 0 <= layer <= llm.num_layers:
        raise ModelError(
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
    with llm.lock:
        n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    fed = [f"{prefix} {t}" for t in texts] if prefix else list(texts)
    with llm.lock:
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


INVARIANT_ROWS = 4096
"""Token rows of every weight product in a batch-invariant capture: each batch holds as many texts as fit
once padded to its longest, and its rows are padded with zeros to this many."""


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Texts in batches of `batch_size`, longest first (the least padding for a fixed batch size)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def padded_shape(texts: int, width: int) -> tuple[int, int]:
    """(rows, width) a batch of `texts` of at most `width` tokens is padded to (padding is never read):
    rows 1, 2, 4, 8, then multiples of 8; width a multiple of 8. Every distinct batch shape makes oneDNN
    build and keep kernels and the allocator keep buffers for it: a service whose micro-batches took
    every size grew in memory for tens of thousands of requests (benchmarks/README.md, Service)."""
    rows = 1 << (texts - 1).bit_length() if texts <= 8 else -(-texts // 8) * 8
    return rows, -(-width // 8) * 8


def token_budget_batches(ids: list[list[int]], rows: int) -> list[np.ndarray]:
    """Texts longest first, each batch as many as fit in `rows` token rows once padded to its longest."""
    widths = np.array([len(x) for x in ids])
    order = np.argsort(-widths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        fit = max(1, rows // int(widths[order[start]]))
        batches.append(order[start : start + fit])
        start += fit
    return batches


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
    batch_invariant: bool = False,
) -> dict[int, TokenActivations]:
    """Residual-stream activations at each of `layers` for every token of every text.

    Only blocks up to max(layers) run: as plain tensor operations for Llama-family models
    (`lm/trunk.py`), otherwise through the model's forward with hooks. Texts are batched by length
    (deterministic order), results come back in input order. Tokens of `stopwords` are fed but not
    returned. With `batch_invariant` (on the trunk), a text's activations do not depend on the other
    texts: every weight product runs on exactly `INVARIANT_ROWS` token rows (a batch is as many texts as
    fit, padded) and each text attends over its own length only (`LlamaTrunk`); passages are captured
    so, for an index grown by adds to equal one built in one go. bfloat16 kernels otherwise sum in an
    order that depends on the rows in the call and the padded width (364 of 600 msmarco passages
    changed when captured in three parts).
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
        raise CorpusError(f"text {bad} has no tokens after tokenisation: {texts[bad][:60]!r}")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = {layer: np.empty((int(offsets[-1]), llm.d_model), dtype=np.float16) for layer in layers}

    grabbed: dict[int, torch.Tensor] = {}
    top = max(layers)
    trunk = llm.trunk(top)  # same activations as the hooked forward, faster; None if unsupported

    def make_hook(layer: int):
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            grabbed[layer] = output[0] if isinstance(output, tuple) else output
            if layer == top:
                raise _StopForward

        return hook

    def hooked_forward(input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        # Hooks only around this forward: the trunk path leaves the shared model untouched, so that
        # another thread may generate with it meanwhile.
        blocks = llm.blocks()  # only here: asking for them builds a lazily loaded model
        handles = [
            (llm.model.get_input_embeddings() if layer == 0 else blocks[layer - 1]).register_forward_hook(
                make_hook(layer)
            )
            for layer in set(layers)
        ]
        try:
            llm.model(input_ids=input_ids.to(llm.device), attention_mask=mask.to(llm.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    pad = llm.tokenizer.pad_token_id
    if batch_invariant:
        batches = token_budget_batches(ids, INVARIANT_ROWS)
    else:
        batches = length_sorted_batches(lengths, batch_size)
    product_rows = INVARIANT_ROWS if batch_invariant else None
    for batch in tqdm(batches, desc=f"capture L{layers}", disable=not progress):
        width = max(len(ids[i]) for i in batch)
        lengths_fed = [len(ids[i]) for i in batch] if batch_invariant else None
        batch_trunk = trunk if trunk is not None and trunk.accepts(width) else None
        padded_rows = len(batch)
        if batch_trunk is not None and not batch_invariant:  # few shapes (`padded_shape`)
            padded_rows, rounded = padded_shape(len(batch), width)
            width = rounded if batch_trunk.accepts(rounded) else width
        input_ids = torch.full((padded_rows, width), pad, dtype=torch.long)
        mask = torch.zeros((padded_rows, width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        if batch_trunk is not None:
            grabbed.update(batch_trunk(input_ids.to(llm.device), layers, product_rows, lengths_fed))
        else:
            hooked_forward(input_ids, mask)
        for layer in layers:
            hidden = grabbed[layer].float().cpu().numpy()
            for row, i in enumerate(batch):
                rows = hidden[row, skip : skip + fed[i]]
                out[layer][offsets[i] : offsets[i + 1]] = rows if masks[i] is None else rows[masks[i]]
    for layer, values in out.items():
        if not np.isfinite(values).all():
            raise ModelError(
                f"layer {layer} activations overflow float16 storage, whatever the model's dtype: "
                "choose an earlier layer"
            )
    return {layer: TokenActivations(values, offsets) for layer, values in out.items()}
