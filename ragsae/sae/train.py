"""Training an SAE on captured activations: Adam with warm-up and cosine decay, unit-norm decoder rows,
an optional orthogonality penalty on co-firing latents' decoder rows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import SaeConfig
from ..errors import TrainingError
from .base import SparseAutoencoder
from .evaluate import evaluate_sae
from .registry import create_sae


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
    dense_fraction: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


def _sample_rows(values: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    if values.shape[0] <= max_rows:
        return np.array(values)  # a writable in-memory copy (inputs may be read-only memmaps)
    rows = np.sort(np.random.default_rng(seed).choice(values.shape[0], max_rows, replace=False))
    return np.array(values[rows])


def optimiser_step(
    sae: SparseAutoencoder, optimiser: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float
) -> None:
    """One update that keeps decoder rows at unit norm: the gradient along each row is dropped (the
    renormalisation would undo it), gradients are clipped, and rows are renormalised after the step."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grads()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimiser.step()
    sae.normalise_decoder()


def train_sae(
    activations: np.ndarray,
    config: SaeConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    start_from: SparseAutoencoder | None = None,
) -> tuple[SparseAutoencoder, TrainReport]:
    """Train an SAE on (n_tokens, d_model) activations; returns the model and its report.

    `start_from` continues from a trained SAE's weights and input normalisation (light re-training on
    new activations) instead of a fresh initialisation; `config` must give it the same shape.

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
        raise TrainingError(
            f"SAE training needs at least one batch of {config.batch_size} training tokens (SaeConfig.batch_size, "
            f"--sae-batch-size), got {n}: add text to the corpus, lower the batch size, or reuse a trained SAE"
        )
    sae = create_sae(config, d_model)
    if start_from is None:
        sae.set_normalisation(data[: min(n, 100_000)])
    else:
        if (start_from.num_latents, start_from.d_model, start_from.architecture) != (
            config.num_latents,
            d_model,
            config.architecture,
        ):
            raise TrainingError(
                f"cannot continue training a {start_from.architecture} SAE of {start_from.num_latents} latents over "
                f"{start_from.d_model} dims as a {config.architecture} SAE of {config.num_latents} over {d_model}"
            )
        sae.load_state_dict(start_from.state_dict())
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
                if config.ortho_coef:
                    loss = loss + config.ortho_coef * sae.coactive_cosine(out.indices)
            optimiser_step(sae, optimiser, loss, config.grad_clip)
            scheduler.step()
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
        stats["fvu"],
        stats["mean_l0"],
        stats["dead_fraction"],
        total,
        n * config.epochs,
        seconds,
        losses,
        stats["dense_fraction"],
    )
    sae.metadata["train"] = report.to_json()
    return sae.cpu(), report
