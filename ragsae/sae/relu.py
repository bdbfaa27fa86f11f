"""ReLU sparse autoencoder with an L1 penalty (Bricken et al., "Towards Monosemanticity", 2023)."""

from __future__ import annotations

import torch

from .base import SaeOutput, SparseAutoencoder, fvu


class ReluSae(SparseAutoencoder):
    """Reconstructs from all positive pre-activations; L1 keeps them few. Codes keep the k largest."""

    architecture = "relu"

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SaeOutput:
        xn = self.normalise(x)
        acts = self.pre_acts(xn)
        values, indices = acts.topk(self.config.k, dim=1, sorted=False)
        recon = acts @ self.W_dec + self.b_dec
        # L1 on activations weighted by decoder norms (unit here), per token.
        penalty = self.config.l1_coef * acts.sum(1).mean()
        return SaeOutput(recon, values, indices, fvu(xn, recon), penalty)
