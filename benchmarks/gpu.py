"""The pipeline's stages on one device, against the hardware's bound: capture, SAE training and encoding,
and single-query encoding, with the device's activations checked against the CPU's.

python benchmarks/gpu.py ../shared/datasets/msmarco-5k [--device cuda] [--passages 5000] [--repeat 1]
    [--peak-tflops 790] [--sae-epochs 1] [--output-dir benchmarks/results/gpu]

Passages: the collection's documents split as `ragsae bench` splits them, the first `--passages`, the list
repeated `--repeat` times (a larger corpus by repetition: the shapes of real text, nothing new to read).
The LLM is the bundled default in `--dtype` (default 'auto': bfloat16 on a GPU). Measured, each stage run
once to warm up on a slice and then timed (GPU work synchronised before the clock stops):

- capture as builds capture (`encode.passage_activations`: batch-invariant, fixed product blocks) and the
  plain batched capture (`capture(..., batch_invariant=False)`), in tokens/s, and as a fraction of the
  FLOP bound: `--peak-tflops` (790: a bfloat16 8192^3 matrix product measured on the H200) over the
  FLOPs per token of the blocks before the capture layer (2 x weights per token, plus 4 x width x half
  the passage's tokens for causal attention);
- agreement: `--check` passages captured on the CPU in the same dtype against the device, the largest
  difference relative to the layer's largest value, and the share of values within one bfloat16
  rounding (2^-8 relative) of the CPU's;
- SAE training: `train_sae` on the captured activations for `--sae-epochs` (tokens/s, FVU), and SAE
  encoding of all of them (`encode_tokens`, tokens/s);
- one query at a time: capture and pooling of the collection's queries (`CodeEncoder.encode_queries`),
  p50 ms on the device and on the CPU.

Writes OUTPUT_DIR/gpu-DEVICE.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ragsae.bench import load_beir
from ragsae.capture import capture
from ragsae.config import BuildConfig, LlmConfig, SaeConfig
from ragsae.encode import CodeEncoder, encode_tokens, passage_activations, selection_dtype
from ragsae.lm import LoadedLlm, load_llm
from ragsae.provenance import command_line, git_commit, machine
from ragsae.sae import train_sae
from ragsae.storage import write_json_atomic, write_text_atomic
from ragsae.text import split_passages

BF16_ROUNDING = 2.0**-8


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float]:
    """work()'s result and wall seconds, the device's queued work included."""
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def flops_per_token(llm: LoadedLlm, layer: int, mean_tokens: float) -> float:
    """Forward FLOPs per token of the first `layer` blocks: weight products and causal attention."""
    c = llm.model.config
    d, ff = int(c.hidden_size), int(c.intermediate_size)
    kv = d * int(c.num_key_value_heads) // int(c.num_attention_heads)
    weights = d * d + 2 * d * kv + d * d + 3 * d * ff  # q, k, v, o, gate, up, down
    attention = 4 * d * mean_tokens / 2  # scores and weighted sum over half the context on average
    return float(layer * (2 * weights + attention))


def agreement(cpu: np.ndarray, device: np.ndarray) -> dict[str, float]:
    exact, got = cpu.astype(np.float64), device.astype(np.float64)
    scale = float(np.abs(exact).max())
    close = np.abs(got - exact) <= BF16_ROUNDING * np.maximum(np.abs(exact), 1e-6 * scale)
    return {
        "max_relative_to_scale": float(np.abs(got - exact).max() / scale),
        "within_one_rounding": float(close.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="BEIR folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--check", type=int, default=32, help="passages whose activations are checked on the CPU")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--sae-epochs", type=int, default=1)
    parser.add_argument("--queries", type=int, default=43)
    parser.add_argument("--output-dir", default="benchmarks/results/gpu")
    args = parser.parse_args(argv)
    build = BuildConfig()
    cap = build.capture
    llm = load_llm(LlmConfig(device=args.device, dtype=args.dtype))
    documents, queries, _ = load_beir(Path(args.dataset))
    passages = split_passages(documents, llm.tokenizer, cap.window, cap.overlap)[: args.passages]
    texts = [p.text for p in passages] * args.repeat
    device = llm.device
    result: dict[str, Any] = {"dataset": Path(args.dataset).name, "device": str(device), "dtype": llm.dtype_name}

    warm = texts[: min(len(texts), 64)]
    passage_activations(llm, warm, cap)
    acts, seconds = timed(device, lambda: passage_activations(llm, texts, cap))
    tokens = int(acts.offsets[-1])
    mean_tokens = tokens / max(len(texts), 1)
    bound = args.peak_tflops * 1e12 / flops_per_token(llm, cap.layer, mean_tokens)
    result["capture"] = {
        "passages": len(texts),
        "tokens": tokens,
        "as_built_tokens_per_s": tokens / seconds,
        "flop_bound_tokens_per_s": bound,
    }
    capture(llm, warm, [cap.layer], cap.window, 64, cap.passage_prefix)
    _, plain_seconds = timed(device, lambda: capture(llm, texts, [cap.layer], cap.window, 64, cap.passage_prefix))
    result["capture"]["plain_tokens_per_s"] = tokens / plain_seconds
    for key in ("as_built", "plain"):
        result["capture"][f"{key}_fraction_of_bound"] = result["capture"][f"{key}_tokens_per_s"] / bound

    checked = texts[: args.check]
    cpu_llm = load_llm(LlmConfig(device="cpu", dtype=cast(Any, llm.dtype_name)))
    result["agreement"] = agreement(
        passage_activations(cpu_llm, checked, cap).values, passage_activations(llm, checked, cap).values
    )
    del cpu_llm

    sae_config = SaeConfig(epochs=args.sae_epochs)
    (sae, report), train_seconds = timed(device, lambda: train_sae(acts.values, sae_config, device))
    result["sae_training"] = {"tokens": report.tokens, "tokens_per_s": report.tokens / train_seconds, "fvu": report.fvu}
    sae = sae.to(device).eval()
    select = selection_dtype(llm)
    encode_tokens(sae, np.asarray(acts.values[:8192]), select_dtype=select)
    _, encode_seconds = timed(device, lambda: encode_tokens(sae, acts.values, select_dtype=select))
    result["sae_encoding"] = {"tokens_per_s": tokens / encode_seconds}

    asked = list(queries.values())[: args.queries]
    latency: dict[str, float] = {}
    for name, on in (("device", llm), ("cpu", load_llm(LlmConfig(device="cpu")))):
        encoder = CodeEncoder(on, sae.to(on.device), cap, build.scoring.pooling)
        encoder.encode_queries(asked[:2])
        times = [timed(on.device, lambda: encoder.encode_queries([query]))[1] for query in asked]
        latency[name] = statistics.median(times) * 1e3
    result["query_p50_ms"] = latency
    result.update(command=command_line(), commit=git_commit(), machine=machine())

    c = result["capture"]
    lines = [
        f"## {result['dataset']} on {device} ({llm.dtype_name})",
        "",
        f"Command: `{result['command']}` at {result['commit']}.",
        "",
        "| stage | tokens/s | fraction of the FLOP bound |",
        "| --- | ---: | ---: |",
        f"| capture as builds capture (batch-invariant) | {c['as_built_tokens_per_s']:,.0f} | "
        f"{c['as_built_fraction_of_bound']:.4f} |",
        f"| capture, plain batches of 64 | {c['plain_tokens_per_s']:,.0f} | {c['plain_fraction_of_bound']:.4f} |",
        f"| SAE training ({args.sae_epochs} epoch, FVU {result['sae_training']['fvu']:.3f}) | "
        f"{result['sae_training']['tokens_per_s']:,.0f} | - |",
        f"| SAE encoding | {result['sae_encoding']['tokens_per_s']:,.0f} | - |",
        "",
        f"{c['passages']} passages, {c['tokens']:,} tokens; FLOP bound {c['flop_bound_tokens_per_s']:,.0f} tokens/s "
        f"at {args.peak_tflops:g} TFLOP/s. One query: {latency['device']:.1f} ms on the device, {latency['cpu']:.1f} "
        f"ms on the CPU (p50). Activations of {len(checked)} passages against the CPU's: largest difference "
        f"{result['agreement']['max_relative_to_scale']:.2e} of the layer's largest value, "
        f"{result['agreement']['within_one_rounding']:.1%} within one bfloat16 rounding.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"gpu-{device.type}.json", result)
    write_text_atomic(out / f"gpu-{device.type}.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
