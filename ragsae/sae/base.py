"""What every sparse autoencoder shares: normalisation, encoder, sparse codes, decoder, saving.

An architecture (`topk.py`, `gated.py`, `relu.py`, `kl.py`) adds its training loss as `forward`; the registry
(`registry.py`) maps `SaeConfig.architecture` and a saved folder's `architecture` key to its class.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..config import SaeConfig, to_dict
from ..errors import ConfigError
from ..layout import SAE_CONFIG_FILE, SAE_FORMAT_VERSION, SAE_WEIGHTS_FILE
from ..lm.linear import Linear
from ..storage import atomic_folder, file_sha256, json_checksum, write_json_atomic

SELECT_ROWS = 256
"""Rows whose latents `encode` selects at a time (the results do not depend on it)."""


class TopK(NamedTuple):
    """Sparse codes as (values, indices), each (n, k)."""

    values: torch.Tensor
    indices: torch.Tensor


class SaeOutput(NamedTuple):
    recon: torch.Tensor
    """(n, d_model) reconstruction in normalised space."""
    values: torch.Tensor
    indices: torch.Tensor
    fvu: torch.Tensor
    """Fraction of variance unexplained (scalar)."""
    aux_loss: torch.Tensor
    """AuxK loss (topk) or sparsity penalty (relu, kl)."""


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: ||x - recon||^2 / ||x - mean(x)||^2."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - recon).pow(2).sum() / total.clamp_min(1e-12)


class SparseAutoencoder(nn.Module):
    """Encoder, sparse activation and unit-norm decoder, on normalised inputs; one subclass per
    architecture (`registry.py`) supplies the training loss (`forward`).

    Inputs are normalised as (x - input_mean) / input_scale with statistics of the training
    data, so that E||x||^2 = d_model whatever the layer's scale.
    """

    architecture = ""
    """The `SaeConfig.architecture` value this class implements (the registry's key)."""
    input_mean: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, config: SaeConfig, d_model: int):
        super().__init__()
        if self.architecture and config.architecture != self.architecture:
            raise ConfigError(
                f"{type(self).__name__} implements {self.architecture!r}, config asks {config.architecture!r}"
            )
        self.config = config
        self.d_model = d_model
        gen = torch.Generator().manual_seed(config.seed)
        w_dec = torch.randn(config.num_latents, d_model, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())  # tied initialisation (Gao et al. 2024)
        self.b_enc = nn.Parameter(torch.zeros(config.num_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("input_mean", torch.zeros(d_model))
        self.register_buffer("input_scale", torch.ones(()))
        self.metadata: dict[str, Any] = {}
        self.weights_sha256: str | None = None
        """SHA-256 of the weights file this SAE was last saved to or loaded from."""
        self._low_encoder: Linear | None = None
        self._low_key: tuple[Any, ...] | None = None
        self._low_lock = threading.Lock()
        """The encoder product for low-precision selection, and the (dtype, version, storage) of W_enc it came from."""

    @property
    def num_latents(self) -> int:
        return self.config.num_latents

    def set_normalisation(self, sample: torch.Tensor) -> None:
        """Fit input mean and scale on a (n, d_model) sample."""
        mean = sample.float().mean(0)
        scale = (sample.float() - mean).pow(2).sum(1).mean().div(self.d_model).sqrt()
        self.input_mean.copy_(mean)
        self.input_scale.copy_(scale.clamp_min(1e-6))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.input_mean) / self.input_scale

    def pre_acts(self, xn: torch.Tensor) -> torch.Tensor:
        """(n, num_latents) non-negative pre-activations of normalised inputs."""
        return F.relu((xn - self.b_dec) @ self.W_enc + self.b_enc)

    def encode(self, x: torch.Tensor, select_dtype: torch.dtype = torch.float32) -> TopK:
        """Sparse codes of raw (n, d_model) activations: the k largest latents per row.

        With a `select_dtype` narrower than float32 (bfloat16), the k latents are chosen from
        pre-activations computed at that precision, then their values are computed in float32:
        half the encoder weights to read (the costly part on a CPU), exact values, and only
        near-ties chosen differently.
        """
        xn = self.normalise(x)
        if select_dtype == torch.float32:
            gate_values, indices = self.pre_acts(xn).topk(self.config.k, dim=1, sorted=False)
            return TopK(self.selected_values(xn, indices, gate_values), indices)
        low = self._encoder_product(select_dtype)((xn - self.b_dec).to(select_dtype))
        indices = torch.empty(len(xn), self.config.k, dtype=torch.long, device=xn.device)
        values = torch.empty(len(xn), self.config.k, dtype=xn.dtype, device=xn.device)
        # Row by row the same results; in slices of SELECT_ROWS rows the float32 pre-activations and the
        # gathered encoder columns stay in cache instead of passing through memory.
        for start in range(0, len(xn), SELECT_ROWS):
            rows = slice(start, start + SELECT_ROWS)
            indices[rows] = low[rows].float().add_(self.b_enc).topk(self.config.k, dim=1, sorted=False).indices
            values[rows] = self.encode_selected(xn[rows], indices[rows])
        return TopK(values, indices)

    def selected_values(self, xn: torch.Tensor, indices: torch.Tensor, gate_values: torch.Tensor) -> torch.Tensor:
        """Code values of the latents chosen by their pre-activations `gate_values`: those values
        themselves, except where an architecture sets magnitudes apart from selection ('gated')."""
        return gate_values

    def _encoder_product(self, dtype: torch.dtype) -> Linear:
        """x -> x @ W_enc with W_enc in `dtype` (prepacked on CPU in bfloat16: `lm/linear.py`), made once
        per weight update (tracked by the tensor's version)."""
        key = (dtype, self.W_enc._version, self.W_enc.data_ptr())
        with self._low_lock:
            if self._low_key != key or self._low_encoder is None:
                self._low_encoder = Linear(self.W_enc.detach().to(dtype).t(), keep_weight=False)
                self._low_key = key
            return self._low_encoder

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Normalised-space reconstruction from (n, k) codes, by embedding bag (no dense latents)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def encode_selected(self, xn: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(n, k) activations of the given latents of normalised inputs (differentiable)."""
        w = self.W_enc.t()[indices]  # (n, k, d_model)
        return F.relu(torch.einsum("nd,nkd->nk", xn - self.b_dec, w) + self.b_enc[indices])

    def coactive_cosine(self, indices: torch.Tensor) -> torch.Tensor:
        """Mean squared cosine between the decoder rows of latents chosen for the same token, over all
        (n, k) codes' pairs (rows are unit-norm): the orthogonality penalty's term (differentiable)."""
        k = indices.shape[1]
        if k < 2:
            return self.W_dec.new_zeros(())
        rows = self.W_dec[indices]  # (n, k, d_model)
        gram = rows @ rows.transpose(1, 2)
        return (gram.pow(2).sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(1)).mean() / (k * (k - 1))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each decoder row, which normalisation would undo."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SaeOutput:
        """Reconstruction, codes, FVU and the training loss's auxiliary / sparsity term for raw inputs
        (n, d_model); `dead_mask` (num_latents,) marks latents that have not fired for a while."""
        raise NotImplementedError(f"{type(self).__name__} has no training loss; use an architecture subclass")

    # --- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> str:
        """Write folder `path` (`config.json` + `model.safetensors`, replacing what was there) atomically:
        a crash leaves the old folder or the new one, never a mix. Returns the weights' SHA-256."""
        with atomic_folder(path) as tmp:
            return self._write(tmp)

    def _write(self, folder: Path) -> str:
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(folder / SAE_WEIGHTS_FILE))
        digest = file_sha256(folder / SAE_WEIGHTS_FILE)
        header: dict[str, Any] = {
            "format_version": SAE_FORMAT_VERSION,
            "architecture": self.architecture,
            "d_model": self.d_model,
            "num_latents": self.num_latents,
            "k": self.config.k,
            "config": to_dict(self.config),
            "weights_sha256": digest,
            "metadata": self.metadata,
        }
        header["checksum"] = json_checksum(header)
        write_json_atomic(folder / SAE_CONFIG_FILE, header)
        self.weights_sha256 = digest
        return digest
