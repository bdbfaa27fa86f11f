"""How the search step scales with the number of passages: ragsae-CSR, ragsae-Milvus (Lite), FAISS flat, bm25s.

python benchmarks/scale.py [--index indexes/msmarco-5k] [--dataset ../shared/datasets/msmarco-5k]
    [--sizes 5000,50000,500000] [--milvus-sizes 5000,50000] [--searches 200] [--time-limit 60]
    [--output-dir benchmarks/results/scale]

Query weights are fixed once: the collection's judged queries are encoded by the index and turned into the
sparse weights its sparse mode matches (`Retriever.query_weights`, pseudo-relevance feedback included).
Only the search step is timed, one query at a time, k = 10: `CsrBackend.search` (the class every index
segment searches with), `MilvusBackend.search` on a collection made by the backend's own `create` and
`insert` (with the backend's default search settings), a `FaissBackend` exact inner-product index
(`IndexFlatIP`, CPU), and `bm25s.BM25.retrieve` (lexical BM25 over the passages' words, one thread, numpy
top-k selection) with the query's tokens given: the judged queries tokenized once by `bm25s.tokenize`
(lower case, its word pattern, English stop words removed, no stemming).

Passages: the index's stored BM25 weights (real) up to its size; past it, synthetic rows appended to the
real ones (`sample_weights`): each row's number of latents drawn from the real rows', its latents drawn
by the real document frequencies (no latent twice in a row), each value a real stored value of that
latent. FAISS gets random unit vectors of MiniLM's size (384, float32), and its queries are random unit
vectors too: a flat index's time depends only on N and the dimension. Milvus's dense field (required by
the backend's schema) gets random unit vectors of the LLM's width. bm25s: the index's passage texts
tokenized as the queries are (real) up to its size; past it, synthetic token lists appended
(`sample_tokens`): each length drawn from the real passages' lengths, each token drawn independently by its
frequency in the real passages. That keeps N, the passage lengths and the vocabulary's Zipf frequencies, on
which BM25's postings and so its search time depend, but no co-occurrence or burstiness (a real word tends to
repeat within a passage: synthetic postings are somewhat longer for the same frequency), and the real
vocabulary of 5k passages (no new words as N grows).

Memory per passage: bytes of the arrays searched (CSR: weights and postings; FAISS: the flat vectors;
bm25s: its sparse score matrix). Disk per passage: the CSR weights as an index segment stores them
(`save_compact_csr_atomic`), the FAISS index file, the Milvus Lite folder, bm25s's saved index (without the
corpus). Build throughput: passages/s into the backend (CSR: `CsrBackend.of`, which builds the postings;
Milvus: `insert` then `flush`; FAISS: `build`; bm25s: `BM25.index` of the token lists), not the encoding
or tokenization before it.

Writes OUTPUT_DIR/scale.json, scale.md and, with matplotlib, scale.png.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ragsae import Index
from ragsae.bench import load_beir
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.retrieval.backends import CsrBackend, FaissBackend
from ragsae.storage import save_compact_csr_atomic, write_json_atomic, write_text_atomic
from ragsae.text import Passage

K = 10
BM25S_STOPWORDS = "en"
DENSE_DIM = 384
"""MiniLM-L6's width: the dense baseline's vectors."""
CSR_P50_GOAL_MS, CSR_GOAL_N = 20.0, 500_000
MILVUS_P99_GOAL_MS = 100.0
INSERT_CHUNK = 5_000
"""Passages handed to `MilvusBackend.insert` at a time (it batches them by 1,000)."""


# --- pure functions ------------------------------------------------------------------------------
def sample_weights(real: sp.csr_matrix, n: int, rng: np.random.Generator, chunk: int = 50_000) -> sp.csr_matrix:
    """`n` synthetic rows like those of `real` (float32 CSR): row lengths from `real`'s row lengths,
    latents by `real`'s document frequencies without repeats within a row, values from the same latent's
    real values."""
    real = real.tocsr()
    postings = real.T.tocsr()
    df = np.diff(postings.indptr)
    cdf = np.cumsum(df) / df.sum()
    lengths = np.diff(real.indptr)
    parts = []
    for start in range(0, n, chunk):
        rows = rng.choice(lengths, size=min(chunk, n - start))
        row_of = np.repeat(np.arange(len(rows)), rows)
        cols = np.searchsorted(cdf, rng.random(len(row_of)), side="right")
        while True:  # draw again the repeats of a latent within a row
            order = np.lexsort((cols, row_of))
            row_of, cols = row_of[order], cols[order]
            repeat = np.flatnonzero((row_of[1:] == row_of[:-1]) & (cols[1:] == cols[:-1])) + 1
            if not len(repeat):
                break
            cols[repeat] = np.searchsorted(cdf, rng.random(len(repeat)), side="right")
        offsets = (rng.random(len(cols)) * df[cols]).astype(np.int64)
        values = postings.data[postings.indptr[cols] + offsets]
        indptr = np.concatenate([[0], np.cumsum(rows)])
        matrix = (values.astype(np.float32), cols.astype(real.indices.dtype), indptr)
        parts.append(sp.csr_matrix(matrix, shape=(len(rows), real.shape[1])))
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, real.shape[1]), dtype=np.float32)


def sample_tokens(real: list[list[str]], n: int, rng: np.random.Generator) -> list[list[str]]:
    """`n` synthetic token lists like `real`'s: lengths drawn from `real`'s lengths, each token drawn
    independently by its frequency in `real` (unigram sampling)."""
    vocabulary, counts = np.unique(np.array([t for tokens in real for t in tokens], dtype=object), return_counts=True)
    lengths = rng.choice(np.array([len(tokens) for tokens in real]), size=n)
    drawn = vocabulary[rng.choice(len(vocabulary), size=int(lengths.sum()), p=counts / counts.sum())]
    ends = np.cumsum(lengths)
    return [drawn[end - length : end].tolist() for end, length in zip(ends.tolist(), lengths.tolist())]


def latencies(search: Callable[[int], Any], queries: int, searches: int, time_limit: float) -> dict[str, Any]:
    """p50/p99 ms of `search(i)` over queries i = 0, 1, ... (cycled), `searches` times or until
    `time_limit` seconds have passed, after one warm-up pass of up to 3 searches."""
    for i in range(min(3, queries)):
        search(i)
    times: list[float] = []
    deadline = time.perf_counter() + time_limit
    while len(times) < searches and time.perf_counter() < deadline:
        start = time.perf_counter()
        search(len(times) % queries)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"searches": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def bm25s_tokens(texts: list[str]) -> list[list[str]]:
    """`texts` as bm25s tokenizes them (lower case, its word pattern, English stop words removed)."""
    import bm25s

    return list(bm25s.tokenize(texts, stopwords=BM25S_STOPWORDS, return_ids=False, show_progress=False))


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


# --- the engines ---------------------------------------------------------------------------------
def measure_csr(weights: sp.csr_matrix, queries: sp.csr_matrix, args: argparse.Namespace) -> dict[str, Any]:
    n = weights.shape[0]
    start = time.perf_counter()
    backend = CsrBackend.of(weights)
    build_s = time.perf_counter() - start
    memory = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (backend.weights, backend.postings))
    rows = [queries[i] for i in range(queries.shape[0])]
    timing = latencies(lambda i: backend.search(rows[i], K), len(rows), args.searches, args.time_limit)
    with tempfile.TemporaryDirectory(prefix="ragsae-scale-") as tmp:
        path = Path(tmp) / "weights.npz"
        save_compact_csr_atomic(path, weights)
        disk = path.stat().st_size
    return {"build_per_s": n / build_s, "memory_per_passage": memory / n, "disk_per_passage": disk / n, **timing}


def measure_faiss(n: int, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    vectors = unit_vectors(n, DENSE_DIM, rng)
    start = time.perf_counter()
    backend = FaissBackend.build(vectors, use_gpu=False)
    build_s = time.perf_counter() - start
    del vectors
    queries = unit_vectors(43, DENSE_DIM, rng)
    timing = latencies(lambda i: backend.search(queries[i : i + 1], K), len(queries), args.searches, args.time_limit)
    with tempfile.TemporaryDirectory(prefix="ragsae-scale-") as tmp:
        disk = sum(folder_bytes(Path(tmp) / name) for name in backend.save(Path(tmp)))
    return {"build_per_s": n / build_s, "memory_per_passage": DENSE_DIM * 4, "disk_per_passage": disk / n, **timing}


def measure_bm25s(tokens: list[list[str]], queries: list[list[str]], args: argparse.Namespace) -> dict[str, Any]:
    import bm25s

    n = len(tokens)
    retriever = bm25s.BM25()
    start = time.perf_counter()
    retriever.index(tokens, show_progress=False)
    build_s = time.perf_counter() - start
    memory = sum(retriever.scores[name].nbytes for name in ("data", "indices", "indptr"))

    def search(i: int) -> Any:
        return retriever.retrieve([queries[i]], k=K, show_progress=False, n_threads=0)

    timing = latencies(search, len(queries), args.searches, args.time_limit)
    with tempfile.TemporaryDirectory(prefix="ragsae-scale-bm25s-") as tmp:
        retriever.save(tmp)
        disk = folder_bytes(Path(tmp))
    return {"build_per_s": n / build_s, "memory_per_passage": memory / n, "disk_per_passage": disk / n, **timing}


def measure_milvus(
    weights: sp.csr_matrix, queries: sp.csr_matrix, d_model: int, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, Any]:
    from ragsae.retrieval.backends.milvus import MilvusBackend, PassageRecords, release_lite

    n = weights.shape[0]
    with tempfile.TemporaryDirectory(prefix="ragsae-scale-milvus-") as tmp:
        uri = str(Path(tmp) / "scale.db")
        backend = MilvusBackend.connect(uri, "scale", weights.shape[1], d_model)
        try:
            backend.create()
            insert_s = 0.0
            for start in range(0, n, INSERT_CHUNK):
                stop = min(n, start + INSERT_CHUNK)
                passages = [Passage(str(i), str(i), "", 0, 0) for i in range(start, stop)]
                records = PassageRecords(
                    np.arange(start, stop), weights[start:stop], unit_vectors(stop - start, d_model, rng), passages
                )
                began = time.perf_counter()
                backend.insert(records)
                insert_s += time.perf_counter() - began
            began = time.perf_counter()
            backend.flush()
            insert_s += time.perf_counter() - began
            stored = len(backend)
            rows = [queries[i] for i in range(queries.shape[0])]
            timing = latencies(lambda i: backend.search(rows[i], K), len(rows), args.searches, args.time_limit)
            backend.close()
        finally:
            release_lite(uri)
        disk = folder_bytes(Path(uri))
    return {"build_per_s": n / insert_s, "disk_per_passage": disk / n, "stored": stored, **timing}


# --- report --------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Search-step scaling ({result['index']}, {result['queries']} judged queries, k = {K})",
        "",
        f"Real passages: the first {result['real_passages']:,} rows; every N above that is the real rows plus "
        "synthetic rows sampled from their distribution (row lengths, latent document frequencies, per-latent "
        "values). FAISS flat: random 384-dim float32 unit vectors and queries. bm25s: the real passages' words, "
        "then synthetic passages of words drawn by their real frequencies. Search step only, one query at a "
        "time, CPU.",
        "",
        "| engine | N | data | p50 ms | p99 ms | searches | build passages/s | memory B/passage | disk B/passage |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        memory = f"{row['memory_per_passage']:,.0f}" if "memory_per_passage" in row else "-"
        lines.append(
            f"| {row['engine']} | {row['n']:,} | {row['data']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['searches']} | {row['build_per_s']:,.0f} | {memory} | {row['disk_per_passage']:,.0f} |"
        )
    lines += ["", "Goals:"] + [f"- {goal}" for goal in result["goals"]]
    lines += ["", *result.get("notes", []), "", f"{result['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def goals(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    csr = [r for r in rows if r["engine"] == "ragsae-CSR" and r["n"] == CSR_GOAL_N]
    if csr:
        p50 = csr[0]["p50_ms"]
        met = "met" if p50 < CSR_P50_GOAL_MS else f"missed by {p50 - CSR_P50_GOAL_MS:.1f} ms"
        out.append(f"CSR p50 at {CSR_GOAL_N:,}: {p50:.1f} ms (goal < {CSR_P50_GOAL_MS:.0f} ms): {met}")
    milvus = [r for r in rows if r["engine"] == "ragsae-Milvus"]
    if milvus:
        top = max(milvus, key=lambda r: r["n"])
        p99 = top["p99_ms"]
        met = "met" if p99 < MILVUS_P99_GOAL_MS else f"missed by {p99 - MILVUS_P99_GOAL_MS:.1f} ms"
        goal = f"goal < {MILVUS_P99_GOAL_MS:.0f} ms"
        out.append(f"Milvus p99 at its largest N ({top['n']:,}): {p99:.1f} ms ({goal}): {met}")
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, engine in enumerate(dict.fromkeys(r["engine"] for r in rows)):
        mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["n"])
        n = [r["n"] for r in mine]
        ax.plot(n, [r["p50_ms"] for r in mine], "o-", color=f"C{i}", label=f"{engine} p50")
        ax.plot(n, [r["p99_ms"] for r in mine], "s--", color=f"C{i}", label=f"{engine} p99")
    ax.set(xscale="log", yscale="log", xlabel="passages (N)", ylabel="search step, ms (one query, k = 10)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="indexes/msmarco-5k", help="a CSR index folder (real passages)")
    parser.add_argument("--dataset", default="../shared/datasets/msmarco-5k", help="its BEIR folder (judged queries)")
    parser.add_argument("--sizes", default="5000,50000,500000", help="N for CSR and FAISS (comma list)")
    parser.add_argument("--milvus-sizes", default="5000,50000", help="N for Milvus Lite (comma list; empty: none)")
    parser.add_argument("--searches", type=int, default=200, help="timed searches per engine and N")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds of timed searches per engine and N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="benchmarks/results/scale")
    args = parser.parse_args(argv)
    parse = lambda text: sorted({int(s) for s in text.split(",") if s.strip()})  # noqa: E731
    sizes, milvus_sizes = parse(args.sizes), parse(args.milvus_sizes)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    index = Index.load(args.index)
    _, queries, _ = load_beir(Path(args.dataset), "test")
    retriever = index.retriever
    weights = retriever.query_weights(index.encode_queries(list(queries.values())))
    real = sp.vstack([s.sparse.weights for s in retriever.view.segments], format="csr")
    # The backend built here answers as the index's own sparse search does.
    same = np.array_equal(CsrBackend.of(real).search(weights, K)[1], retriever.sparse.search(weights, K)[1])
    largest = max(sizes + milvus_sizes)
    synthetic = sample_weights(real, max(0, largest - real.shape[0]), rng)
    passages = sp.vstack([real, synthetic], format="csr")
    del synthetic
    words = bm25s_tokens([p.text for p in index.passages])
    if sizes and not all(words):
        raise SystemExit(f"{args.index}: bm25s needs the passages' text, and the index stores none")
    words += sample_tokens(words, max(0, max(sizes, default=0) - len(words)), np.random.default_rng(args.seed + 1))
    query_words = bm25s_tokens(list(queries.values()))

    rows: list[dict[str, Any]] = []

    def record(engine: str, n: int, found: dict[str, Any], data: str) -> None:
        rows.append({"engine": engine, "n": n, "data": data, **found})
        print(f"{engine} N={n:,}: p50 {found['p50_ms']:.2f} ms, p99 {found['p99_ms']:.2f} ms", flush=True)

    for n in sizes:
        data = "real" if n <= real.shape[0] else "real+synthetic"
        record("ragsae-CSR", n, measure_csr(passages[:n], weights, args), data)
        record("FAISS flat 384", n, measure_faiss(n, args, rng), "random")
        data = "real" if n <= len(index.passages) else "real+synthetic"
        record("bm25s", n, measure_bm25s(words[:n], query_words, args), data)
    for n in milvus_sizes:
        data = "real" if n <= real.shape[0] else "real+synthetic"
        record("ragsae-Milvus", n, measure_milvus(passages[:n], weights, retriever.w_dec.shape[1], args, rng), data)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "index": args.index,
        "queries": weights.shape[0],
        "query_latents_mean": float(np.diff(weights.indptr).mean()),
        "real_passages": int(real.shape[0]),
        "latents_per_passage_mean": float(np.diff(real.indptr).mean()),
        "csr_backend_matches_index_search": bool(same),
        "k": K,
        "rows": rows,
        "goals": goals(rows),
        "notes": [
            f"N above {real.shape[0]:,} is synthetic past the real rows (see the script's docstring).",
            f"Milvus dense field: random unit vectors of width {retriever.w_dec.shape[1]}; "
            "its memory is not measured (Milvus Lite serves from threads of the measuring process).",
            "bm25s above the real passages: synthetic words, unigram-sampled (see the script's docstring).",
        ],
        "seconds": time.perf_counter() - started,
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "threads": os.cpu_count(),
        "versions": {
            **library_versions(),
            **{name: importlib.metadata.version(name) for name in ("pymilvus", "milvus-lite", "faiss-cpu", "bm25s")},
        },
    }
    if plot(rows, out / "scale.png"):
        result["plot"] = "scale.png"
    write_json_atomic(out / "scale.json", result)
    write_text_atomic(out / "scale.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
