"""TopK sparse autoencoder with the AuxK loss against dead latents (Gao et al., "Scaling and
evaluating sparse autoencoders", 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SaeOutput, SparseAutoencoder, fvu


class TopKSae(SparseAutoencoder):
    """Keeps the k largest pre-activations of each token; dead latents learn by reconstructing the residual."""

    architecture = "topk"

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SaeOutput:
        xn = self.normalise(x)
        # Select latents without autograd, then recompute only the chosen k with it: the backward
        # pass costs O(n k d) instead of O(n num_latents d) (as EleutherAI/sparsify).
        with torch.no_grad():
            indices = self.pre_acts(xn).topk(self.config.k, dim=1, sorted=False).indices
        values = self.encode_selected(xn, indices)
        recon = self.decode(values, indices)
        return SaeOutput(recon, values, indices, fvu(xn, recon), self.auxk_loss(xn, recon, dead_mask))

    def auxk_loss(self, xn: torch.Tensor, recon: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """Dead latents reconstruct the residual (AuxK), which gives them gradient."""
        if dead_mask is None or not bool(dead_mask.any()) or self.config.auxk_coef == 0:
            return recon.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.config.auxk_k, len(dead))
        dead_acts = F.relu((xn - self.b_dec) @ self.W_enc[:, dead] + self.b_enc[dead])
        values, local = dead_acts.topk(k_aux, dim=1, sorted=False)
        residual = (xn - recon).detach()
        aux_recon = F.embedding_bag(dead[local], self.W_dec, per_sample_weights=values, mode="sum")
        return self.config.auxk_coef * fvu(residual, aux_recon).nan_to_num(0.0)
