"""How faithful an SAE is to the layer it reads, in the figures interpretability work judges SAEs by:
FVU and L0 on passages it was not trained on, and the LM's next-token loss with the layer's activations
replaced by the SAE's reconstruction, against the clean loss and against zeroing the layer
("loss recovered": 1 when splicing the SAE in costs nothing, 0 when it is as bad as no layer at all).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..capture import tokenize
from ..config import CaptureConfig
from ..lm import LoadedLlm
from .base import SparseAutoencoder


@torch.no_grad()
def spliced_losses(
    llm: LoadedLlm, sae: SparseAutoencoder, texts: list[str], capture: CaptureConfig, batch_size: int = 8
) -> dict[str, float]:
    """Mean next-token cross-entropy over the passages' tokens (as a build feeds them: BOS and passage
    prefix first, then at most `capture.window` tokens) with the capture layer left as is ("clean"),
    replaced by the SAE's reconstruction ("sae") and set to zero ("zero"), on the passage tokens only
    (the BOS and prefix positions, which a build never encodes, keep their activations)."""
    layer = capture.layer
    if layer == 0:
        raise ValueError("loss recovered needs a layer after the embeddings (capture.layer >= 1)")
    ids, skip, _ = tokenize(llm, texts, capture.window, capture.passage_prefix)
    block = llm.blocks()[layer - 1]
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    predicted = 0
    pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        content = mask.bool().clone()
        content[:, :skip] = False
        # Targets: each passage token predicts the next one; padding and the last token predict nothing.
        targets = input_ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
        targets[:, : max(skip - 1, 0)] = -100
        predicted += int((targets != -100).sum())
        for name in totals:
            handle = None
            if name != "clean":
                handle = block.register_forward_hook(_replacement_hook(sae, content.to(llm.device), name == "zero"))
            try:
                logits = llm.model(
                    input_ids=input_ids.to(llm.device), attention_mask=mask.to(llm.device), use_cache=False
                ).logits
            finally:
                if handle is not None:
                    handle.remove()
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                targets.to(logits.device).reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            totals[name] += float(loss)
    return {name: total / max(predicted, 1) for name, total in totals.items()} | {"tokens": predicted}


def _replacement_hook(sae: SparseAutoencoder, content: torch.Tensor, zero: bool) -> Any:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        rows = hidden[content]
        if zero:
            replaced = torch.zeros_like(rows)
        else:
            codes = sae.encode(rows.float())
            recon = sae.decode(codes.values, codes.indices) * sae.input_scale + sae.input_mean
            replaced = recon.to(hidden.dtype)
        hidden = hidden.clone()
        hidden[content] = replaced
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def loss_recovered(losses: dict[str, float]) -> float | None:
    """(zero - sae) / (zero - clean): None where zeroing the layer does not raise the loss."""
    gap = losses["zero"] - losses["clean"]
    return None if gap <= 0 else (losses["zero"] - losses["sae"]) / gap


def heldout_rows(passages: int, wanted: int, seed: int) -> np.ndarray:
    """Passages kept out of SAE training to measure its fidelity on: `wanted`, but at most one in 50
    (none below 50 passages), chosen by `seed`; sorted."""
    count = min(wanted, passages // 50)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(passages, count, replace=False)).astype(np.int64)
