"""Routing queries to the right index, by SAE signature, BM25 and MiniLM centroids; and personalisation.

python benchmarks/routing.py [--msmarco-index indexes/msmarco-5k] [--cranfield-index indexes/cranfield] \
    [--stdlib-index indexes/stdlib-docs] [--limit N]

Three indexes, given by path, built with the default `BuildConfig` over one LLM:
`ragsae build ../shared/datasets/msmarco-5k -o indexes/msmarco-5k`, the same for cranfield, and the demo's
index of standard-library docstrings (`ragsae demo` builds `indexes/stdlib-docs`). Their queries are pooled
and shuffled (seeded): the judged queries of msmarco-5k and cranfield (BEIR folders, `load_beir`) and the
questions about standard-library modules of `benchmarks/routing_stdlib_questions.jsonl` (written for this
benchmark, one module named per question). Each query's right answer is the index of its own collection;
each is routed to one of the three by

- sae: how `Collections.search` ranks the indexes: `routing_score` divided by the index's background
  (`Collections.backgrounds`: its mean score for pseudo-queries cut from the other two indexes' passages);
- sae-plain: `Collections.route` (`routing_score`) alone, the geometric mean of the two next signals, one
  LLM capture per batch of queries for the three indexes;
- sae-signature: the highest cosine of the query's IDF-weighted code under each index's SAE with one of
  the centroids of that index's signature (k-means centroids of its passages' unit-length latent
  weights; `ragsae/routing/signature.py`);
- sae-support: the same codes matched against each index's best passage instead of its signature
  (`RAG.support`: cosine of the IDF-weighted code with the top passage's latent weights);
- sae-centroid: for comparison, the signature with one centroid per index (the mean of its passages);
- bm25: bm25s (English stopwords) over each index's live passages, the index whose best passage scores
  highest;
- minilm: all-MiniLM-L6-v2 embeddings of each index's live passages, the index whose centroid has the
  highest cosine with the query's embedding.

Reported: accuracy over all queries, per collection (recall), their mean (macro), and each method's
confusion matrix; for the SAE methods, the median routing score of the right index and of the best wrong one.

End to end: each judged query of msmarco-5k and cranfield searched, one at a time, in its own index alone
(the upper bound), routed to the best index (`Collections.search`, route='best'), and in all three with
their hits merged by rank (route='all'); nDCG@10 with one hit per document (a document of another
collection counts as not relevant), and the p50 latency of the routed and the all-index search, LLM
capture included.

Personalisation: for each judged query of msmarco-5k and cranfield with at least `--min-judged` relevant
documents, the relevant documents are shuffled (seeded) and split in half; a `Profile` is built from the
first half, and the query is searched in its own index with `profile=` at each `--weights` value (0 is the
plain search). nDCG@10 is computed on the second half's judgments, with the first half's documents taken
out of the ranking (residual collection), so that finding the profile's own documents again earns nothing.

Writes OUTPUT_DIR/routing.json (with every query's routing) and routing.md, stamped with the command,
the commit (`git rev-parse HEAD`) and the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragsae.bench import load_beir
from ragsae.bench.baselines import dense_model_path
from ragsae.bench.metrics import evaluate
from ragsae.cli import DEFAULT_DEMO_INDEX
from ragsae.index import Index
from ragsae.provenance import command_line, machine
from ragsae.routing import Collections, Profile, compute_signature, routing_score, signature
from ragsae.storage import save_npy_atomic, write_json_atomic, write_text_atomic
from ragsae.text import fingerprint

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
STDLIB_QUESTIONS = Path(__file__).resolve().parent / "routing_stdlib_questions.jsonl"
METHODS = ("sae", "sae-plain", "sae-signature", "sae-support", "sae-centroid", "bm25", "minilm")
SAE_METHODS = ("sae", "sae-plain", "sae-signature", "sae-support", "sae-centroid")


# --- queries -------------------------------------------------------------------------------------
def read_questions(path: Path) -> dict[str, str]:
    """{id: question} of a JSONL file with `_id`, `text` and `module` per line."""
    questions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not {"_id", "text", "module"} <= record.keys():
            raise SystemExit(f"{path}:{number}: expected _id, text and module")
        questions[str(record["_id"])] = str(record["text"])
    return questions


def pooled_queries(per_collection: dict[str, dict[str, str]], limit: int | None, seed: int) -> list[dict[str, str]]:
    """Every collection's queries (at most `limit` each, drawn at random), tagged and shuffled together."""
    rng = np.random.default_rng(seed)
    pooled = []
    for name, queries in per_collection.items():
        qids = sorted(queries)
        rng.shuffle(qids)
        pooled += [{"collection": name, "qid": qid, "text": queries[qid]} for qid in qids[:limit]]
    order = rng.permutation(len(pooled))
    return [pooled[i] for i in order]


