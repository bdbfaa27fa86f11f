"""Gated sparse autoencoder with TopK gating (after Rajamanoharan et al., "Improving dictionary learning
with gated sparse autoencoders", 2024): one path chooses which latents take part, another sets their
magnitudes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SaeConfig
from .base import SaeOutput, fvu
from .topk import TopKSae


class GatedSae(TopKSae):
    """The gate (`W_enc`, `b_enc`) picks each token's k latents, as TopK does; their values come from a
    magnitude path that shares the gate's directions, rescaled per latent (`exp(r_mag)`) with a bias of
    its own (`b_mag`), so that whether a latent fires and how strongly are learned apart.

    The gate learns from an auxiliary reconstruction through the frozen decoder, as in the paper; the
    paper's L1 penalty on the gate is not needed because TopK fixes the number of latents per token.
    """

    architecture = "gated"

    def __init__(self, config: SaeConfig, d_model: int):
        super().__init__(config, d_model)
        self.r_mag = nn.Parameter(torch.zeros(config.num_latents))
        self.b_mag = nn.Parameter(torch.zeros(config.num_latents))

    def selected_values(self, xn: torch.Tensor, indices: torch.Tensor, gate_values: torch.Tensor) -> torch.Tensor:
        return self.encode_selected(xn, indices)

    def encode_selected(self, xn: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(n, k) magnitudes of the given latents of normalised inputs (differentiable)."""
        w = self.W_enc.t()[indices]
        gate_linear = torch.einsum("nd,nkd->nk", xn - self.b_dec, w)
        return F.relu(gate_linear * self.r_mag[indices].exp() + self.b_mag[indices])

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SaeOutput:
        xn = self.normalise(x)
        with torch.no_grad():
            indices = self.pre_acts(xn).topk(self.config.k, dim=1, sorted=False).indices
        values = self.encode_selected(xn, indices)
        recon = self.decode(values, indices)
        # The gate's own activations reconstruct through the decoder held fixed: its only gradient.
        w = self.W_enc.t()[indices]
        gate = F.relu(torch.einsum("nd,nkd->nk", xn - self.b_dec, w) + self.b_enc[indices])
        gate_recon = F.embedding_bag(indices, self.W_dec.detach(), per_sample_weights=gate, mode="sum")
        gate_loss = fvu(xn, gate_recon + self.b_dec.detach())
        aux = gate_loss + self.auxk_loss(xn, recon, dead_mask)
        return SaeOutput(recon, values, indices, fvu(xn, recon), aux)
