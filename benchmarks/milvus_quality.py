"""Does the Milvus backend answer as the CSR segments do? nDCG@10 and top-10 agreement on real collections.

python benchmarks/milvus_quality.py ../shared/datasets/msmarco-5k ../shared/datasets/cranfield
    [--indexes indexes] [--output-dir benchmarks/results/milvus] [--query-latents N [--candidates C]]

For each BEIR folder, the CSR index built from it with the default configuration (INDEXES/NAME, as
`ragsae build ../shared/datasets/msmarco-5k indexes/msmarco-5k` writes it) is loaded and its judged
queries are encoded once. Their codes are searched from the index's segments (the exact reference);
then the index is saved to a temporary folder as a Milvus-served copy (`Index.serving` set, then
`Index.save`, which fills a Milvus Lite collection from the segments: nothing is captured, trained or
encoded again) and the same codes are searched from Milvus. Sparse mode, the indexes' default, with
their pseudo-relevance feedback, whose first search and row reads Milvus answers too; k = 10 and k = 100
(what `ragsae bench` retrieves), nDCG@10 of the document run of all the hits (`to_document_run`: a
document scores its best passage; at k = 10 a document with two passages in the top 10 leaves the run
with fewer than 10 documents).

`--query-latents` turns on the backend's opt-in approximation (`MilvusBackend.query_latents`: a sparse
query is searched by its N largest weights for C hits, at least k, scored again by the whole query);
without it the backend's defaults are measured.

Reported per collection and k: nDCG@10 from both and their difference; the share of queries whose top-10
passages are the same list, and the same set; the largest score difference rank by rank in the top 10;
and how often the segments answered in Milvus's place (must be 0, or Milvus was not measured). Targets
(issue 15): nDCG@10 within 0.002 of CSR's, the same top-10 list for at least 95% of queries.

Writes OUTPUT_DIR/milvus-quality.json (with every query whose top 10 differ) and milvus-quality.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragsae import Index
from ragsae.bench import evaluate, load_beir, to_document_run
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.retrieval.backends.milvus import CONSISTENCY_LEVEL, release_lite, serving_record
from ragsae.storage import write_json_atomic, write_text_atomic

DEPTHS = (10, 100)
"""Hits retrieved per query; agreement and nDCG@10 always look at the top 10."""
TOP = 10
MAX_NDCG_DIFFERENCE = 0.002
MIN_SAME_TOP = 0.95
SEARCH_PARAMS = {"metric_type": "IP"}
"""What `MilvusBackend.search` passes: no drop_ratio_search, no other approximation parameter."""
PRUNED = (
    "Approximate: each sparse query is searched by its {latents} largest weights for {candidates} hits (at least "
    "k), which are scored again by the whole query from their stored weights; a passage the pruned query ranks "
    "below them is missed."
)
EXACTNESS = (
    "Exact: the sparse field's SPARSE_INVERTED_INDEX with inner product and no drop ratio scores every "
    "posting of every query latent (Milvus Lite's `SparseIpIndex` is an exhaustive term-at-a-time sum), "
    "so it can differ from CSR only by float rounding (both sides' weights are float32; Milvus sums their "
    "products in float64, scipy in float32) and, through it, in the order of hits whose scores tie to "
    "that rounding."
)
RETRIEVER_LOGGER = "ragsae.retrieval.retriever"


# --- pure functions ------------------------------------------------------------------------------
def agreement(
    reference: tuple[np.ndarray, np.ndarray], served: tuple[np.ndarray, np.ndarray], top: int = TOP
) -> dict[str, Any]:
    """How `served` (scores, ids), (nq, >= top), matches `reference` in each query's first `top` hits:
    the share of queries with the same ids in the same order and as a set, the largest score difference
    rank by rank (absolute, and relative to max(1, |reference score|)), and the rows of the queries whose
    lists differ."""
    (ref_scores, ref_ids), (got_scores, got_ids) = reference, served
    ref_ids, got_ids = ref_ids[:, :top], got_ids[:, :top]
    ref, got = ref_scores[:, :top].astype(np.float64), got_scores[:, :top].astype(np.float64)
    with np.errstate(invalid="ignore"):  # -inf padding on both sides counts as equal
        difference = np.where(ref == got, 0.0, np.abs(ref - got))
    scale = np.maximum(1.0, np.abs(np.where(np.isfinite(ref), ref, 0.0)))
    ordered = (ref_ids == got_ids).all(axis=1)
    as_set = np.array([set(a.tolist()) == set(b.tolist()) for a, b in zip(ref_ids, got_ids)], dtype=bool)
    return {
        "same_top_ordered": float(ordered.mean()) if len(ordered) else 1.0,
        "same_top_set": float(as_set.mean()) if len(as_set) else 1.0,
        "max_score_difference": float(difference.max(initial=0.0)),
        "max_relative_score_difference": float((difference / scale).max(initial=0.0)),
        "differing_rows": np.flatnonzero(~ordered).tolist(),
    }


class Fallbacks(logging.Handler):
    """Collects the retriever's messages that the segments answered a search or row read in the serving
    engine's place."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "the index's segments" in message:
            self.messages.append(message)


