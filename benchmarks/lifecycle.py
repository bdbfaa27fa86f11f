"""The living index on a real collection: build with a reused SAE against MiniLM, add throughput, quality
and latency across adds and compaction, drift of in- and out-of-domain text, light retraining.

python benchmarks/lifecycle.py ../shared/datasets/msmarco-5k [--drift-other ../shared/datasets/cranfield]
    [--retrain] [--output-dir benchmarks/results/lifecycle]

The SAE is the one the collection's benchmark trains and caches (`ragsae bench`, under
benchmarks/.cache), reused frozen; no activation cache is used, so every capture is paid as a user
would pay it. Steps:

1. build: `Index.build(corpus, sae=SAE)` over the whole collection, timed end to end, against
   all-MiniLM-L6-v2 embedding the same passages (sentence-transformers, batch 64);
2. growth: the first 80% of documents built in one go; drift (`Index.drift`, nothing added) against
   it of the held-out 20% in batches of 10, 100 and all, of another collection's documents and of
   Python source; then the held-out 20% added in 10 batches; nDCG@10 and single-query latency (p50
   over 30 queries, encoding included) of the one-go index, the grown one (11 segments) and the grown
   one compacted; the top-100 of every query compared with the one-go index;
3. add throughput: batches of 10, 100 and 1,000 documents (copies of collection documents under new
   ids) added to the whole index, against a fresh build of the same documents with the same SAE;
4. with --retrain: `Index.retrain` of the compacted index, continuing from the SAE for one epoch
   (capture read from the activation cache), against the SAE's training from scratch (its recorded
   time and FVU), with the nDCG@10 before and after.

Writes OUTPUT_DIR/lifecycle-DATASET.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragsae import BuildConfig, Index, load_llm
from ragsae.bench.baselines import dense_model_path
from ragsae.bench.beir import load_beir
from ragsae.bench.metrics import evaluate, to_document_run
from ragsae.bench.runner import cached_sae
from ragsae.capture import ActivationCache
from ragsae.encode import passage_activations
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.sae import load_sae
from ragsae.storage import write_json_atomic, write_text_atomic
from ragsae.text import Document, split_passages

LATENCY_QUERIES = 30


class BuildOnly(Exception):
    """Ends the run after step 1 (--build-only)."""


def ndcg(index: Index, queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> float:
    qids = list(queries)
    scores, ids = index.retriever.search(index.encode_queries([queries[q] for q in qids]), 100)
    run = to_document_run(scores, ids, qids, [p.doc_id for p in index.passages])
    return float(evaluate(run, qrels)["aggregate"]["nDCG@10"])


def latency_ms(index: Index, texts: list[str]) -> float:
    seconds = []
    for text in texts[:LATENCY_QUERIES]:
        fastest = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            index.search(text, k=10)
            fastest = min(fastest, time.perf_counter() - start)
        seconds.append(fastest)
    return 1000 * statistics.median(seconds)


def top100(index: Index, queries: dict[str, str]) -> dict[str, list[tuple[str, float]]]:
    found = index.batch_search(queries, k=100)
    return {q: [(h.passage_id, h.score) for h in hits] for q, hits in found.items()}


def agreement(a: dict, b: dict) -> dict[str, float]:
    """Share of queries whose top-100 ids are the same set, and the largest score difference."""
    same = np.mean([{p for p, _ in a[q]} == {p for p, _ in b[q]} for q in a])
    diff = max(abs(x - y) for q in a for (_, x), (_, y) in zip(a[q], b[q]))
    return {"same_top100_share": float(same), "max_score_difference": float(diff)}


def minilm_seconds(texts: list[str]) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(dense_model_path()), device="cpu")
    start = time.perf_counter()
    model.encode(texts, batch_size=64, normalize_embeddings=True)
    return time.perf_counter() - start


def python_sources(limit: int) -> list[Document]:
    """Python standard-library source files, first 3,000 characters each."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return [Document(f"py:{f.name}", f.read_text(encoding="utf-8", errors="replace")[:3000]) for f in files]


