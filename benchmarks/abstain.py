"""Can retrieval tell a question the index answers from one it cannot? Signals for `RAG(min_support=...)`.

python benchmarks/abstain.py ../shared/datasets/msmarco-5k ../shared/datasets/cranfield

Each collection's index is built as `ragsae bench` builds it (default `BuildConfig`, passages split
the same way, activations and SAE read from `--cache-dir`; nothing is captured or trained: a missing
cache entry is an error). Answerable questions are a collection's own judged queries against its own
index; unanswerable ones are the other collection's judged queries against that index (web questions
and aeronautics abstracts share no subject). Each signal is computed per query from its sparse latent
weights, without pseudo-relevance feedback ("plain") and with it ("feedback"), and the passage that
those weights score highest:

- support: `Retriever.support`, the cosine between the query weights times their IDF and the
  passage's BM25 latent weights (what `RAG(min_support=...)` thresholds, on the plain variant);
- cosine: the same without IDF on the query side;
- score/norm: the top sparse score divided by the query vector's norm;
- mass: the fraction of the query's latent weight mass on latents the passage has;
- score: the top sparse score itself;
- relative support: plain support divided by the index's background support, the mean support of
  random-word questions (`ragsae.abstention`; what `RAG(min_relative_support=...)` thresholds).

Reported per signal and collection: ROC AUC (answerable vs unanswerable), and the balanced accuracy
of "answer when signal >= threshold" with the threshold chosen on the FIRST collection only (the
midpoint between neighbouring values that maximises balanced accuracy there) and applied unchanged to
the second. The threshold for `plain support` is a `min_support` for indexes built like these (default
`BuildConfig`); support's scale moves with the SAE and the corpus, so it is no default for every
index. The library's default `min_relative_support` is chosen on the FIRST collection by a rule meant
for a default, which should refuse an answerable question rarely: the largest multiple of 0.1 at least
0.1 below every answerable question's relative support (`default_threshold`). It is reported on both
collections. Writes OUTPUT_DIR/abstain.json (with every query's signals) and abstain.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from ragsae.abstention import measure_background
from ragsae.bench import BenchConfig, cached_sae, load_beir, timed_capture
from ragsae.bench import runner as bench_runner
from ragsae.capture import ActivationCache, activations_id
from ragsae.config import DEFAULT_MIN_RELATIVE_SUPPORT, BuildConfig, to_dict
from ragsae.encode import CodeEncoder
from ragsae.index import Index
from ragsae.lm import LoadedLlm, load_llm
from ragsae.provenance import command_line, git_commit, machine
from ragsae.retrieval.scoring import row_norms
from ragsae.storage import write_json_atomic, write_text_atomic
from ragsae.text import fingerprint, split_passages

VARIANTS = ("plain", "feedback")
"""Query weights the signals are computed from: pooled codes alone, or joined by feedback latents."""
MEASURES = ("support", "cosine", "score/norm", "mass", "score")
SUPPORT = "plain support"
"""The signal `RAG.min_support` thresholds (`RAG.support`)."""
RELATIVE = "relative support"
"""The signal `RAG.min_relative_support` thresholds: `SUPPORT` over the index's background."""
DEFAULT_STEP = 0.1
"""Grid and margin of `default_threshold`."""


# --- pure functions ------------------------------------------------------------------------------
def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting one half (Mann-Whitney U)."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("roc_auc needs at least one positive and one negative")
    ranks = rankdata(np.concatenate([positive, negative]))  # average ranks for ties
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def balanced_accuracy(positive: np.ndarray, negative: np.ndarray, threshold: float) -> float:
    """Mean of the positives kept (signal >= threshold) and the negatives refused (signal < threshold)."""
    kept = float(np.mean(np.asarray(positive) >= threshold))
    refused = float(np.mean(np.asarray(negative) < threshold))
    return (kept + refused) / 2