# --- measuring -----------------------------------------------------------------------------------
def ndcg(scores: np.ndarray, ids: np.ndarray, qids: list[str], doc_ids: list[str], qrels: dict) -> float:
    """nDCG@10 of the document run of all the hits (a document scores its best passage), as `ragsae bench`."""
    return float(evaluate(to_document_run(scores, ids, qids, doc_ids), qrels)["aggregate"]["nDCG@10"])


def search_all(index: Index, codes: Any) -> dict[int, tuple[tuple[np.ndarray, np.ndarray], float]]:
    """Per depth: the sparse (scores, ids) of the query codes and the seconds the search took."""
    found = {}
    for depth in DEPTHS:
        start = time.perf_counter()
        hits = index.retriever.search(codes, depth, "sparse")
        found[depth] = (hits, time.perf_counter() - start)
    return found


def milvus_settings(index: Index) -> dict[str, Any]:
    """The Milvus collection's indexes as Milvus describes them, and the search settings of
    `MilvusBackend.search`."""
    engine = index.engine
    assert engine is not None
    client, collection = engine.client, engine.collection
    described = {name: client.describe_index(collection, name) for name in client.list_indexes(collection)}
    latents = engine.query_latents
    return {
        "indexes": described,
        "search_params": SEARCH_PARAMS,
        "query_latents": latents,
        "candidates": engine.candidates if latents is not None else None,
        "consistency_level": CONSISTENCY_LEVEL,
        "exactness": EXACTNESS if latents is None else PRUNED.format(latents=latents, candidates=engine.candidates),
    }