def renamed(documents: list[Document], tag: str) -> list[Document]:
    return [Document(f"{tag}:{d.doc_id}", d.text, d.title) for d in documents]


def drift_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    keys = ("passages", "fvu", "fvu_ratio", "mean_l0", "divergence", "divergence_ratio", "overactive_fraction")
    return {"documents": name, **{k: report[k] for k in keys}, "needs_retrain": report["needs_retrain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--drift-other", help="another BEIR folder whose documents should drift")
    parser.add_argument("--retrain", action="store_true", help="measure a light retraining (minutes)")
    parser.add_argument("--skip-drift", action="store_true", help="leave out the drift measurements")
    parser.add_argument("--tag", default="", help="added to the result files' names")
    parser.add_argument("--cache-dir", default="benchmarks/.cache", help="where `ragsae bench` caches SAEs")
    parser.add_argument("--output-dir", default="benchmarks/results/lifecycle")
    parser.add_argument(
        "--sae", help="reuse this SAE (its folder, or an index folder's current SAE) instead of the cached one"
    )
    parser.add_argument(
        "--build-only", action="store_true", help="only step 1 (build against MiniLM), written to its own files"
    )
    args = parser.parse_args()
    dataset = Path(args.dataset)
    documents, queries, qrels = load_beir(dataset)
    config = BuildConfig()
    llm = load_llm(config.llm, progress=True)
    passages = split_passages(documents, llm.tokenizer, config.capture.window, config.capture.overlap)
    texts = [p.text for p in passages]
    cache = Path(args.cache_dir)
    acts = passage_activations(llm, texts, config.capture, ActivationCache(cache / "activations"), progress=True)
    if args.sae:
        sae = load_sae(Index.current_sae_folder(args.sae) if (Path(args.sae) / "manifest.json").is_file() else args.sae)
    else:
        sae = cached_sae(llm, texts, acts, config.capture, config.sae, cache, True)
    del acts
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "documents": len(documents),
        "passages": len(passages),
        "sae_train": sae.metadata.get("train"),
    }
    work = Path(tempfile.mkdtemp(prefix="ragsae-lifecycle-"))
    try:
        # 1. Build with the reused SAE, against MiniLM.
        start = time.perf_counter()
        whole = Index.build(documents, work / "whole", config, sae=sae, llm=llm, progress=True)
        build_s = time.perf_counter() - start
        minilm_s = minilm_seconds(texts)
        result["build"] = {
            "ragsae_reused_sae_s": build_s,
            "minilm_embed_s": minilm_s,
            "ratio": build_s / minilm_s,
            "passages_per_s": len(passages) / build_s,
        }
        if args.build_only:
            # What describing the latents (the catalog behind labels, explain and the atlas) adds.
            start = time.perf_counter()
            Index.build(documents, work / "plain", config, sae=sae, llm=llm, describe_latents=False)
            result["build"]["without_latent_catalog_s"] = time.perf_counter() - start
            result["build"]["latent_catalog_bytes"] = (work / "whole" / "sae" / "v1" / "latents.json").stat().st_size
            print(json.dumps(result["build"], indent=2))
            raise BuildOnly
        print(json.dumps(result["build"], indent=2))

        # 2. Growth: 80% in one go; drift of held-out and other text against it (nothing added); then the
        # rest in 10 adds, then compaction.
        cut = int(0.8 * len(documents))
        start = time.perf_counter()
        # The one-go index's SAE carries the reference statistics it weights and prunes with (what
        # `build --sae INDEX` reuses); the cached SAE alone would take those of the first 80%.
        grown = Index.build(documents[:cut], work / "grown", config, sae=whole.sae, llm=llm)
        first_s = time.perf_counter() - start
        held_out = documents[cut:]
        drift = (
            []
            if args.skip_drift
            else [
                drift_row("held-out, 10 documents", grown.drift(held_out[:10])),
                drift_row("held-out, 100 documents", grown.drift(held_out[:100])),
                drift_row(f"held-out, {len(held_out)} documents", grown.drift(held_out)),
            ]
        )
        if args.drift_other and not args.skip_drift:
            other, _, _ = load_beir(Path(args.drift_other))
            name = Path(args.drift_other).name
            drift.append(drift_row(f"{name}, 100 documents", grown.drift(other[:100])))
            drift.append(drift_row(f"{name}, {min(1000, len(other))} documents", grown.drift(other[:1000])))
        if not args.skip_drift:
            drift.append(drift_row("Python source, 100 files", grown.drift(python_sources(100))))
            result["drift"] = drift
        result["drift_thresholds"] = {
            "max_fvu_ratio": config.drift.max_fvu_ratio,
            "max_divergence_ratio": config.drift.max_divergence_ratio,
        }
        print(json.dumps(drift, indent=2))
        add_s = []
        for batch in np.array_split(np.arange(cut, len(documents)), 10):
            start = time.perf_counter()
            grown.add([documents[i] for i in batch])
            add_s.append(time.perf_counter() - start)
        qtexts = list(queries.values())
        reference = top100(whole, queries)
        stages = {"one-go": whole, "80% + 10 adds": grown}
        rows = []
        for name, index in stages.items():
            rows.append(
                {
                    "index": name,
                    "segments": len(index.segments),
                    "ndcg@10": ndcg(index, queries, qrels),
                    "p50_ms": latency_ms(index, qtexts),
                    **agreement(top100(index, queries), reference),
                }
            )
        start = time.perf_counter()
        grown.compact()
        compact_s = time.perf_counter() - start
        rows.append(
            {
                "index": "80% + 10 adds, compacted",
                "segments": len(grown.segments),
                "ndcg@10": ndcg(grown, queries, qrels),
                "p50_ms": latency_ms(grown, qtexts),
                **agreement(top100(grown, queries), reference),
            }
        )
        result["growth"] = {"rows": rows, "first_build_s": first_s, "add_s": add_s, "compact_s": compact_s}
        print(json.dumps(result["growth"], indent=2))

        # 3. Add throughput against a fresh build of the same documents.
        throughput = []
        rng = np.random.default_rng(0)
        for size in (10, 100, 1000):
            batch = renamed([documents[i] for i in rng.choice(len(documents), size, replace=False)], f"copy{size}")
            count = len(split_passages(batch, llm.tokenizer, config.capture.window, config.capture.overlap))
            start = time.perf_counter()
            whole.add(batch)
            added = time.perf_counter() - start
            start = time.perf_counter()
            Index.build(batch, work / f"fresh{size}", config, sae=sae, llm=llm)
            fresh = time.perf_counter() - start
            throughput.append(
                {
                    "documents": size,
                    "passages": count,
                    "add_s": added,
                    "add_passages_per_s": count / added,
                    "fresh_build_s": fresh,
                    "fresh_passages_per_s": count / fresh,
                }
            )
            print(throughput[-1])
        result["add_throughput"] = throughput

        # 4. Light retraining against training from scratch.
        if args.retrain:
            # The compacted index holds the collection's passages in their build order, so its capture is
            # the cached one: this measures training and re-encoding, not the LLM.
            grown.encoder.cache = ActivationCache(cache / "activations")
            before = ndcg(grown, queries, qrels)
            start = time.perf_counter()
            record = grown.retrain(from_current=True, epochs=1, progress=True)
            result["retrain"] = {
                "light_s": time.perf_counter() - start,
                "light_fvu": record["train"]["fvu"],
                "light_train_s": record["train"]["seconds"],
                "scratch_train_s": (sae.metadata.get("train") or {}).get("seconds"),
                "scratch_fvu": (sae.metadata.get("train") or {}).get("fvu"),
                "ndcg@10_before": before,
                "ndcg@10_after": ndcg(grown, queries, qrels),
                "comparison": record["comparison"],
            }
            print(json.dumps(result["retrain"], indent=2))
    except BuildOnly:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(command=command_line(), commit=git_commit(), machine=machine(), versions=library_versions())
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        write_json_atomic(out / f"build-{dataset.name}.json", result)
        print(json.dumps(result["build"], indent=2))
        return
    write_json_atomic(out / f"lifecycle-{dataset.name}{args.tag}.json", result)
    write_text_atomic(out / f"lifecycle-{dataset.name}{args.tag}.md", markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    b = result["build"]
    lines = [
        f"## lifecycle, {result['dataset']} ({result['documents']} documents, {result['passages']} passages)",
        "",
        f"Build with a reused SAE: {b['ragsae_reused_sae_s']:.1f} s ({b['passages_per_s']:.0f} passages/s); "
        f"MiniLM embedding the same passages: {b['minilm_embed_s']:.1f} s; ratio {b['ratio']:.2f}.",
        "",
        "| index | segments | nDCG@10 | p50 ms | same top-100 as one-go | max score diff |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["growth"]["rows"]:
        lines.append(
            f"| {r['index']} | {r['segments']} | {r['ndcg@10']:.4f} | {r['p50_ms']:.1f} | "
            f"{r['same_top100_share']:.3f} | {r['max_score_difference']:.2e} |"
        )
    g = result["growth"]
    lines += [
        "",
        f"10 adds: {sum(g['add_s']):.1f} s in all (median {statistics.median(g['add_s']):.1f} s); "
        f"compaction {g['compact_s']:.1f} s.",
        "",
        "| add batch (documents) | passages | add s | add passages/s | fresh build s | fresh passages/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["add_throughput"]:
        lines.append(
            f"| {r['documents']} | {r['passages']} | {r['add_s']:.1f} | {r['add_passages_per_s']:.0f} | "
            f"{r['fresh_build_s']:.1f} | {r['fresh_passages_per_s']:.0f} |"
        )
    t = result["drift_thresholds"]
    lines += (
        []
        if "drift" not in result
        else [
            "",
            f"Drift against the 80% index (thresholds: FVU ratio > {t['max_fvu_ratio']}, divergence ratio > "
            f"{t['max_divergence_ratio']}):",
            "",
            "| documents | passages | FVU | FVU ratio | L0 | divergence | divergence ratio | needs retrain |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    )
    for r in result.get("drift", []):
        ratio = "-" if r["divergence_ratio"] is None else f"{r['divergence_ratio']:.2f}"
        lines.append(
            f"| {r['documents']} | {r['passages']} | {r['fvu']:.3f} | {r['fvu_ratio']:.2f} | {r['mean_l0']:.1f} | "
            f"{r['divergence']:.4f} | {ratio} | {'yes' if r['needs_retrain'] else 'no'} |"
        )
    if "retrain" in result:
        r = result["retrain"]
        lines += [
            "",
            f"Light retraining (1 epoch from the current SAE): {r['light_s']:.0f} s in all, {r['light_train_s']:.0f} s "
            f"training, FVU {r['light_fvu']:.3f}; from scratch: {r['scratch_train_s']:.0f} s training, FVU "
            f"{r['scratch_fvu']:.3f}. nDCG@10 {r['ndcg@10_before']:.4f} -> {r['ndcg@10_after']:.4f}. Latents: "
            f"{r['comparison']['kept']} kept, {r['comparison']['split']} split, {r['comparison']['new']} new, "
            f"{r['comparison']['lost']} lost.",
        ]
    where = f"{result['machine']['cpu']}, {result['machine']['cpus']} cores"
    lines += ["", f"Command: `{result['command']}`; commit {result['commit']}; {where}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
