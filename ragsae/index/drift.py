"""Drift: how far new passages are from what the index's SAE was trained on and what is indexed.

Two signals decide (`DriftConfig`): the SAE's reconstruction error on the new passages' tokens against
its training figure (a model that no longer explains its inputs), and the divergence of the latents'
passage frequencies in the new passages from those in the index, against the divergence a random
sample of indexed passages of the same size shows (so that a small batch is not mistaken for a
different one). L0, dead and over-active latents are reported beside them.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np
import torch

from ..config import DriftConfig
from ..sae import SparseAutoencoder
from ..sae.evaluate import evaluate_sae


def jensen_shannon(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) of two count vectors taken as distributions."""
    p = p_counts / max(1.0, float(p_counts.sum()))
    q = q_counts / max(1.0, float(q_counts.sum()))
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        found = a > 0
        return float((a[found] * np.log2(a[found] / m[found])).sum())

    return (kl(p) + kl(q)) / 2


def sample_tokens(values: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    if len(values) <= limit:
        return np.asarray(values)
    rows = np.sort(np.random.default_rng(seed).choice(len(values), limit, replace=False))
    return np.asarray(values[rows])


def drift_report(
    sae: SparseAutoencoder,
    token_values: np.ndarray,
    new_counts: np.ndarray,
    new_passages: int,
    indexed_counts: np.ndarray,
    indexed_passages: int,
    baseline_counts: np.ndarray,
    baseline_passages: int,
    config: DriftConfig,
    operation: str,
) -> dict[str, Any]:
    """The drift of `new_passages` passages whose tokens' activations are `token_values` and whose
    latents fire on `new_counts` of them, against an index of `indexed_passages` passages
    (`indexed_counts`) and a random sample of `baseline_passages` indexed passages (`baseline_counts`).

    A sample's divergence from the distribution it was drawn from falls as 1/size (the chi-square
    approximation), so a baseline sample smaller than the new batch is scaled to the batch's size."""
    tokens = sample_tokens(token_values, config.sample_tokens)
    measured = evaluate_sae(sae, torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32)))
    train = sae.metadata.get("train", {})
    train_fvu, train_l0 = train.get("fvu"), train.get("mean_l0")
    divergence = jensen_shannon(new_counts, indexed_counts)
    baseline = jensen_shannon(baseline_counts, indexed_counts) * baseline_passages / max(1, new_passages)
    new_freq = new_counts / max(1, new_passages)
    indexed_freq = indexed_counts / max(1, indexed_passages)
    common = indexed_freq >= 0.01
    report: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "operation": operation,
        "passages": new_passages,
        "indexed_passages": indexed_passages,
        "tokens_measured": len(tokens),
        "fvu": measured["fvu"],
        "train_fvu": train_fvu,
        "fvu_ratio": measured["fvu"] / train_fvu if train_fvu else None,
        "mean_l0": measured["mean_l0"],
        "train_mean_l0": train_l0,
        "dead_fraction": float((common & (new_counts == 0)).sum() / max(1, common.sum())),
        "overactive_fraction": float((new_freq > config.overactive).mean()),
        "indexed_overactive_fraction": float((indexed_freq > config.overactive).mean()),
        "divergence": divergence,
        "baseline_divergence": baseline,
        "divergence_ratio": divergence / baseline if baseline > 0 else None,
    }
    reasons = []
    if report["fvu_ratio"] is not None and report["fvu_ratio"] > config.max_fvu_ratio:
        reasons.append(
            f"FVU {report['fvu']:.3f} is {report['fvu_ratio']:.2f}x the training FVU (> {config.max_fvu_ratio})"
        )
    if report["divergence_ratio"] is not None and report["divergence_ratio"] > config.max_divergence_ratio:
        reasons.append(
            f"latent-frequency divergence {divergence:.3f} is {report['divergence_ratio']:.2f}x that of a same-size "
            f"sample of indexed passages (> {config.max_divergence_ratio})"
        )
    report["needs_retrain"] = bool(reasons)
    report["reasons"] = reasons
    return report


def plot_history(history: list[dict[str, Any]], path: str) -> None:
    """Draw FVU ratio and divergence ratio of each report over time, with the thresholds crossed marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, key, label in (
        (axes[0], "fvu_ratio", "FVU / training FVU"),
        (axes[1], "divergence_ratio", "latent divergence / same-size sample"),
    ):
        values = [r.get(key) if r.get(key) is not None else np.nan for r in history]
        ax.plot(steps, values, marker="o")
        flagged = [i for i, r in enumerate(history) if r.get("needs_retrain")]
        ax.plot(steps[flagged], np.array(values)[flagged], "rx", markersize=10, label="needs retraining")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    axes[1].set_xlabel("change (add / upsert), oldest first")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
