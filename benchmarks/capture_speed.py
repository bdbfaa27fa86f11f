"""Capture through the trunk (`ragsae/trunk.py`) vs the model's hooked forward, on this machine's device.

python benchmarks/capture_speed.py ../shared/datasets/msmarco-5k [--model DIR --gguf-file NAME] [--device cuda]

Both paths capture the same passages (the collection's first `--passages`, split and prefixed as
`ragsae bench` does) at `--layers` (default 4 and 8). Reports how many activation values are equal
and the largest difference, passage capture throughput (tokens/s, second of two runs, so kernels are
warm), and the median time to capture one query through the last layer (`--queries` of the
collection's queries, each alone, as a search does). Writes OUTPUT_DIR/capture-speed-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ragsae.bench import command_line, git_commit, load_beir, machine
from ragsae.capture import capture
from ragsae.config import CaptureConfig, LlmConfig
from ragsae.corpus import split_passages
from ragsae.llm import LoadedLlm, load_llm
from ragsae.storage import write_json_atomic, write_text_atomic


def synchronised(llm: LoadedLlm, fn: Callable[[], Any]) -> tuple[Any, float]:
    """Result of fn() and its wall time, waiting for the GPU's queued work."""
    start = time.perf_counter()
    result = fn()
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    return result, time.perf_counter() - start


def measure(
    llm: LoadedLlm, passages: list[str], queries: list[str], layers: list[int], cap: CaptureConfig
) -> dict[str, Any]:
    """Throughput and single-query latency of the current capture path (trunk or hooked)."""

    def capture_passages() -> dict:
        return capture(llm, passages, layers, cap.window, cap.batch_size, cap.passage_prefix)

    capture_passages()  # warm-up
    acts, seconds = synchronised(llm, capture_passages)
    per_query = []
    for _ in range(2):  # the first round warms up
        per_query = [
            synchronised(llm, lambda q=q: capture(llm, [q], layers[-1:], cap.window, 1, cap.query_prefix))[1]
            for q in queries
        ]
    tokens = int(acts[layers[-1]].offsets[-1])
    return {
        "acts": acts,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "query_p50_ms": float(np.median(per_query) * 1e3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="BEIR-layout folder")
    parser.add_argument("--model", help="model folder or hub id (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--layers", default="4,8", help="comma list of capture layers (default: 4,8)")
    parser.add_argument("--passages", type=int, default=640, help="passages captured (default: 640)")
    parser.add_argument("--queries", type=int, default=50, help="queries timed one by one (default: 50)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    layers = sorted({int(layer) for layer in args.layers.split(",")})

    llm = load_llm(LlmConfig(model=args.model, gguf_file=args.gguf_file, device=args.device))
    if llm.trunk(layers[-1]) is None:
        parser.error(f"{llm.model_id} has no trunk (not a Llama-family model): nothing to compare")
    cap = CaptureConfig()
    documents, queries, _ = load_beir(args.dataset, "test")
    passages = [p.text for p in split_passages(documents, llm.tokenizer, cap.window, cap.overlap)[: args.passages]]
    query_texts = list(queries.values())[: args.queries]

    trunk = measure(llm, passages, query_texts, layers, cap)
    built_trunk = llm.trunk
    llm.trunk = lambda layer: None  # type: ignore[method-assign]  # forces the hooked forward
    try:
        hooked = measure(llm, passages, query_texts, layers, cap)
    finally:
        llm.trunk = built_trunk  # type: ignore[method-assign]

    agreement = {}
    for layer in layers:
        a = trunk["acts"][layer].values.astype(np.float32)
        b = hooked["acts"][layer].values.astype(np.float32)
        agreement[str(layer)] = {"equal_fraction": float((a == b).mean()), "max_abs_diff": float(np.abs(a - b).max())}
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
        "tokens_per_s": {"trunk": trunk["tokens_per_s"], "hooked": hooked["tokens_per_s"]},
        "query_p50_ms": {"trunk": trunk["query_p50_ms"], "hooked": hooked["query_p50_ms"]},
    }
    rows = [
        f"| {path} | {result['tokens_per_s'][path]:,.0f} | {result['query_p50_ms'][path]:.2f} |"
        for path in ("trunk", "hooked")
    ]
    equal = ", ".join(f"layer {k}: {v['equal_fraction']:.4%} equal" for k, v in agreement.items())
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