def choose_threshold(positive: np.ndarray, negative: np.ndarray) -> float:
    """The threshold maximising balanced accuracy among the midpoints between neighbouring distinct
    values (and one step beyond each end); ties go to the lowest, which answers more."""
    values = np.unique(np.concatenate([np.asarray(positive, float), np.asarray(negative, float)]))
    if len(values) == 1:
        return float(values[0])
    step = float(np.diff(values).min())
    candidates = np.concatenate([[values[0] - step], (values[:-1] + values[1:]) / 2, [values[-1] + step]])
    accuracy = [balanced_accuracy(positive, negative, t) for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def default_threshold(positive: np.ndarray, step: float = DEFAULT_STEP) -> float:
    """The largest multiple of `step` that is at least `step` below every positive: a threshold that keeps
    every answerable question of the collection it is chosen on with a margin, since the lowest of a
    few dozen questions is no bound on the next one."""
    return round((math.floor(float(np.min(positive)) / step) - 1) * step, 10)


def signals(weights: sp.csr_matrix, best: sp.csr_matrix) -> dict[str, np.ndarray]:
    """Per query row of `weights` (nq, m), the measures against row i of `best` (nq, m), the BM25
    latent weights of that query's top passage."""
    weights, best = weights.tocsr().astype(np.float64), best.tocsr().astype(np.float64)
    dot = np.asarray(weights.multiply(best).sum(axis=1)).ravel()
    q_norm, d_norm = row_norms(weights), row_norms(best)
    magnitude = abs(weights)
    matched = np.asarray(magnitude.multiply(best != 0).sum(axis=1)).ravel()
    total = np.asarray(magnitude.sum(axis=1)).ravel()
    safe = np.maximum
    return {
        "cosine": dot / safe(q_norm * d_norm, 1e-12),
        "score/norm": dot / safe(q_norm, 1e-12),
        "mass": matched / safe(total, 1e-12),
        "score": dot,
    }


def query_signals(index: Index, texts: list[str]) -> dict[str, np.ndarray]:
    """'variant measure' -> (len(texts),) signals of these queries against `index` (sparse scoring)."""
    retriever = index.retriever
    codes = index.encode_queries(texts).astype(np.float32)
    found: dict[str, np.ndarray] = {}
    for variant in VARIANTS:
        weights = codes if variant == "plain" else retriever.query_weights(codes)
        _, ids = retriever.sparse.search(weights, 1)
        # A query with no latents has no hit (-1): it matches nothing, so every signal is 0.
        rows = np.maximum(ids[:, 0], 0)
        best = retriever.sparse.rows(rows).multiply((ids[:, :1] >= 0).astype(np.float32)).tocsr()
        found[f"{variant} support"] = retriever.support(weights, ids[:, 0])
        for measure, values in signals(weights, best).items():
            found[f"{variant} {measure}"] = values
    return found


def compare(
    first: dict[str, dict[str, np.ndarray]], second: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Per signal: AUC on both collections, the threshold chosen on `first`, balanced accuracy with it on
    both. Each argument maps 'answerable' / 'unanswerable' to {signal: values}."""
    rows = {}
    for name in first["answerable"]:
        threshold = choose_threshold(first["answerable"][name], first["unanswerable"][name])
        row: dict[str, float] = {"threshold": threshold}
        for label, side in (("first", first), ("second", second)):
            row[f"auc_{label}"] = roc_auc(side["answerable"][name], side["unanswerable"][name])
            row |= {f"{key}_{label}": value for key, value in at_threshold(side, name, threshold).items()}
        rows[name] = row
    return rows


def at_threshold(side: dict[str, dict[str, np.ndarray]], name: str, threshold: float) -> dict[str, float]:
    """Balanced accuracy, answerable share answered and unanswerable share refused, for signal `name`."""
    pos, neg = side["answerable"][name], side["unanswerable"][name]
    return {
        "balanced_accuracy": balanced_accuracy(pos, neg, threshold),
        "answered": float(np.mean(pos >= threshold)),
        "abstained": float(np.mean(neg < threshold)),
    }


# --- the collections -----------------------------------------------------------------------------
@contextlib.contextmanager
def no_training() -> Iterator[None]:
    """`cached_sae` trains an SAE when none is cached: here that is an error, not a long detour."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise SystemExit("no cached SAE for this collection: run `ragsae bench` on it first")

    trained = bench_runner.fit_sae
    bench_runner.fit_sae = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        bench_runner.fit_sae = trained


def cached_index(llm: LoadedLlm, dataset: str, bench: BenchConfig) -> Index:
    """The index `ragsae bench` builds on `dataset` (`run_ragsae`), from cached activations and SAE."""
    documents, _, _ = load_beir(dataset, bench.split)
    build = bench.build
    passages = split_passages(documents, llm.tokenizer, build.capture.window, build.capture.overlap)
    texts = [p.text for p in passages]
    cache = ActivationCache(Path(bench.cache_dir) / "activations")
    cap = build.capture
    entry = cache.entry(activations_id(llm, cap.layer, cap.window, cap.passage_prefix, fingerprint(texts)))
    if cache.load(entry) is None:
        raise SystemExit(f"{dataset}: no cached activations in {bench.cache_dir}: run `ragsae bench` on it first")
    acts, _ = timed_capture(llm, texts, cap, cache, progress=False, need_timing=False)
    with no_training():
        sae = cached_sae(llm, texts, acts, cap, build.sae, Path(bench.cache_dir), progress=False)
    sae = sae.to(llm.device).eval()
    encoder = CodeEncoder(llm, sae, cap, build.scoring.pooling)
    pooled = encoder.pool_activations(acts)
    return Index.from_codes(encoder, passages, pooled, dataclasses.replace(build, sae=sae.config))


def markdown(result: dict[str, Any]) -> str:
    first, second = result["collections"]
    lines = [
        f"## Answerable vs unanswerable questions: {first} and {second}",
        "",
        f"Answerable: a collection's judged queries on its own index ({result['queries'][first]} and "
        f"{result['queries'][second]}); unanswerable: the other collection's on that index. Threshold "
        f"chosen on {first} (maximum balanced accuracy), applied unchanged to {second}.",
        "",
        f"| signal | AUC {first} | AUC {second} | threshold | bal. acc. {first} | bal. acc. {second} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["signals"].items():
        lines.append(
            f"| {name} | {row['auc_first']:.3f} | {row['auc_second']:.3f} | {row['threshold']:.4g} | "
            f"{row['balanced_accuracy_first']:.3f} | {row['balanced_accuracy_second']:.3f} |"
        )
    chosen = result["signals"][SUPPORT]
    rule, at_default = result["default_rule"], result["at_library_default"]
    lines += [
        "",
        f"`RAG(min_support=...)` thresholds `{SUPPORT}`: at {chosen['threshold']:.4g} it answers "
        f"{chosen['answered_first']:.1%} of answerable and refuses {chosen['abstained_first']:.1%} of unanswerable "
        f"questions on {first}, {chosen['answered_second']:.1%} and {chosen['abstained_second']:.1%} on {second}.",
        "",
        f"`RAG(min_relative_support=...)` thresholds `{RELATIVE}` (backgrounds: "
        + ", ".join(f"{name} {value:.4f}" for name, value in result["backgrounds"].items())
        + f"). The default rule on {first} gives {rule['threshold']:g}; the library's default is "
        f"{rule['library_default']:g}. At it: answered {at_default[first]['answered']:.1%} / refused "
        f"{at_default[first]['abstained']:.1%} on {first}, {at_default[second]['answered']:.1%} / "
        f"{at_default[second]['abstained']:.1%} on {second}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="BEIR folder the threshold is chosen on")
    parser.add_argument("second", help="BEIR folder it is confirmed on")
    parser.add_argument("--cache-dir", default="benchmarks/.cache", help="the benchmark cache (as `ragsae bench`)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)

    commit = git_commit()  # the code that runs, not what HEAD is by the end
    build = BuildConfig()
    llm = load_llm(build.llm)
    datasets = [args.first, args.second]
    names = [Path(d).resolve().name for d in datasets]
    queries = {name: load_beir(d, "test")[1] for name, d in zip(names, datasets)}
    per_collection: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    backgrounds: dict[str, float] = {}
    for own, other, dataset in ((names[0], names[1], datasets[0]), (names[1], names[0], datasets[1])):
        index = cached_index(llm, dataset, BenchConfig(dataset=dataset, cache_dir=args.cache_dir, build=build))
        per_collection[own] = {
            "answerable": query_signals(index, list(queries[own].values())),
            "unanswerable": query_signals(index, list(queries[other].values())),
        }
        background = measure_background(index)
        if background is None:
            raise SystemExit(f"{dataset}: no background support (the tokenizer has too few whole-word tokens)")
        backgrounds[own] = background
        for side in per_collection[own].values():
            side[RELATIVE] = side[SUPPORT] / background
        del index
    default = default_threshold(per_collection[names[0]]["answerable"][RELATIVE])
    at_default = {name: at_threshold(per_collection[name], RELATIVE, DEFAULT_MIN_RELATIVE_SUPPORT) for name in names}
    result: dict[str, Any] = {
        "collections": names,
        "queries": {name: len(queries[name]) for name in names},
        "command": command_line(),
        "git_commit": commit,
        "machine": machine(),
        "config": to_dict(build),
        "signals": compare(per_collection[names[0]], per_collection[names[1]]),
        "library_signal": SUPPORT,
        "backgrounds": backgrounds,
        "default_rule": {"threshold": default, "library_default": DEFAULT_MIN_RELATIVE_SUPPORT, "step": DEFAULT_STEP},
        "at_library_default": at_default,
        "per_query": {
            name: {
                side: {"qids": list(queries[name if side == "answerable" else other].keys())}
                | {signal: values.tolist() for signal, values in per_collection[name][side].items()}
                for side in ("answerable", "unanswerable")
            }
            for name, other in ((names[0], names[1]), (names[1], names[0]))
        },
    }
    table = markdown(result)
    print(table)
    if not math.isclose(default, DEFAULT_MIN_RELATIVE_SUPPORT):
        print(f"note: the rule gives {default:g}, the library's default is {DEFAULT_MIN_RELATIVE_SUPPORT:g}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "abstain.json", result)
    write_text_atomic(out / "abstain.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
