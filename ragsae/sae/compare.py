"""Two SAE versions compared latent by latent, through the directions their decoders write."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import SparseAutoencoder


@torch.no_grad()
def compare_saes(
    old: SparseAutoencoder,
    new: SparseAutoencoder,
    old_alive: np.ndarray | None = None,
    new_alive: np.ndarray | None = None,
    same: float = 0.9,
    related: float = 0.5,
    block: int = 2048,
) -> dict[str, Any]:
    """Match latents by the cosine of their decoder rows (unit vectors in model space).

    Among latents that fire (the `*_alive` masks; all when None): a new latent is *kept* when its
    closest old latent is at cosine >= `same`, and *new* when no old latent reaches `related`; an old
    latent is *split* when two or more new latents have it as their closest at >= `related`, and *lost*
    when no new latent reaches `related`. Counts and fractions of each.
    """
    old_ids = np.arange(old.num_latents) if old_alive is None else np.flatnonzero(old_alive)
    new_ids = np.arange(new.num_latents) if new_alive is None else np.flatnonzero(new_alive)
    w_old = torch.nn.functional.normalize(old.W_dec.detach().float()[torch.as_tensor(old_ids)], dim=1)
    w_new = torch.nn.functional.normalize(new.W_dec.detach().float()[torch.as_tensor(new_ids)], dim=1)
    best_for_new = np.zeros(len(new_ids), dtype=np.float32)
    closest_old = np.zeros(len(new_ids), dtype=np.int64)
    best_for_old = np.full(len(old_ids), -1.0, dtype=np.float32)
    for start in range(0, len(new_ids), block):
        cos = w_new[start : start + block] @ w_old.T
        values, where = cos.max(dim=1)
        best_for_new[start : start + block] = values.numpy()
        closest_old[start : start + block] = where.numpy()
        best_for_old = np.maximum(best_for_old, cos.max(dim=0).values.numpy())
    claimed = np.bincount(closest_old[best_for_new >= related], minlength=len(old_ids))
    counts = {
        "kept": int((best_for_new >= same).sum()),
        "new": int((best_for_new < related).sum()),
        "split": int((claimed >= 2).sum()),
        "lost": int((best_for_old < related).sum()),
    }
    return {
        "old_latents": len(old_ids),
        "new_latents": len(new_ids),
        **counts,
        "kept_fraction": counts["kept"] / max(1, len(new_ids)),
        "lost_fraction": counts["lost"] / max(1, len(old_ids)),
        "median_best_cosine": float(np.median(best_for_new)) if len(new_ids) else 0.0,
        "thresholds": {"same": same, "related": related},
    }