def measure(
    folder: Path, index_path: Path, llm: Any, query_latents: int | None = None, candidates: int | None = None
) -> tuple[dict[str, Any], Any]:
    """The comparison on one collection, and the LLM (loaded by the first index, reused by the next)."""
    _, queries, qrels = load_beir(folder, "test")
    index = Index.load(index_path, llm=llm)
    if index.serving is not None:
        raise SystemExit(f"{index_path}: already served by Milvus; give a CSR index (the reference)")
    qids = list(queries)
    doc_ids = [p.doc_id for p in index.passages]
    codes = index.encode_queries([queries[q] for q in qids])
    reference = search_all(index, codes)
    with tempfile.TemporaryDirectory(prefix="ragsae-milvus-quality-") as tmp:
        copy = Path(tmp) / index_path.name
        index.serving = serving_record(None, copy)  # Milvus Lite inside the copy, as `build --backend milvus`
        start = time.perf_counter()
        index.save(copy)
        fill_s = time.perf_counter() - start
        engine = index.engine
        if engine is None or index.retriever.engine is not engine:
            raise SystemExit(f"{index_path}: the Milvus collection was not attached after the save")
        if query_latents is not None:
            engine.query_latents = query_latents
            engine.candidates = candidates if candidates is not None else engine.candidates
        settings = milvus_settings(index)
        entities = len(engine)
        fallbacks = Fallbacks()
        logger = logging.getLogger(RETRIEVER_LOGGER)
        level = logger.level
        logger.addHandler(fallbacks)
        logger.setLevel(logging.DEBUG)
        try:
            served = search_all(index, codes)
        finally:
            logger.removeHandler(fallbacks)
            logger.setLevel(level)
            engine.close()
            release_lite(engine.uri)  # stop this process's Lite server before its folder goes
    rows = []
    for depth in DEPTHS:
        (csr, csr_s), (milvus, milvus_s) = reference[depth], served[depth]
        agree = agreement(csr, milvus)
        csr_ndcg, milvus_ndcg = ndcg(*csr, qids, doc_ids, qrels), ndcg(*milvus, qids, doc_ids, qrels)
        differing = agree.pop("differing_rows")
        rows.append(
            {
                "k": depth,
                "ndcg@10_csr": csr_ndcg,
                "ndcg@10_milvus": milvus_ndcg,
                "ndcg@10_difference": milvus_ndcg - csr_ndcg,
                **agree,
                "search_s_csr": csr_s,
                "search_s_milvus": milvus_s,
                "targets_met": abs(milvus_ndcg - csr_ndcg) <= MAX_NDCG_DIFFERENCE
                and agree["same_top_ordered"] >= MIN_SAME_TOP,
                "differing_queries": [
                    {
                        "qid": qids[r],
                        "csr": list(zip(csr[1][r, :TOP].tolist(), csr[0][r, :TOP].tolist())),
                        "milvus": list(zip(milvus[1][r, :TOP].tolist(), milvus[0][r, :TOP].tolist())),
                    }
                    for r in differing
                ],
            }
        )
    result = {
        "dataset": folder.name,
        "index": str(index_path),
        "queries": len(qids),
        "passages": len(index),
        "milvus_entities": entities,
        "milvus_fill_s": fill_s,
        "fallbacks": len(fallbacks.messages),
        "fallback_messages": fallbacks.messages[:5],
        "feedback_passages": index.retriever.config.feedback_passages,
        "settings": settings,
        "rows": rows,
    }
    return result, index.llm


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "## Milvus backend against the CSR segments (sparse mode, judged queries)",
        "",
        f"Targets: nDCG@10 within {MAX_NDCG_DIFFERENCE} of CSR's, the same top-{TOP} list for at least "
        f"{MIN_SAME_TOP:.0%} of queries. Top-{TOP} agreement and score differences are rank by rank.",
        "",
        "| collection | queries | k | nDCG@10 CSR | nDCG@10 Milvus | difference | same top-10 list | same top-10 set "
        "| max score diff (abs / rel) | fallbacks | targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in result["collections"]:
        for r in c["rows"]:
            lines.append(
                f"| {c['dataset']} | {c['queries']} | {r['k']} | {r['ndcg@10_csr']:.4f} | {r['ndcg@10_milvus']:.4f} "
                f"| {r['ndcg@10_difference']:+.4f} | {r['same_top_ordered']:.1%} | {r['same_top_set']:.1%} "
                f"| {r['max_score_difference']:.2e} / {r['max_relative_score_difference']:.1e} | {c['fallbacks']} "
                f"| {'met' if r['targets_met'] else 'MISSED'} |"
            )
    lines.append("")
    for c in result["collections"]:
        lines.append(
            f"{c['dataset']}: {c['passages']} passages, {c['milvus_entities']} Milvus entities, filled in "
            f"{c['milvus_fill_s']:.1f} s (the index saved with it); search of all queries at k = "
            + ", ".join(
                f"{r['k']}: CSR {r['search_s_csr']:.2f} s, Milvus {r['search_s_milvus']:.2f} s" for r in c["rows"]
            )
            + "."
        )
    settings = result["collections"][0]["settings"]
    sparse: dict[str, Any] = next((d for d in settings["indexes"].values() if d.get("field_name") == "sparse"), {})
    versions = result["versions"]
    lines += [
        "",
        f"Milvus: milvus-lite {versions['milvus-lite']}, pymilvus {versions['pymilvus']}; sparse field index "
        f"{sparse.get('index_type')}, metric {sparse.get('metric_type')}; search params {settings['search_params']}; "
        f"consistency level {settings['consistency_level']}. {settings['exactness']}",
        "",
        f"Command: `{result['command']}`; commit {result['commit']}; {result['machine']['cpu']}, "
        f"{result['machine']['cpus']} cores.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+", help="BEIR folders (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--indexes", default="indexes", help="folder holding each dataset's CSR index by its name")
    parser.add_argument("--output-dir", default="benchmarks/results/milvus")
    parser.add_argument("--query-latents", type=int, help="search sparse queries by their N strongest latents")
    parser.add_argument("--candidates", type=int, help="hits a pruned query asks for (default: the backend's)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    collections, llm = [], None
    for folder in map(Path, args.datasets):
        found, llm = measure(folder, Path(args.indexes) / folder.name, llm, args.query_latents, args.candidates)
        collections.append(found)
    result = {
        "collections": collections,
        "targets": {"max_ndcg@10_difference": MAX_NDCG_DIFFERENCE, "min_same_top10_share": MIN_SAME_TOP},
        "seconds": time.perf_counter() - started,
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "versions": {
            **library_versions(),
            **{name: importlib.metadata.version(name) for name in ("pymilvus", "milvus-lite")},
        },
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "milvus-quality.json", result)
    write_text_atomic(out / "milvus-quality.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
