"""One figure of every exploration study's nDCG@10 against its own baseline and the reference methods.

python research/plot_explorations.py [RESULTS_DIR]

Reads RESULTS_DIR/<collection>-explore-<study>.json (written by explore.py) and
RESULTS_DIR/<collection>.json (the default benchmark, for the BM25 and MiniLM lines) and writes
RESULTS_DIR/<collection>-explorations.png per collection.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def reference_lines(results: Path, collection: str) -> dict[str, float]:
    """nDCG@10 of bm25 and dense-minilm in the collection's default benchmark, if present."""
    path = results / f"{collection}.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {row["method"]: row["metrics"]["nDCG@10"] for row in rows if row["method"] in ("bm25", "dense-minilm")}


def baseline_row(rows: list[dict]) -> dict:
    """The row a study compares against: 'baseline...', the one marked '(default)', else the first."""
    for row in rows:
        if row["setting"].startswith("baseline") or "(default)" in row["setting"]:
            return row
    return rows[0]


def plot_collection(results: Path, collection: str, studies: list[Path]) -> Path:
    labels, values, baselines = [], [], []
    for path in studies:
        data = json.loads(path.read_text())
        reference = baseline_row(data["rows"])
        base = reference["metrics"]["nDCG@10"]
        for row in data["rows"]:
            if row is reference:
                continue
            labels.append(f"{data['study']}: {row['setting']}")
            values.append(row["metrics"]["nDCG@10"])
            baselines.append(base)
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(labels) + 1.8))
    y = range(len(labels))
    ax.barh(
        y,
        [v - b for v, b in zip(values, baselines)],
        color=["tab:green" if v >= b else "tab:red" for v, b in zip(values, baselines)],
    )
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    base = baselines[0] if baselines else 0.0
    for name, score in reference_lines(results, collection).items():
        ax.axvline(score - base, linestyle="--", color="grey")
        ax.text(score - base, -0.8, name, fontsize=7, ha="center")
    ax.set_xlabel(f"nDCG@10 minus its study's baseline (dashed: BM25 and MiniLM minus {base:.4f})")
    ax.set_title(f"{collection}: explorations")
    fig.tight_layout()
    out = results / f"{collection}-explorations.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    results = Path(argv[0] if argv else "benchmarks/results")
    by_collection: dict[str, list[Path]] = {}
    for path in sorted(results.glob("*-explore-*.json")):
        by_collection.setdefault(path.name.split("-explore-")[0], []).append(path)
    if not by_collection:
        print(f"no *-explore-*.json in {results}", file=sys.stderr)
        return 1
    for collection, studies in by_collection.items():
        print(plot_collection(results, collection, studies))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
