"""ReLU sparse autoencoder with the classic KL-divergence sparsity target on mean latent activity
(Ng, "Sparse autoencoder" lecture notes, 2011)."""

from __future__ import annotations

import torch

from .base import SaeOutput, SparseAutoencoder, fvu


def kl_sparsity(acts: torch.Tensor, target: float) -> torch.Tensor:
    """KL(rho || rho_hat) summed over latents; rho_hat is the batch mean of tanh(activation) in [0, 1)."""
    rho_hat = torch.tanh(acts).mean(0).clamp(1e-6, 1 - 1e-6)
    rho = torch.full_like(rho_hat, target)
    return (rho * (rho / rho_hat).log() + (1 - rho) * ((1 - rho) / (1 - rho_hat)).log()).sum()


class KlSae(SparseAutoencoder):
    """Reconstructs from all positive pre-activations; each latent's mean activity is pulled to `kl_target`."""

    architecture = "kl"

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SaeOutput:
        xn = self.normalise(x)
        acts = self.pre_acts(xn)
        values, indices = acts.topk(self.config.k, dim=1, sorted=False)
        recon = acts @ self.W_dec + self.b_dec
        penalty = self.config.kl_coef * kl_sparsity(acts, self.config.kl_target)
        return SaeOutput(recon, values, indices, fvu(xn, recon), penalty)
