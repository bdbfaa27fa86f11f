"""Capture through the trunk (`ragsae/trunk.py`) vs the model's hooked forward, on this machine's device.

python benchmarks/capture_speed.py ../shared/datasets/msmarco-5k [--model DIR --gguf-file NAME] [--device cuda]

The paths: the trunk; where its weights are prepacked for oneDNN (`ragsae/linear.py`, CPU in
bfloat16), the trunk without that ("trunk-unpacked"); the model's hooked forward. Each captures the
same passages (the collection's first `--passages`, split and prefixed as `ragsae bench` does) at
`--layers` (default 4 and 8). Reports how many activation values equal the hooked forward's and the
largest difference, passage capture throughput (tokens/s, second of two runs, so kernels are warm),
and the median time to capture one query through the last layer (`--queries` of the collection's
queries, each alone, as a search does; the paths take turns query by query, so they share whatever
else the machine is doing). Writes OUTPUT_DIR/capture-speed-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragsae.bench import load_beir
from ragsae.capture import capture
from ragsae.config import CaptureConfig, LlmConfig
from ragsae.lm.loading import LoadedLlm, load_llm
from ragsae.lm.trunk import LlamaTrunk
from ragsae.provenance import command_line, git_commit, machine
from ragsae.storage import write_json_atomic, write_text_atomic
from ragsae.text import split_passages


def synchronised(llm: LoadedLlm, fn: Callable[[], Any]) -> tuple[Any, float]:
    """Result of fn() and its wall time, waiting for the GPU's queued work."""
    start = time.perf_counter()
    result = fn()
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    return result, time.perf_counter() - start


TrunkOf = Callable[[int], "LlamaTrunk | None"]
"""What `LoadedLlm.trunk` answers on one capture path (None: the hooked forward)."""


@contextlib.contextmanager
def on_path(llm: LoadedLlm, path: TrunkOf) -> Iterator[None]:
    built = llm.trunk
    llm.trunk = path  # type: ignore[method-assign]
    try:
        yield
    finally:
        llm.trunk = built  # type: ignore[method-assign]


def capture_paths(llm: LoadedLlm, layer: int) -> dict[str, TrunkOf]:
    trunk = llm.trunk(layer)
    paths: dict[str, TrunkOf] = {"trunk": lambda _layer: trunk}
    if trunk is not None and trunk.packed:
        unpacked = LlamaTrunk(llm.model, layer, pack=False)
        paths["trunk-unpacked"] = lambda _layer: unpacked
    paths["hooked"] = lambda _layer: None
    return paths


def measure(
    llm: LoadedLlm,
    passages: list[str],
    queries: list[str],
    layers: list[int],
    cap: CaptureConfig,
    paths: dict[str, TrunkOf],
) -> dict[str, dict[str, Any]]:
    """Per path: passage activations, throughput and single-query latency."""

    def capture_passages() -> dict:
        return capture(llm, passages, layers, cap.window, cap.batch_size, cap.passage_prefix)

    results = {}
    for name, path in paths.items():
        with on_path(llm, path):
            capture_passages()  # warm-up
            acts, seconds = synchronised(llm, capture_passages)
        tokens = int(acts[layers[-1]].offsets[-1])
        results[name] = {"acts": acts, "tokens": tokens, "tokens_per_s": tokens / seconds}
    per_query: dict[str, list[float]] = {}
    for _ in range(2):  # the first round warms up
        per_query = {name: [] for name in paths}
        for q in queries:
            for name, path in paths.items():
                with on_path(llm, path):
                    one = synchronised(llm, lambda q=q: capture(llm, [q], layers[-1:], cap.window, 1, cap.query_prefix))
                per_query[name].append(one[1])
    for name in paths:
        results[name]["query_p50_ms"] = float(np.median(per_query[name]) * 1e3)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="BEIR-layout folder")
    parser.add_argument("--model", help="model folder or hub id (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto)")
    parser.add_argument("--layers", default="4,8", help="comma list of capture layers (default: 4,8)")
    parser.add_argument("--passages", type=int, default=640, help="passages captured (default: 640)")
    parser.add_argument("--queries", type=int, default=50, help="queries timed one by one (default: 50)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    layers = sorted({int(layer) for layer in args.layers.split(",")})

    llm = load_llm(LlmConfig(model=args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype))
    if llm.trunk(layers[-1]) is None:
        parser.error(f"{llm.model_id} has no trunk (not a Llama-family model): nothing to compare")
    cap = CaptureConfig()
    documents, queries, _ = load_beir(args.dataset, "test")
    passages = [p.text for p in split_passages(documents, llm.tokenizer, cap.window, cap.overlap)[: args.passages]]
    query_texts = list(queries.values())[: args.queries]

    paths = capture_paths(llm, layers[-1])
    measured = measure(llm, passages, query_texts, layers, cap, paths)
    trunk, hooked = measured["trunk"], measured["hooked"]

    agreement: dict[str, dict[str, Any]] = {name: {} for name in paths if name != "hooked"}
    for name in agreement:
        for layer in layers:
            a = measured[name]["acts"][layer].values.astype(np.float32)
            b = hooked["acts"][layer].values.astype(np.float32)
            agreement[name][str(layer)] = {
                "equal_fraction": float((a == b).mean()),
                "max_abs_diff": float(np.abs(a - b).max()),
            }
    device_name = torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu"
    result = {
        "collection": Path(args.dataset).resolve().name,
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": machine(),
        "torch": torch.__version__,
        "device": device_name,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "passages": len(passages),
        "tokens": trunk["tokens"],
        "queries": len(query_texts),
        "agreement": agreement,
        "tokens_per_s": {name: measured[name]["tokens_per_s"] for name in paths},
        "query_p50_ms": {name: measured[name]["query_p50_ms"] for name in paths},
    }
    rows = [f"| {name} | {result['tokens_per_s'][name]:,.0f} | {result['query_p50_ms'][name]:.2f} |" for name in paths]
    equal = "; ".join(
        f"{name} vs hooked: " + ", ".join(f"layer {k} {v['equal_fraction']:.4%} equal" for k, v in per_layer.items())
        for name, per_layer in agreement.items()
    )
    table = "\n".join(
        [
            f"## capture on {device_name} ({result['dtype']}), {result['collection']}",
            "",
            f"{len(passages)} passages ({trunk['tokens']} tokens), {len(query_texts)} queries; {equal}",
            "",
            "| path | passage tokens/s | one query p50 ms |",
            "| --- | --- | --- |",
            *rows,
            "",
            f"Command: `{result['command']}`",
            "",
        ]
    )
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "capture-speed-" + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    write_json_atomic(out / f"{stem}.json", result)
    write_text_atomic(out / f"{stem}.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
