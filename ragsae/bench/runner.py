"""Retrieval benchmark: ragsae scoring modes against BM25 and dense MiniLM on a BEIR collection.

One run builds (or reuses) everything on the same machine, scores every method with
ir-measures, measures cost, and writes JSON, a Markdown table and plots. Captured activations,
trained SAEs and baseline embeddings are cached on disk, so re-scoring takes seconds. Passages are
captured and SAEs trained through the same functions `Index.build` uses (`encode.py`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ..capture import ActivationCache, TokenActivations, activations_id
from ..config import BuildConfig, CaptureConfig, SaeConfig, to_dict
from ..encode import CodeEncoder, fit_sae, passage_activations
from ..index import Index
from ..layout import CODES_FILE, DROPPED_FILE, FAISS_FILE, SAE_WEIGHTS_FILE, segment_folder
from ..lm import LoadedLlm, load_llm
from ..provenance import command_line, git_commit, library_versions, machine
from ..sae import SparseAutoencoder, load_sae
from ..storage import write_json_atomic, write_text_atomic
from ..text import Passage, fingerprint, split_passages
from .baselines import run_bm25, run_dense
from .beir import load_beir
from .report import markdown_table, plot
from .sweep import apply_setting, parse_sweep, sweep_stem
from .timing import MethodRun, score, time_methods

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What `ragsae bench` runs."""

    dataset: str
    """BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    split: str = "test"
    """Qrels split to evaluate."""
    output_dir: str = "benchmarks/results"
    """Where JSON, Markdown and plots go."""
    cache_dir: str = "benchmarks/.cache"
    """Activations, SAEs and baseline embeddings, keyed by model, layer and corpus fingerprint."""
    baselines: tuple[str, ...] = ("bm25", "dense")
    """Baselines to run beside ragsae ('bm25', 'dense')."""
    sae: str | None = None
    """Reuse this SAE folder instead of training one on the corpus."""
    depth: int = 100
    """Passages retrieved per query (Recall@100 needs 100)."""
    latency_queries: int = 100
    """Queries timed one at a time for p50/p95 latency (each at its fastest of `LATENCY_REPEATS` runs)."""
    sweep: tuple[str, ...] = ()
    """Settings to sweep, e.g. ('layer=4,8', 'k=16,32'); one result row per combination."""
    build: BuildConfig = field(default_factory=BuildConfig)


def timed_capture(
    llm: LoadedLlm,
    texts: list[str],
    cfg: CaptureConfig,
    cache: ActivationCache,
    progress: bool,
    need_timing: bool = True,
) -> tuple[TokenActivations, dict[str, Any]]:
    """Passage activations from the cache, or captured and timed (`encode.passage_activations`), with
    the cost. An entry cached without a timing is captured again only when `need_timing` (sweep rows
    skip it)."""
    entry = cache.entry(activations_id(llm, cfg.layer, cfg.window, cfg.passage_prefix, fingerprint(texts)))
    refresh = need_timing and cache.timing(entry) is None
    acts = passage_activations(llm, texts, cfg, cache, progress, refresh=refresh)
    tokens = int(acts.offsets[-1])
    timing = cache.timing(entry)
    if timing is None:
        return acts, {"seconds": None, "passages_per_s": None, "tokens_per_s": None, "tokens": tokens}
    return acts, {
        "seconds": timing["seconds"],
        "passages_per_s": len(acts) / timing["seconds"],
        "tokens_per_s": tokens / timing["seconds"],
        "tokens": tokens,
        "device": timing["device"],
    }


KEYLESS_DEFAULTS = {"ortho_coef": 0.0}
"""SaeConfig fields added after SAEs were cached, left out of the cache key at their default (which
trains the SAE they trained before), so that the SAEs already cached stay found."""


def cached_sae(
    llm: LoadedLlm,
    texts: list[str],
    acts: TokenActivations,
    capture: CaptureConfig,
    config: SaeConfig,
    root: Path,
    progress: bool,
) -> SparseAutoencoder:
    """The SAE `Index.build` would train on these passages (`encode.fit_sae`), trained once and kept
    under `root/sae`, keyed by the activations' identity and the SAE config."""
    identity = activations_id(llm, capture.layer, capture.window, capture.passage_prefix, fingerprint(texts))
    fields = {name: value for name, value in to_dict(config).items() if KEYLESS_DEFAULTS.get(name, ...) != value}
    key = hashlib.sha256(f"{identity}|{json.dumps(fields, sort_keys=True)}".encode()).hexdigest()[:24]
    folder = root / "sae" / key
    if (folder / SAE_WEIGHTS_FILE).is_file():
        return load_sae(folder)
    sae, _report = fit_sae(llm, texts, acts, capture, config, progress)
    sae.save(folder)
    return sae


