"""Result tables (Markdown) and plots (matplotlib) of a benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    head = (
        "| method | nDCG@10 | R@100 | MRR@10 | latents/passage | latents/query | disk bytes/passage "
        "| query p50 ms | query p95 ms |"
    )
    lines = [f"## {title}", "", head, "|" + " --- |" * 9]
    for row in rows:
        m, lat = row["metrics"], row["latency"]
        active = row.get("active_latents", {})
        setting = row.get("setting")
        name = row["method"] + (f" ({', '.join(f'{k}={v}' for k, v in setting.items())})" if setting else "")
        lines.append(
            f"| {name} | {m['nDCG@10']:.4f} | {m['R@100']:.4f} | {m['RR@10']:.4f} "
            f"| {active.get('per_passage', float('nan')):.1f} | {active.get('per_query', float('nan')):.1f} "
            f"| {row['index_bytes']['disk_per_passage']:.0f} | {lat['p50_ms']:.1f} | {lat['p95_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], prefix: Path, title: str) -> list[str]:
    """Quality per method, quality against active latents per passage, latency per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        row["method"] + (" " + ",".join(f"{k}={v}" for k, v in row["setting"].items()) if row.get("setting") else "")
        for row in rows
    ]
    written = []
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 3), 4))
    ax.bar(range(len(rows)), [row["metrics"]["nDCG@10"] for row in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"{title}: quality per method")
    fig.tight_layout()
    fig.savefig(f"{prefix}_quality.png", dpi=120)
    written.append(f"{prefix}_quality.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"ragsae-sparse": "tab:blue", "ragsae-faiss": "tab:orange", "ragsae-fused": "tab:green"}
    for method, colour in colours.items():
        mine = [row for row in rows if row["method"] == method]
        ax.scatter(
            [r["active_latents"]["per_passage"] for r in mine],
            [r["metrics"]["nDCG@10"] for r in mine],
            color=colour,
            label=method,
        )
        for r in mine:
            if r.get("setting"):
                label = ",".join(f"{k}={v}" for k, v in r["setting"].items())
                ax.annotate(
                    label,
                    (r["active_latents"]["per_passage"], r["metrics"]["nDCG@10"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    for row in rows:
        if "active_latents" not in row:
            ax.axhline(row["metrics"]["nDCG@10"], linestyle="--", color="gray")
            ax.annotate(
                row["method"],
                (0.01, row["metrics"]["nDCG@10"]),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                va="bottom",
            )
    ax.set_xlabel("active latents per passage")
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"{title}: quality vs code size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{prefix}_latents.png", dpi=120)
    written.append(f"{prefix}_latents.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 3), 4))
    ax.bar(range(len(rows)), [row["latency"]["p50_ms"] for row in rows], color="tab:orange", label="p50")
    ax.scatter(
        range(len(rows)), [row["latency"]["p95_ms"] for row in rows], color="black", marker="_", s=200, label="p95"
    )
    ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("single-query latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"{title}: query latency")
    fig.tight_layout()
    fig.savefig(f"{prefix}_latency.png", dpi=120)
    written.append(f"{prefix}_latency.png")
    plt.close(fig)
    return written
