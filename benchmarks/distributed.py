"""The Ray build on this machine: one collection built by one process and by a local Ray with 1 and 2
workers, with the same frozen SAE; stage times, the speed-up, and whether the codes are the same.

python benchmarks/distributed.py ../shared/datasets/msmarco-5k --sae indexes/msmarco-5k
    [--workers 1,2] [--threads 1,2] [--output-dir benchmarks/results/distributed]

Every run is `Index.build(corpus, path, sae=SAE, llm=LLM)` end to end (latent catalog on, no activation
cache), the driver's LLM loaded once beforehand and shared by all runs:
- `process, T threads`: one process, torch using T threads;
- `ray, W workers`: `ray=RayBuild(workers=W, cpus_per_worker=1)`; the build starts a local Ray and
  stops it after, and that is counted.
Stage times of the Ray runs come from the build's log (`distributed.WORKERS_READY`, `SHARDS_ENCODED`):
Ray start and workers ready (each worker loads the LLM and the SAE), shards (capture and SAE encoding in
the workers; the driver reduces as results arrive, its share reported apart), and the rest (reading,
splitting, catalog, save, Ray shutdown).

Same index: every run's codes against the one-thread process build's (same nonzero pattern, largest
relative value difference) and the judged queries' top-10 passages.

Estimate for N workers (printed, not measured): T(N) = fixed + shards(1) / (N * e), with `fixed` the
measured time outside the shards stage of the W=2 run, `e` the parallel efficiency measured from 1 to 2
workers, and the driver's reduction, which does not shrink with N, as the floor of the shards stage.
Assumed: each worker has its own cores, the corpus is large enough to give every worker shards, and
moving texts and codes between nodes costs little beside capture (they are kilobytes per passage).

Writes OUTPUT_DIR/distributed-DATASET.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragsae import BuildConfig, Index, RayBuild, load_llm, load_sae
from ragsae.bench import load_beir
from ragsae.index import distributed
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.storage import write_json_atomic, write_text_atomic

ESTIMATE_WORKERS = (4, 8, 16, 64)


class StageTimes(logging.Handler):
    """Keeps the arguments of the distributed build's stage-time log messages."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.found: dict[str, tuple[Any, ...]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg in (distributed.WORKERS_READY, distributed.SHARDS_ENCODED):
            self.found[str(record.msg)] = tuple(record.args or ())


def top10(index: Index, queries: dict[str, str]) -> dict[str, list[str]]:
    return {qid: [h.passage_id for h in hits] for qid, hits in index.batch_search(queries, k=10).items()}


def compare(index: Index, reference: Index, reference_top: dict[str, list[str]], queries: dict[str, str]) -> dict:
    a, b = index.codes, reference.codes
    same_pattern = a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
    rel = float(np.max(np.abs(a.data - b.data) / np.maximum(np.abs(b.data), 1e-12))) if same_pattern else None
    top = top10(index, queries)
    return {
        "same_nonzeros": bool(same_pattern),
        "max_relative_difference": rel,
        "same_top10": sum(top[q] == reference_top[q] for q in queries) / len(queries),
    }