def run_ragsae(
    build: BuildConfig,
    llm: LoadedLlm,
    passages: list[Passage],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    bench: BenchConfig,
    progress: bool,
) -> list[MethodRun]:
    """Rows for each ragsae scoring mode under one build configuration (latency filled in later)."""
    cache_root = Path(bench.cache_dir)
    texts = [p.text for p in passages]
    acts, capture_cost = timed_capture(
        llm, texts, build.capture, ActivationCache(cache_root / "activations"), progress, not bench.sweep
    )
    if bench.sae:
        sae = load_sae(bench.sae)
    else:
        sae = cached_sae(llm, texts, acts, build.capture, build.sae, cache_root, progress)
    sae = sae.to(llm.device).eval()
    train = sae.metadata.get("train", {})
    encoder = CodeEncoder(llm, sae, build.capture, build.scoring.pooling)
    start = time.perf_counter()
    pooled = encoder.pool_activations(acts, progress=progress)
    encode_seconds = time.perf_counter() - start
    build = dataclasses.replace(build, sae=sae.config)
    index = Index.from_codes(encoder, passages, pooled, build)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "index")
        segment = Path(tmp) / "index" / segment_folder(1)
        disk = {name: (segment / name).stat().st_size for name in (CODES_FILE, DROPPED_FILE, FAISS_FILE)}
    codes = sp.vstack([s.codes for s in index.segments], format="csr")
    # In memory: the CSR copies kept (codes, BM25 weights, postings) and the FAISS codes (its file's
    # size: 8-bit vectors plus a small header).
    memory = (
        int(codes.data.nbytes + codes.indices.nbytes + codes.indptr.nbytes)
        + index.retriever.memory_bytes()
        + disk[FAISS_FILE]
    )
    qids = list(queries)
    doc_ids = [p.doc_id for p in passages]
    query_codes = index.encode_queries([queries[q] for q in qids])
    common = {
        "config": to_dict(build),
        "capture": capture_cost,
        "sae": {
            "fvu": train.get("fvu"),
            "mean_l0": train.get("mean_l0"),
            "dead_fraction": train.get("dead_fraction"),
            "dense_fraction": train.get("dense_fraction"),
            "heldout": sae.metadata.get("fidelity"),
            "train_seconds": train.get("seconds"),
            "train_tokens": train.get("tokens"),
        },
        "sae_encode": {"seconds": encode_seconds, "tokens_per_s": capture_cost["tokens"] / encode_seconds},
        "index_bytes": {
            "disk": sum(disk.values()),
            "disk_per_passage": sum(disk.values()) / len(passages),
            **disk,
            "memory": memory,
        },
        "active_latents": {
            "per_passage": codes.nnz / codes.shape[0],
            "per_query": query_codes.nnz / query_codes.shape[0],
        },
    }
    runs = []
    for mode in ("sparse", "faiss", "fused"):

        def search(texts: list[str], mode: str = mode) -> tuple[np.ndarray, np.ndarray]:
            return index.retriever.search(index.encode_queries(texts), bench.depth, mode)

        metrics = score(search, queries, qrels, doc_ids)
        row = {
            "method": f"ragsae-{mode}",
            **common,
            "metrics": metrics["aggregate"],
            "per_query": metrics["per_query"],
        }
        runs.append(MethodRun(row, search))
    return runs


def run_benchmark(bench: BenchConfig, progress: bool = False) -> dict[str, Any]:
    """Run every method on `bench.dataset`; write `<collection>[-sweep].json/.md/.png` and return the JSON."""
    torch.manual_seed(bench.build.sae.seed)
    collection = Path(bench.dataset).resolve().name
    documents, queries, qrels = load_beir(bench.dataset, bench.split)
    llm = load_llm(bench.build.llm, progress)
    started, commit = time.perf_counter(), git_commit()  # the code that runs, not what HEAD is by the end
    settings = parse_sweep(bench.sweep) if bench.sweep else [{}]
    runs: list[MethodRun] = []
    passages_by_window: dict[tuple[int, int], list[Passage]] = {}
    for setting in settings:
        build = apply_setting(bench.build, setting)
        window = (build.capture.window, build.capture.overlap)
        if window not in passages_by_window:
            passages_by_window[window] = split_passages(documents, llm.tokenizer, *window)
        logger.info("ragsae %s", setting or "defaults")
        for run in run_ragsae(build, llm, passages_by_window[window], queries, qrels, bench, progress):
            if setting:
                run.row["setting"] = setting
            runs.append(run)
    if not bench.sweep:
        if "bm25" in bench.baselines:
            runs.append(run_bm25(documents, queries, qrels, bench.depth))
        if "dense" in bench.baselines:
            runs.append(run_dense(documents, queries, qrels, bench.depth, Path(bench.cache_dir), progress))
    logger.info("timing %d methods on %d queries", len(runs), min(len(queries), bench.latency_queries))
    time_methods(runs, list(queries.values()), bench.latency_queries)
    rows = [run.row for run in runs]
    result = {
        "collection": collection,
        "dataset": str(bench.dataset),
        "split": bench.split,
        "documents": len(documents),
        "queries": len(queries),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": commit,
        "machine": machine(),
        "versions": library_versions(),
        "seed": bench.build.sae.seed,
        "bench_config": {k: v for k, v in dataclasses.asdict(bench).items() if k != "build"},
        "wall_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    out = Path(bench.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = sweep_stem(collection, bench.sweep)
    write_json_atomic(out / f"{stem}.json", result)
    title = f"{collection} ({len(documents)} documents, {len(queries)} judged queries)"
    write_text_atomic(out / f"{stem}.md", markdown_table(rows, title) + f"\nCommand: `{result['command']}`\n")
    result["plots"] = plot(rows, out / stem, collection)
    return result
