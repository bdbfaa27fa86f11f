"""Quality of an SAE on activations: FVU of its stored codes, mean L0, dead and dense latents."""

from __future__ import annotations

import numpy as np
import torch

from .base import SparseAutoencoder

DENSE_FREQUENCY = 0.1
"""A latent active on more than this fraction of tokens counts as dense (it says little about any one)."""


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder, data: torch.Tensor | np.ndarray, device: str | torch.device = "cpu", batch_size: int = 4096
) -> dict[str, float]:
    """FVU (of the stored, k-capped codes), mean L0, and the fractions of latents dead (never active) and
    dense (active on more than `DENSE_FREQUENCY` of the tokens) over `data`."""
    data = torch.as_tensor(np.asarray(data)) if isinstance(data, np.ndarray) else data
    sae = sae.to(device)
    err = total = l0 = 0.0
    mean = sae.normalise(data[:100_000].to(device)).mean(0)
    fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    for start in range(0, data.shape[0], batch_size):
        batch = data[start : start + batch_size].to(device).float()
        xn = sae.normalise(batch)
        codes = sae.encode(batch)
        recon = sae.decode(codes.values, codes.indices)
        err += float((xn - recon).pow(2).sum())
        total += float((xn - mean).pow(2).sum())
        active = codes.values > 0
        l0 += float(active.sum())
        fired += torch.bincount(codes.indices[active], minlength=sae.num_latents)
    return {
        "fvu": err / max(total, 1e-12),
        "mean_l0": l0 / data.shape[0],
        "dead_fraction": float((fired == 0).float().mean()),
        "dense_fraction": float((fired > DENSE_FREQUENCY * data.shape[0]).float().mean()),
    }
