"""Latent labels: how well does a label predict where its latent fires, and what does describing the
latents add to a build? (issue 17)

python benchmarks/latent_labels.py ../shared/datasets/msmarco-5k

The index is the one `ragsae bench` builds on the collection (default `BuildConfig`, passages split the
same way, activations and SAE read from `--cache-dir`: nothing is captured or trained, a missing cache
entry is an error).

Cost: `describe_latents` over every passage, wall and CPU seconds (the machine's load average is
recorded beside them: the benchmark machine is shared), split into the SAE encoding of every token
(which a build already does once to pool the codes), the counting that streams over those codes, and
the rest (characteristic tokens, logit lens, nearest latents, cards); bytes of `latents.json` and of
the atlas.

Quality: documents are split 80/20 by a hash of their id. Latents are described on the passages of
the 80% and their labels judged on the held-out 20%, for a random sample of `--sample` latents that
fire in both. A label's words W are its parts (split at ' · '), and a token "carries the label" when
its text, stripped and case-folded, is one of W. Per latent:

- token precision: the share of held-out tokens carrying the label on which the latent fires;
- token recall: the share of the latent's held-out firings that are on tokens carrying the label;
- passage precision / recall: the same over held-out passages (passage carries the label: one of its
  tokens does; latent active: it fires on one of its tokens), the check the issue suggests.

Means are over the sampled latents (precision over those whose label occurs in the held-out passages;
F1 per latent, 0 where the label never occurs). Labels compared: from characteristic tokens ranked by
'lift' and by 'kl' (`describe.characteristic_scores`), each with 1, 5 and 20 pseudo-occurrences of
smoothing, from the statistics of one pass; from the logit lens (its first 3 tokens); and chance (each
latent judged by another sampled latent's default label). Writes
OUTPUT_DIR/latent-labels-COLLECTION.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ragsae.bench import BenchConfig, cached_sae, load_beir
from ragsae.bench import runner as bench_runner
from ragsae.capture import ActivationCache, TokenActivations, activations_id
from ragsae.encode import encode_tokens, selection_dtype
from ragsae.latents import LatentCatalog, passage_tokens, write_atlas
from ragsae.latents.catalog import search_key
from ragsae.latents.describe import DescribeSettings, LatentStatistics, catalog_of, make_label
from ragsae.lm import LoadedLlm, load_llm
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.storage import write_json_atomic, write_text_atomic
from ragsae.text import Passage, fingerprint, split_passages


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


def subset(acts: TokenActivations, rows: np.ndarray) -> TokenActivations:
    """The activations of passages `rows` (in that order)."""
    lengths = np.diff(acts.offsets)[rows]
    index = np.concatenate([np.arange(acts.offsets[r], acts.offsets[r + 1]) for r in rows])
    return TokenActivations(np.asarray(acts.values[index]), np.concatenate([[0], np.cumsum(lengths)]))


def held_out(doc_id: str, share: float) -> bool:
    """Whether a document is in the held-out share (a stable hash of its id)."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 16**8 < share