def estimate(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    by_workers = {r["workers"]: r for r in runs if r["kind"] == "ray"}
    if not {1, 2} <= set(by_workers):
        return None
    one, two = by_workers[1], by_workers[2]
    efficiency = one["shards_s"] / (2 * two["shards_s"])
    fixed = two["total_s"] - two["shards_s"]
    floor = two["reduce_s"]
    return {
        "efficiency_1_to_2": efficiency,
        "fixed_s": fixed,
        "reduce_floor_s": floor,
        "total_s": {n: fixed + max(one["shards_s"] / (n * efficiency), floor) for n in ESTIMATE_WORKERS},
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"## Distributed build: {result['dataset']} ({result['passages']} passages)",
        "",
        f"Command: `{result['command']}` at {result['commit']}; {result['machine'].get('cpu')}, "
        f"{result['machine'].get('cpus')} cores. One frozen SAE; latent catalog on; no activation cache.",
        "",
        "| run | total s | workers ready s | shards s | of which reducing s | rest s | speed-up | same nonzeros | "
        "max rel. diff | same top-10 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    base = result["runs"][0]["total_s"]
    for r in result["runs"]:
        cells = [
            r["name"],
            f"{r['total_s']:.1f}",
            f"{r['ready_s']:.1f}" if r["kind"] == "ray" else "-",
            f"{r['shards_s']:.1f}" if r["kind"] == "ray" else "-",
            f"{r['reduce_s']:.1f}" if r["kind"] == "ray" else "-",
            f"{r['total_s'] - r['ready_s'] - r['shards_s']:.1f}" if r["kind"] == "ray" else "-",
            f"{base / r['total_s']:.2f}",
            str(r["same_nonzeros"]),
            f"{r['max_relative_difference']:.1e}" if r["max_relative_difference"] is not None else "-",
            f"{r['same_top10']:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("estimate"):
        e = result["estimate"]
        totals = ", ".join(f"{n} workers {t:.0f} s" for n, t in e["total_s"].items())
        lines += [
            "",
            f"Estimate (not measured; assumptions in the script's docstring): efficiency 1 -> 2 workers "
            f"{e['efficiency_1_to_2']:.2f}, fixed {e['fixed_s']:.1f} s, reduction floor {e['reduce_floor_s']:.1f} s: "
            f"{totals}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--sae", required=True, help="the frozen SAE: its folder, or an index folder's current SAE")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run (comma-separated)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="torch threads of the process builds")
    parser.add_argument("--output-dir", default="benchmarks/results/distributed")
    args = parser.parse_args()
    dataset = Path(args.dataset)
    documents, queries, _ = load_beir(dataset)
    config = BuildConfig()
    llm = load_llm(config.llm, progress=True)
    sae_path = Path(args.sae)
    sae = load_sae(Index.current_sae_folder(sae_path) if (sae_path / "manifest.json").is_file() else sae_path)
    stages = StageTimes()
    logging.getLogger(distributed.__name__).addHandler(stages)
    logging.getLogger(distributed.__name__).setLevel(logging.INFO)
    runs: list[dict[str, Any]] = []
    reference: Index | None = None
    reference_top: dict[str, list[str]] = {}
    default_threads = torch.get_num_threads()
    plan = [("process", int(t)) for t in args.threads.split(",")] + [("ray", int(w)) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="ragsae-distributed-") as work:
        for i, (kind, count) in enumerate(plan):
            torch.set_num_threads(count if kind == "process" else default_threads)
            ray = RayBuild(workers=count, cpus_per_worker=1) if kind == "ray" else None
            stages.found.clear()
            start = time.perf_counter()
            index = Index.build(documents, Path(work) / f"run{i}", config, sae=sae, llm=llm, progress=True, ray=ray)
            total = time.perf_counter() - start
            torch.set_num_threads(default_threads)
            name = (
                f"process, {count} thread{'s' * (count > 1)}"
                if kind == "process"
                else f"ray, {count} worker{'s' * (count > 1)}"
            )
            run: dict[str, Any] = {"name": name, "kind": kind, "workers" if kind == "ray" else "threads": count}
            run["total_s"] = total
            if kind == "ray":
                run["ready_s"] = float(stages.found[distributed.WORKERS_READY][1])
                shards = stages.found[distributed.SHARDS_ENCODED]
                run["shards"], run["shards_s"], run["reduce_s"] = int(shards[1]), float(shards[2]), float(shards[3])
            if reference is None:
                reference, reference_top = index, top10(index, queries)
            run.update(compare(index, reference, reference_top, queries))
            runs.append(run)
            print(run, flush=True)
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "documents": len(documents),
        "passages": len(reference.passages) if reference is not None else 0,
        "runs": runs,
        "estimate": estimate(runs),
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "versions": library_versions(),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"distributed-{dataset.name}.json", result)
    write_text_atomic(out / f"distributed-{dataset.name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