def live_texts(index: Index) -> list[str]:
    """The live passages' texts, in row order."""
    return [index.passages[row].text for row in sorted(r for rows in index.doc_rows.values() for r in rows)]


# --- routers: each returns (n_queries, n_indexes) scores -------------------------------------------
def route_sae(
    collections: Collections, texts: list[str], batch: int = 32
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Routing scores as `Collections.search` ranks indexes ('sae': `Collections.route` divided by each
    index's background), as `Collections.route` gives them ('sae-plain'), by signature alone
    ('sae-signature'), by best-passage support alone ('sae-support') and by one centroid per index
    ('sae-centroid'), from one capture per batch of queries."""
    start, captures = time.perf_counter(), collections.captures
    backgrounds = collections.backgrounds()
    if backgrounds is None:
        raise SystemExit("routing: the indexes keep no passage text, so they have no backgrounds")
    single = {name: compute_signature(index, clusters=1) for name, index in collections}
    found: dict[str, list[np.ndarray]] = {method: [] for method in SAE_METHODS}
    for lo in range(0, len(texts), batch):
        codes = collections.encode_queries(texts[lo : lo + batch])
        plain = np.stack([routing_score(index, codes[name]) for name, index in collections], axis=1)
        found["sae-plain"].append(plain)
        found["sae"].append(plain / np.array([backgrounds[name] for name in collections.names]))
        for method, match in (
            ("sae-signature", lambda name, index: signature(index).match(codes[name])),
            ("sae-centroid", lambda name, index: single[name].match(codes[name])),
            ("sae-support", lambda name, index: best_support(index, codes[name])),
        ):
            found[method].append(np.stack([match(name, index) for name, index in collections], axis=1))
    seconds = time.perf_counter() - start
    scores = {method: np.concatenate(parts) for method, parts in found.items()}
    return scores, {"seconds": seconds, "captures": collections.captures - captures, "backgrounds": backgrounds}


def best_support(index: Index, codes: Any) -> np.ndarray:
    """(n_queries,) `Retriever.support` of each query's codes and the passage they score highest."""
    retriever = index.retriever
    weights = retriever.scaled(codes)
    _, ids = retriever.sparse.search(weights, 1)
    return retriever.support(weights, ids[:, 0])


def route_bm25(corpora: list[list[str]], texts: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    import bm25s

    start = time.perf_counter()
    scores = np.zeros((len(texts), len(corpora)))
    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    for column, corpus in enumerate(corpora):
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        _, top = retriever.retrieve(tokens, k=1, show_progress=False)
        scores[:, column] = np.asarray(top, dtype=np.float64)[:, 0]
    return scores, {"seconds": time.perf_counter() - start}


def route_minilm(corpora: list[list[str]], texts: list[str], cache_dir: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import torch
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    model = SentenceTransformer(str(dense_model_path()), device="cuda" if torch.cuda.is_available() else "cpu")
    centroids = []
    for corpus in corpora:
        path = cache_dir / "dense" / f"minilm-passages-{fingerprint(corpus)[:24]}.npy"
        if not path.is_file():
            vectors = model.encode(corpus, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npy_atomic(path, np.asarray(vectors, dtype=np.float32))
        centroid = np.load(path).astype(np.float64).mean(axis=0)
        centroids.append(centroid / max(np.linalg.norm(centroid), 1e-12))
    queries = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    scores = np.asarray(queries, dtype=np.float64) @ np.stack(centroids).T
    return scores, {"seconds": time.perf_counter() - start}


def summary(scores: np.ndarray, truth: list[int], names: list[str]) -> dict[str, Any]:
    """Accuracy (overall, per collection, macro) and confusion matrix of routing by the highest score."""
    predicted = np.argmax(scores, axis=1)
    truth_array = np.asarray(truth)
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(confusion, (truth_array, predicted), 1)
    per = {
        name: float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None
        for i, name in enumerate(names)
    }
    present = [v for v in per.values() if v is not None]
    own = scores[np.arange(len(truth)), truth_array]
    wrong = np.where(np.eye(len(names), dtype=bool)[truth_array], -np.inf, scores).max(axis=1)
    return {
        "accuracy": float(np.mean(predicted == truth_array)) if len(truth) else None,
        "macro_accuracy": float(np.mean(present)) if present else None,
        "per_collection": per,
        "confusion": {"rows_true_columns_routed": names, "counts": confusion.tolist()},
        "median_score_right": float(np.median(own)) if len(truth) else None,
        "median_score_best_wrong": float(np.median(wrong)) if len(truth) else None,
    }


# --- end to end ------------------------------------------------------------------------------------
SEARCHES = {"right index only": None, "routed (best)": "best", "all three, merged by rank": "all"}
"""The searches compared end to end: the query's own index alone (the upper bound), `Collections` with
route='best', and with route='all' (hits of the three interleaved by rank, `Collections.search`)."""


def end_to_end(collections: Collections, beir: dict[str, Any], limit: int | None, seed: int) -> dict[str, Any]:
    """nDCG@10 (one hit per document) of each of `SEARCHES` over the judged queries of each BEIR
    collection, and the single-query latency of routed against all-index search (capture included)."""
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {}
    timings: dict[str, list[float]] = {"best": [], "all": []}
    for name, (_, queries, qrels) in beir.items():
        qids = sorted(queries)
        rng.shuffle(qids)
        qids = qids[:limit]
        # Documents named by index, so that a document of another collection never matches a judgment.
        judged = {qid: {f"{name}/{d}": g for d, g in qrels[qid].items()} for qid in qids}
        ndcg = {}
        for label, route in SEARCHES.items():
            run: dict[str, dict[str, float]] = {}
            for qid in qids:
                if route is None:
                    hits = [(name, h) for h in collections[name].search(queries[qid], k=10, per_doc=True)]
                else:
                    start = time.perf_counter()
                    routed = collections.search(queries[qid], k=10, route=route, per_doc=True)
                    timings[route].append(time.perf_counter() - start)
                    hits = [(h.index, h) for h in routed.hits]
                run[qid] = {f"{index}/{h.doc_id}": 1.0 / (rank + 1) for rank, (index, h) in enumerate(hits)}
            ndcg[label] = evaluate(run, judged)["aggregate"]["nDCG@10"]
        result[name] = {"queries": len(qids), "ndcg@10": ndcg}
    result["latency_ms_p50"] = {route: float(np.median(t) * 1e3) for route, t in timings.items()}
    return result


# --- personalisation -----------------------------------------------------------------------------
def personalisation(
    index: Index,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    weights: list[float],
    min_judged: int,
    limit: int | None,
    seed: int,
) -> dict[str, Any]:
    """nDCG@10 on the held-out half of each query's relevant documents, per profile weight."""
    rng = np.random.default_rng(seed)
    runs: dict[float, dict[str, dict[str, float]]] = {w: {} for w in weights}
    held: dict[str, dict[str, int]] = {}
    chosen = [
        qid
        for qid in sorted(queries)
        if len([d for d, g in qrels[qid].items() if g > 0 and d in index.doc_rows]) >= min_judged
    ]
    rng.shuffle(chosen)
    for qid in chosen[:limit]:
        relevant = sorted(d for d, g in qrels[qid].items() if g > 0 and d in index.doc_rows)
        rng.shuffle(relevant)
        half = len(relevant) // 2
        known = set(relevant[:half])  # the profile's; the rest, judged, is what is scored
        profile = Profile.from_passages(index, sorted(known))
        held[qid] = {d: g for d, g in qrels[qid].items() if d not in known}
        codes = index.encode_queries([queries[qid]])
        depth = 10 + len(known)
        for weight in weights:
            hits = index.batch_search(
                {qid: queries[qid]}, depth, per_doc=True, profile=profile, weight=weight, codes=codes
            )[qid]
            residual = [h for h in hits if h.doc_id not in known][:10]
            runs[weight][qid] = {h.doc_id: h.score for h in residual}
    return {
        "queries": len(held),
        "min_judged": min_judged,
        "ndcg@10": {str(w): evaluate(runs[w], held)["aggregate"]["nDCG@10"] if held else None for w in weights},
    }


# --- report ----------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    names = result["indexes"]
    lines = [
        "## Routing queries among three indexes",
        "",
        f"Queries: {', '.join(f'{n} {c}' for n, c in result['queries'].items())}; each routed to the index "
        "with the highest score.",
        "",
        "| method | accuracy | macro accuracy | " + " | ".join(f"{n} recall" for n in names) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for method, row in result["methods"].items():
        per = " | ".join(fmt(row["per_collection"][n]) for n in names)
        lines.append(f"| {method} | {fmt(row['accuracy'])} | {fmt(row['macro_accuracy'])} | {per} |")
    for method, row in result["methods"].items():
        lines += ["", f"Confusion matrix, {method} (rows: the query's collection; columns: routed to):", ""]
        lines += ["| | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
        for name, counts in zip(names, row["confusion"]["counts"]):
            lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
    backgrounds = result["methods"].get("sae", {}).get("cost", {}).get("backgrounds")
    if backgrounds:
        lines += [
            "",
            "Backgrounds (sae divides each index's score by its own): "
            + ", ".join(f"{n} {b:.3f}" for n, b in backgrounds.items())
            + ".",
        ]
    for method in SAE_METHODS:
        row = result["methods"].get(method)
        if row is not None:
            lines += [
                "",
                f"{method} routing scores: median {fmt(row['median_score_right'])} for the right index, "
                f"{fmt(row['median_score_best_wrong'])} for the best wrong one.",
            ]
    if result.get("end_to_end"):
        e2e = result["end_to_end"]
        beir_names = [n for n in names if n in e2e]
        lines += [
            "",
            "## End to end",
            "",
            "| collection | queries | " + " | ".join(f"nDCG@10 {label}" for label in SEARCHES) + " |",
            "| --- | --- | " + " | ".join("---" for _ in SEARCHES) + " |",
        ]
        for name in beir_names:
            row = e2e[name]
            values = " | ".join(fmt(row["ndcg@10"][label]) for label in SEARCHES)
            lines.append(f"| {name} | {row['queries']} | {values} |")
        latency = e2e["latency_ms_p50"]
        lines += [
            "",
            f"Single-query latency p50, capture included: routed {latency['best']:.1f} ms, all three "
            f"{latency['all']:.1f} ms.",
        ]
    if result.get("personalisation"):
        weights = result["weights"]
        lines += [
            "",
            "## Personalisation",
            "",
            "nDCG@10 on the held-out half of each query's relevant documents (residual ranking), with a profile "
            "built from the other half, per profile weight (0: plain search):",
            "",
            "| collection | queries | " + " | ".join(f"w={w}" for w in weights) + " |",
            "| --- | --- | " + " | ".join("---" for _ in weights) + " |",
        ]
        for name, row in result["personalisation"].items():
            values = " | ".join(fmt(row["ndcg@10"][str(w)]) for w in weights)
            lines.append(f"| {name} | {row['queries']} | {values} |")
    lines += ["", f"Command: `{result['command']}`", f"Commit: `{result['git_commit']}`", ""]
    return "\n".join(lines)


def head_commit() -> str | None:
    """`git rev-parse HEAD` of the checkout (read-only), None outside one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--msmarco-index", default="indexes/msmarco-5k", help="index of msmarco-5k")
    parser.add_argument("--cranfield-index", default="indexes/cranfield", help="index of cranfield")
    parser.add_argument("--stdlib-index", default=str(DEFAULT_DEMO_INDEX), help="the demo's stdlib index")
    parser.add_argument("--msmarco-data", default=str(DATASETS / "msmarco-5k"), help="BEIR folder of msmarco-5k")
    parser.add_argument("--cranfield-data", default=str(DATASETS / "cranfield"), help="BEIR folder of cranfield")
    parser.add_argument("--stdlib-questions", default=str(STDLIB_QUESTIONS), help="JSONL: _id, text, module")
    parser.add_argument("--limit", type=int, help="at most this many queries per collection (drawn at random)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--weights", default="0,0.5,1,2,4", help="profile weights (personalisation)")
    parser.add_argument("--min-judged", type=int, default=4, help="relevant documents a query needs to be profiled")
    parser.add_argument("--no-personalisation", action="store_true", help="routing only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="benchmarks/.cache", help="MiniLM passage embeddings are cached here")
    parser.add_argument("--output-dir", default="benchmarks/results/routing")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}")
    weights = [float(w) for w in args.weights.split(",") if w]
    if args.min_judged < 2:
        parser.error("--min-judged: at least 2 (half for the profile, half to score)")

    commit = head_commit()
    names = ["msmarco-5k", "cranfield", "stdlib"]
    collections = Collections.load([args.msmarco_index, args.cranfield_index, args.stdlib_index], names=names)
    beir = {"msmarco-5k": load_beir(args.msmarco_data), "cranfield": load_beir(args.cranfield_data)}
    per_collection = {name: beir[name][1] for name in beir}
    per_collection["stdlib"] = read_questions(Path(args.stdlib_questions))
    pooled = pooled_queries(per_collection, args.limit, args.seed)
    texts = [q["text"] for q in pooled]
    truth = [names.index(q["collection"]) for q in pooled]
    corpora = [live_texts(collections[name]) for name in names] if {"bm25", "minilm"} & set(methods) else []

    scores: dict[str, np.ndarray] = {}
    costs: dict[str, dict[str, Any]] = {}
    if set(SAE_METHODS) & set(methods):
        found, cost = route_sae(collections, texts)
        for method in SAE_METHODS:
            if method in methods:
                scores[method], costs[method] = found[method], cost
    if "bm25" in methods:
        scores["bm25"], costs["bm25"] = route_bm25(corpora, texts)
    if "minilm" in methods:
        scores["minilm"], costs["minilm"] = route_minilm(corpora, texts, Path(args.cache_dir))

    result: dict[str, Any] = {
        "indexes": names,
        "index_paths": {n: str(collections[n].path) for n in names},
        "passages": {n: len(collections[n]) for n in names},
        "queries": {n: sum(q["collection"] == n for q in pooled) for n in names},
        "limit": args.limit,
        "seed": args.seed,
        "command": command_line(),
        "git_commit": commit,
        "machine": machine(),
        "methods": {m: {**summary(scores[m], truth, names), "cost": costs[m]} for m in methods},
        "weights": weights,
        "per_query": [{**q, **{m: [float(s) for s in scores[m][i]] for m in methods}} for i, q in enumerate(pooled)],
    }
    result["end_to_end"] = end_to_end(collections, beir, args.limit, args.seed)
    if not args.no_personalisation:
        result["personalisation"] = {
            name: personalisation(collections[name], *beir[name][1:], weights, args.min_judged, args.limit, args.seed)
            for name in beir
        }
    table = markdown(result)
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "routing.json", result)
    write_text_atomic(out / "routing.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
