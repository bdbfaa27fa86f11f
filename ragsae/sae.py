"""Sparse autoencoder over residual-stream activations: model, losses, training, save/load.

TopK activation with AuxK against dead latents follows Gao et al., "Scaling and evaluating
sparse autoencoders" (2024); 'relu' is the ReLU + L1 dictionary of Bricken et al. (2023);
'kl' is the classic sparse-autoencoder penalty KL(rho || rho_hat) on mean latent activity.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import SaeConfig, from_dict, to_dict
from .linear import Linear
from .storage import file_sha256, read_versioned_json, write_json_atomic

logger = logging.getLogger(__name__)

SAE_FORMAT_VERSION = 1
SAE_CONFIG_FILE = "config.json"
SAE_WEIGHTS_FILE = "model.safetensors"


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


class SaeLoadError(ValueError):
    """A saved SAE folder that cannot be loaded; the message names the file and field."""


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: ||x - recon||^2 / ||x - mean(x)||^2."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - recon).pow(2).sum() / total.clamp_min(1e-12)


def kl_sparsity(acts: torch.Tensor, target: float) -> torch.Tensor:
    """KL(rho || rho_hat) summed over latents; rho_hat is the batch mean of tanh(activation) in [0, 1)."""
    rho_hat = torch.tanh(acts).mean(0).clamp(1e-6, 1 - 1e-6)
    rho = torch.full_like(rho_hat, target)
    return (rho * (rho / rho_hat).log() + (1 - rho) * ((1 - rho) / (1 - rho_hat)).log()).sum()


class SparseAutoencoder(nn.Module):
    """Encoder, sparse activation and unit-norm decoder, on normalised inputs.

    Inputs are normalised as (x - input_mean) / input_scale with statistics of the training
    data, so that E||x||^2 = d_model whatever the layer's scale.
    """

    def __init__(self, config: SaeConfig, d_model: int):
        super().__init__()
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
        half the encoder weights to read (the costly part on a CPU: 1.3 -> 0.25 ms for a query of
        four tokens), exact values, and only near-ties chosen differently.
        """
        xn = self.normalise(x)
        if select_dtype == torch.float32:
            values, indices = self.pre_acts(xn).topk(self.config.k, dim=1, sorted=False)
            return TopK(values, indices)
        low = self._encoder_product(select_dtype)((xn - self.b_dec).to(select_dtype))
        indices = low.float().add_(self.b_enc).topk(self.config.k, dim=1, sorted=False).indices
        return TopK(self.encode_selected(xn, indices), indices)

    def _encoder_product(self, dtype: torch.dtype) -> Linear:
        """x -> x @ W_enc with W_enc in `dtype` (prepacked on CPU in bfloat16: `linear.py`), made once
        per weight update (tracked by the tensor's version)."""
        key = (dtype, self.W_enc._version, self.W_enc.data_ptr())
        if self._low_key != key:
            self._low_encoder = Linear(self.W_enc.detach().to(dtype).t(), keep_weight=False)
            self._low_key = key
        return self._low_encoder

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Normalised-space reconstruction from (n, k) codes, by embedding bag (no dense latents)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> SaeOutput:
        """Reconstruction, codes, FVU and the auxiliary/sparsity loss for raw inputs (n, d_model)."""
        xn = self.normalise(x)
        cfg = self.config
        if cfg.architecture == "topk":
            # Select latents without autograd, then recompute only the chosen k with it: the
            # backward pass costs O(n k d) instead of O(n num_latents d) (as EleutherAI/sparsify).
            with torch.no_grad():
                indices = self.pre_acts(xn).topk(cfg.k, dim=1, sorted=False).indices
            values = self.encode_selected(xn, indices)
            recon = self.decode(values, indices)
            aux = self._auxk_loss(xn, recon, dead_mask)
        else:
            acts = self.pre_acts(xn)
            values, indices = acts.topk(cfg.k, dim=1, sorted=False)
            recon = acts @ self.W_dec + self.b_dec
            if cfg.architecture == "relu":
                # L1 on activations weighted by decoder norms (unit here), per token.
                aux = cfg.l1_coef * acts.sum(1).mean()
            else:
                aux = cfg.kl_coef * kl_sparsity(acts, cfg.kl_target)
        return SaeOutput(recon, values, indices, fvu(xn, recon), aux)

    def encode_selected(self, xn: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(n, k) activations of the given latents of normalised inputs (differentiable)."""
        w = self.W_enc.t()[indices]  # (n, k, d_model)
        return F.relu(torch.einsum("nd,nkd->nk", xn - self.b_dec, w) + self.b_enc[indices])

    def _auxk_loss(self, xn: torch.Tensor, recon: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """Dead latents reconstruct the residual (AuxK, Gao et al. 2024), which gives them gradient."""
        if dead_mask is None or not bool(dead_mask.any()) or self.config.auxk_coef == 0:
            return recon.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.config.auxk_k, len(dead))
        dead_acts = F.relu((xn - self.b_dec) @ self.W_enc[:, dead] + self.b_enc[dead])
        values, local = dead_acts.topk(k_aux, dim=1, sorted=False)
        residual = (xn - recon).detach()
        aux_recon = F.embedding_bag(dead[local], self.W_dec, per_sample_weights=values, mode="sum")
        return self.config.auxk_coef * fvu(residual, aux_recon).nan_to_num(0.0)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each decoder row, which normalisation would undo."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    # --- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> str:
        """Write `config.json` + `model.safetensors` into folder `path` atomically; returns the weights hash."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        tmp_weights = path / f".{SAE_WEIGHTS_FILE}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp_weights))
        digest = file_sha256(tmp_weights)
        header = {
            "format_version": SAE_FORMAT_VERSION,
            "architecture": self.config.architecture,
            "d_model": self.d_model,
            "num_latents": self.num_latents,
            "k": self.config.k,
            "config": to_dict(self.config),
            "weights_sha256": digest,
            "metadata": self.metadata,
        }
        write_json_atomic(path / SAE_CONFIG_FILE, header)
        os.replace(tmp_weights, path / SAE_WEIGHTS_FILE)
        self.weights_sha256 = digest
        return digest

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Load and validate a folder written by `save` (format version, shapes, checksum)."""
        path = Path(path)
        weights_path = path / SAE_WEIGHTS_FILE
        header = read_versioned_json(path / SAE_CONFIG_FILE, SAE_FORMAT_VERSION, SaeLoadError, "an SAE folder")
        if not weights_path.is_file():
            raise SaeLoadError(f"{weights_path}: missing")
        digest = file_sha256(weights_path)
        if header.get("weights_sha256") != digest:
            raise SaeLoadError(f"{weights_path}: checksum mismatch (file changed or truncated)")
        config = from_dict(SaeConfig, header["config"])
        sae = cls(config, int(header["d_model"]))
        tensors = load_file(str(weights_path))
        expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != got:
            raise SaeLoadError(f"{weights_path}: tensor shapes {got} do not match config {expected}")
        sae.load_state_dict(tensors)
        sae.metadata = header.get("metadata", {})
        sae.weights_sha256 = digest
        return sae.to(device).eval()


@dataclass
class TrainReport:
    """Training outcome, measured on the training activations after the last step."""

    fvu: float
    mean_l0: float
    dead_fraction: float
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


def _sample_rows(values: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    if values.shape[0] <= max_rows:
        return np.array(values)  # a writable in-memory copy (inputs may be read-only memmaps)
    rows = np.sort(np.random.default_rng(seed).choice(values.shape[0], max_rows, replace=False))
    return np.array(values[rows])


def train_sae(
    activations: np.ndarray,
    config: SaeConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[SparseAutoencoder, TrainReport]:
    """Train an SAE on (n_tokens, d_model) activations; returns the model and its report.

    Adam with warm-up and cosine decay, gradient clipping, decoder rows kept at unit norm,
    bf16 autocast on CUDA. Deterministic for a given seed on one CPU type (another CPU's kernels round
    differently, and training drifts to another SAE).
    """
    config = config or SaeConfig()
    device = torch.device(device)
    torch.manual_seed(config.seed)
    data = torch.from_numpy(_sample_rows(activations, config.max_tokens, config.seed))
    n, d_model = data.shape
    if n < config.batch_size:
        raise ValueError(f"need at least batch_size={config.batch_size} training tokens, got {n}")
    sae = SparseAutoencoder(config, d_model)
    sae.set_normalisation(data[: min(n, 100_000)])
    sae.to(device).train()
    optimiser = torch.optim.Adam(sae.parameters(), lr=config.lr, betas=(0.9, 0.999))
    steps_per_epoch = n // config.batch_size
    total = steps_per_epoch * config.epochs
    warmup = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    since_fired = torch.zeros(config.num_latents, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(config.seed)
    use_amp = device.type == "cuda"
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"train SAE ({config.architecture})", disable=not progress)
    for _epoch in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        for step in range(steps_per_epoch):
            batch = data[perm[step * config.batch_size : (step + 1) * config.batch_size]].to(device).float()
            dead = since_fired > config.dead_after_tokens
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = sae(batch, dead_mask=dead)
                loss = out.fvu + out.aux_loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grads()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
            optimiser.step()
            scheduler.step()
            sae.normalise_decoder()
            with torch.no_grad():
                fired = torch.zeros(config.num_latents, dtype=torch.bool, device=device)
                fired[out.indices[out.values > 0]] = True
                since_fired += config.batch_size
                since_fired[fired] = 0
            losses.append(loss.item())
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(fvu=f"{out.fvu.item():.3f}", dead=f"{float(dead.float().mean()):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    sae.eval()
    stats = evaluate_sae(sae, data, device)
    report = TrainReport(
        stats["fvu"], stats["mean_l0"], stats["dead_fraction"], total, n * config.epochs, seconds, losses
    )
    sae.metadata["train"] = report.to_json()
    return sae.cpu(), report


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder, data: torch.Tensor | np.ndarray, device: str | torch.device = "cpu", batch_size: int = 4096
) -> dict[str, float]:
    """FVU (of the stored, k-capped codes), mean L0 and dead-latent fraction over `data`."""
    data = torch.as_tensor(np.asarray(data)) if isinstance(data, np.ndarray) else data
    sae = sae.to(device)
    err = total = l0 = 0.0
    mean = sae.normalise(data[:100_000].to(device)).mean(0)
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    for start in range(0, data.shape[0], batch_size):
        batch = data[start : start + batch_size].to(device).float()
        xn = sae.normalise(batch)
        codes = sae.encode(batch)
        recon = sae.decode(codes.values, codes.indices)
        err += float((xn - recon).pow(2).sum())
        total += float((xn - mean).pow(2).sum())
        active = codes.values > 0
        l0 += float(active.sum())
        fired[codes.indices[active]] = True
    return {
        "fvu": err / max(total, 1e-12),
        "mean_l0": l0 / data.shape[0],
        "dead_fraction": 1.0 - float(fired.float().mean()),
    }