def timed_describe(
    llm: LoadedLlm, sae: Any, passages: list[Passage], acts: TokenActivations, build: Any
) -> dict[str, Any]:
    """`describe_latents`' steps, each timed (wall and CPU seconds), and the catalog's sizes."""
    cost: dict[str, Any] = {"load_average_before": os.getloadavg()}
    settings = DescribeSettings()
    select = selection_dtype(llm)
    wall, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, int(acts.offsets[-1]), 8192 * 8):
        encode_tokens(sae, acts.values[lo : lo + 8192 * 8], select_dtype=select)
    cost["sae_encode_only"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = passage_tokens(llm, [p.text for p in passages], build.capture)
    stats = LatentStatistics(sae.num_latents, tokens, [p.doc_id for p in passages], settings.top_contexts)
    bounds = list(range(0, len(passages), settings.chunk_passages)) + [len(passages)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        a, b = int(acts.offsets[lo]), int(acts.offsets[hi])
        stats.add(a, *encode_tokens(sae, acts.values[a:b], select_dtype=select))
    cost["encode_and_count"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    wall, cpu = time.perf_counter(), time.process_time()
    catalog = catalog_of(stats, llm, sae, passages, build.capture, settings)
    cost["cards"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    cost["describe_total_wall_s"] = cost["encode_and_count"]["wall_s"] + cost["cards"]["wall_s"]
    cost["describe_total_cpu_s"] = cost["encode_and_count"]["cpu_s"] + cost["cards"]["cpu_s"]
    cost["load_average_after"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        catalog.save(tmp)
        size = (Path(tmp) / "latents.json").stat().st_size
        wall = time.perf_counter()
        LatentCatalog.load(tmp)
        cost["catalog_load_s"] = time.perf_counter() - wall
        atlas = write_atlas(catalog, Path(tmp) / "atlas.html").stat().st_size
    cost |= {
        "passages": len(passages),
        "tokens": int(acts.offsets[-1]),
        "live_latents": len(catalog),
        "num_latents": catalog.num_latents,
        "catalog_bytes": size,
        "catalog_bytes_per_passage": size / len(passages),
        "atlas_bytes": atlas,
    }
    return cost


def label_words(label: str) -> set[str]:
    return {search_key(word) for word in label.split(" · ") if word}


def judge(
    labels: dict[int, str],
    token_keys: np.ndarray,
    key_ids: dict[str, int],
    fires: dict[int, np.ndarray],
    offsets: np.ndarray,
) -> dict[str, Any]:
    """Mean token and passage precision / recall of `labels` (latent -> label) against `fires` (latent ->
    bool per held-out token); `token_keys` are the held-out tokens' search keys as ids of `key_ids`."""
    names = ("token_precision", "token_recall", "token_f1", "passage_precision", "passage_recall", "passage_f1")
    rows: dict[str, list[float]] = {name: [] for name in names}
    starts = offsets[:-1]
    for latent, label in labels.items():
        wanted = [key_ids[w] for w in label_words(label) if w in key_ids]
        carried = np.isin(token_keys, wanted)
        fired = fires[latent]
        in_passage = np.logical_or.reduceat(carried, starts)
        active = np.logical_or.reduceat(fired, starts)
        for level, predicted, actual in (("token", carried, fired), ("passage", in_passage, active)):
            hits = float((predicted & actual).sum())
            recall = hits / actual.sum()
            precision = hits / predicted.sum() if predicted.any() else 0.0
            if predicted.any():
                rows[f"{level}_precision"].append(precision)
            rows[f"{level}_recall"].append(recall)
            rows[f"{level}_f1"].append(2 * precision * recall / (precision + recall) if hits else 0.0)
    result: dict[str, Any] = {name: float(np.mean(values)) if values else None for name, values in rows.items()}
    result["labels_occurring"] = len(rows["token_precision"])
    result["latents"] = len(labels)
    return result


def label_variants() -> dict[str, DescribeSettings]:
    """Characteristic-token rankings compared: each score at three smoothings (the default's name first)."""
    default = DescribeSettings()
    variants = {f"{default.token_score}, smoothing {default.smoothing:g} (default)": default}
    for score in ("lift", "kl"):
        for smoothing in (1.0, 5.0, 20.0):
            if (score, smoothing) != (default.token_score, default.smoothing):
                variants[f"{score}, smoothing {smoothing:g}"] = replace(
                    default, token_score=score, smoothing=smoothing, logit_tokens=0
                )
    return variants


def quality(
    llm: LoadedLlm, sae: Any, passages: list[Passage], acts: TokenActivations, build: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Labels described on 80% of the documents, judged on the held-out 20% (see the module docstring)."""
    test = np.array([held_out(p.doc_id, args.held_out) for p in passages])
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    train_passages = [passages[i] for i in train_rows]
    test_passages = [passages[i] for i in test_rows]
    train_acts, test_acts = subset(acts, train_rows), subset(acts, test_rows)
    select = selection_dtype(llm)
    # The statistics are counted once; the variants differ only in how cards are made from them.
    stats = LatentStatistics(
        sae.num_latents,
        passage_tokens(llm, [p.text for p in train_passages], build.capture),
        [p.doc_id for p in train_passages],
        DescribeSettings().top_contexts,
    )
    for lo in range(0, int(train_acts.offsets[-1]), 65536):
        stats.add(lo, *encode_tokens(sae, train_acts.values[lo : lo + 65536], select_dtype=select))
    variants = label_variants()
    catalogs = {name: catalog_of(stats, llm, sae, train_passages, build.capture, s) for name, s in variants.items()}
    default = next(iter(catalogs.values()))
    values, indices = encode_tokens(sae, test_acts.values, select_dtype=select)
    tokens = passage_tokens(llm, [p.text for p in test_passages], build.capture)
    with llm.lock:
        decoded = {t: search_key(llm.tokenizer.decode([t])) for t in np.unique(tokens.ids).tolist()}
    key_ids: dict[str, int] = {}
    token_keys = np.array([key_ids.setdefault(decoded[t], len(key_ids)) for t in tokens.ids.tolist()])
    fired_anywhere = np.zeros(sae.num_latents, dtype=bool)
    fired_anywhere[np.unique(indices[values > 0])] = True
    candidates = [int(j) for j in default.live if fired_anywhere[j]]
    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(candidates, size=min(args.sample, len(candidates)), replace=False).tolist())
    fires = {j: ((indices == j) & (values > 0)).any(axis=1) for j in sample}
    labels = {name: {j: catalog.label(j) for j in sample} for name, catalog in catalogs.items()}
    labels["logit lens"] = {j: make_label(default.card(j).logit_lens) for j in sample}
    shuffled = rng.permutation(sample).tolist()
    labels["chance (another latent's default label)"] = {j: default.label(k) for j, k in zip(sample, shuffled)}
    judged = {name: judge(found, token_keys, key_ids, fires, tokens.offsets) for name, found in labels.items()}
    shown = list(labels)[:1] + [
        n for n in labels if n.startswith("lift, smoothing 5") or n.startswith("kl, smoothing 5")
    ]
    shown = list(dict.fromkeys(shown + ["logit lens"]))
    return {
        "held_out_share": args.held_out,
        "described_passages": len(train_passages),
        "held_out_passages": len(test_passages),
        "held_out_tokens": int(tokens.offsets[-1]),
        "sampled_latents": sample,
        "labels": judged,
        "examples": [{"latent": j, **{name: labels[name][j] for name in shown}} for j in sample[:20]],
    }


def markdown(result: dict[str, Any]) -> str:
    cost, q = result["cost"], result["quality"]
    lines = [
        f"## Latent labels on {result['collection']}",
        "",
        f"`describe_latents` on {cost['passages']} passages ({cost['tokens']} tokens, {cost['live_latents']} live "
        f"latents of {cost['num_latents']}): {cost['describe_total_wall_s']:.1f} s wall, "
        f"{cost['describe_total_cpu_s']:.1f} s CPU (encoding and counting {cost['encode_and_count']['wall_s']:.1f} s, "
        f"of which the SAE encoding alone takes {cost['sae_encode_only']['wall_s']:.1f} s; cards "
        f"{cost['cards']['wall_s']:.1f} s); load average {cost['load_average_before'][0]:.1f} before, "
        f"{cost['load_average_after'][0]:.1f} after. `latents.json`: {cost['catalog_bytes'] / 1e6:.1f} MB "
        f"({cost['catalog_bytes_per_passage']:.0f} bytes per passage), loads in {cost['catalog_load_s']:.2f} s; "
        f"atlas {cost['atlas_bytes'] / 1e6:.1f} MB.",
        "",
        f"Labels from {q['described_passages']} passages, judged on {q['held_out_passages']} held-out passages "
        f"({q['held_out_tokens']} tokens) for {len(q['sampled_latents'])} random latents:",
        "",
        "| label | token precision | token recall | token F1 | passage precision | passage recall | passage F1 "
        "| labels occurring |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    measures = ("token_precision", "token_recall", "token_f1", "passage_precision", "passage_recall", "passage_f1")
    for kind, row in q["labels"].items():
        shown = " | ".join("-" if row[name] is None else f"{row[name]:.3f}" for name in measures)
        lines.append(f"| {kind} | {shown} | {row['labels_occurring']} / {row['latents']} |")
    names = [name for name in q["examples"][0] if name != "latent"]
    lines += ["", "| latent | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for example in q["examples"]:
        lines.append(f"| {example['latent']} | " + " | ".join(example[name] for name in names) + " |")
    return "\n".join(lines) + f"\n\nCommand: `{result['command']}`\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="BEIR folder (corpus.jsonl), benchmarked before with `ragsae bench`")
    parser.add_argument("--cache-dir", default="benchmarks/.cache", help="ragsae bench's cache (activations, SAEs)")
    parser.add_argument("--output-dir", default="benchmarks/results/latents")
    parser.add_argument("--sample", type=int, default=100, help="latents whose labels are judged")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of documents held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-quality", action="store_true", help="measure the cost only")
    args = parser.parse_args(argv)
    bench = BenchConfig(dataset=args.dataset, cache_dir=args.cache_dir)
    build = bench.build
    collection = Path(args.dataset).resolve().name
    documents, _, _ = load_beir(args.dataset, bench.split)
    llm = load_llm(build.llm)
    passages = split_passages(documents, llm.tokenizer, build.capture.window, build.capture.overlap)
    texts = [p.text for p in passages]
    cap = build.capture
    cache = ActivationCache(Path(args.cache_dir) / "activations")
    acts = cache.load(cache.entry(activations_id(llm, cap.layer, cap.window, cap.passage_prefix, fingerprint(texts))))
    if acts is None:
        raise SystemExit(f"{args.dataset}: no cached activations in {args.cache_dir}: run `ragsae bench` on it first")
    with no_training():
        sae = cached_sae(llm, texts, acts, cap, build.sae, Path(args.cache_dir), progress=False)
    sae = sae.to(llm.device).eval()
    build = dataclasses.replace(build, sae=sae.config)
    started, commit = time.perf_counter(), git_commit()
    result: dict[str, Any] = {
        "collection": collection,
        "command": command_line(),
        "git_commit": commit,
        "machine": machine(),
        "versions": library_versions(),
        "settings": dataclasses.asdict(DescribeSettings()),
        "cost": timed_describe(llm, sae, passages, acts, build),
    }
    if not args.skip_quality:
        result["quality"] = quality(llm, sae, passages, acts, build, args)
    result["wall_seconds"] = time.perf_counter() - started
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"latent-labels-{collection}.json", result)
    if "quality" in result:
        write_text_atomic(out / f"latent-labels-{collection}.md", markdown(result))
        print(markdown(result))
    else:
        print(result["cost"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
