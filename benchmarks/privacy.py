"""What sanitisation costs and whether it leaks: nDCG@10 and build time with `redact` against `off` on
the shared collections, and a byte search for planted values in a sanitised index and its activation
cache.

python benchmarks/privacy.py [--datasets DIR ...] [--per-type 200] [--cache-dir benchmarks/.cache]
    [--out benchmarks/results/privacy]

1. Cost: for each collection, the SAE the collection's benchmark trains and caches (`ragsae bench`,
   under --cache-dir) is reused frozen, and the index is built twice with it, sanitisation off and
   `redact` (queries sanitised too), timed end to end without an activation cache, the two builds
   taking turns; nDCG@10 over the judged queries (a document scores its best passage). The same SAE
   for both isolates what the changed text does; a user's `redact` build would also train its SAE on
   the redacted text.
2. Leak check: the labelled set of `benchmarks/sanitize.py` (`--per-type` values of every entity type
   planted in msmarco-5k passages, plus its near misses) is indexed with `redact` and an activation
   cache; every file of the index folder and of the cache is searched, as bytes, for every planted
   value (UTF-8 and UTF-16, as written and lower/upper case).

Writes OUT/privacy.json and OUT/privacy.md (default benchmarks/results/privacy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sanitize import DATASETS, labelled_set, scan_unmodified

from ragsae import BuildConfig, Index, load_llm
from ragsae.bench.beir import load_beir
from ragsae.bench.metrics import evaluate, to_document_run
from ragsae.bench.runner import cached_sae
from ragsae.capture import ActivationCache
from ragsae.config import SanitizeConfig
from ragsae.encode import passage_activations
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.storage import write_json_atomic, write_text_atomic
from ragsae.text import Document, Sanitizer, split_passages


def ndcg(index: Index, queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> float:
    qids = list(queries)
    scores, ids = index.retriever.search(index.encode_queries([queries[q] for q in qids]), 100)
    run = to_document_run(scores, ids, qids, [p.doc_id for p in index.passages])
    return float(evaluate(run, qrels)["aggregate"]["nDCG@10"])


def cost(dataset: Path, config: BuildConfig, llm: Any, cache: Path, work: Path, rounds: int) -> dict[str, Any]:
    """nDCG@10 and build seconds with sanitisation off and `redact`, one SAE."""
    documents, queries, qrels = load_beir(dataset)
    passages = split_passages(documents, llm.tokenizer, config.capture.window, config.capture.overlap)
    texts = [p.text for p in passages]
    acts = passage_activations(llm, texts, config.capture, ActivationCache(cache / "activations"), progress=True)
    sae = cached_sae(llm, texts, acts, config.capture, config.sae, cache, True)
    del acts
    configs = {"off": config, "redact": dataclasses.replace(config, sanitize=SanitizeConfig(mode="redact"))}
    seconds: dict[str, list[float]] = {mode: [] for mode in configs}
    result: dict[str, Any] = {"documents": len(documents), "queries": len(queries)}
    for round_ in range(rounds):
        for mode, build_config in configs.items():
            folder = work / f"{dataset.name}-{mode}"
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            index = Index.build(documents, folder, build_config, sae=sae, llm=llm, progress=True)
            seconds[mode].append(time.perf_counter() - start)
            if round_ == 0:
                audit = index.sanitize_info().get("audit") or {}
                result[mode] = {"ndcg@10": ndcg(index, queries, qrels), "passages": len(index), "audit": audit}
            print(f"{dataset.name} {mode}: {seconds[mode][-1]:.1f} s", file=sys.stderr)
    for mode in configs:
        result[mode]["build_s"] = min(seconds[mode])
        result[mode]["build_s_all"] = seconds[mode]
    result["ndcg_change"] = result["redact"]["ndcg@10"] - result["off"]["ndcg@10"]
    result["build_overhead"] = result["redact"]["build_s"] / result["off"]["build_s"] - 1
    return result


def forms(value: str) -> set[bytes]:
    variants = {value, value.lower(), value.upper()}
    return {v.encode("utf-8") for v in variants} | {v.encode("utf-16-le") for v in variants}


def leak_check(config: BuildConfig, llm: Any, sae: Any, per_type: int, seed: int, work: Path) -> dict[str, Any]:
    """Index the labelled set with `redact` and an activation cache; search every file for the values."""
    documents, _, _ = load_beir(DATASETS / "msmarco-5k")
    flagged = {e["doc_id"] for e in scan_unmodified(Sanitizer(SanitizeConfig(mode="redact")), documents)["examples"]}
    carriers = [d.text for d in documents if d.doc_id not in flagged and len(d.text) > 80]
    items = labelled_set(carriers, per_type, 0, seed)
    planted = [Document(f"planted-{i}", item.text) for i, item in enumerate(items)]
    folder, cache = work / "labelled-redact", work / "labelled-cache"
    redact = dataclasses.replace(config, sanitize=SanitizeConfig(mode="redact"))
    index = Index.build(planted, folder, redact, sae=sae, llm=llm, cache_dir=cache, progress=True)
    files = [p for root in (folder, cache) for p in sorted(root.rglob("*")) if p.is_file()]
    needles = [(item.label, item.value, forms(item.value)) for item in items]
    leaks = []
    scanned = 0
    for file in files:
        data = file.read_bytes()
        scanned += len(data)
        for label, value, variants in needles:
            if any(v in data for v in variants):
                leaks.append({"file": str(file.relative_to(work)), "entity": label, "value_length": len(value)})
    return {
        "planted": len(items),
        "entities": sorted({item.label for item in items}),
        "passages": len(index),
        "files": len(files),
        "cache_files": sum(1 for f in files if cache in f.parents),
        "bytes_scanned": scanned,
        "leaks": leaks,
        "audit": index.sanitize_info().get("audit"),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "## Sanitisation: cost and leak check",
        "",
        f"Command: `{result['command']}` at {result['git_commit']}; {result['machine']['cpu']}, "
        f"{result['machine']['cpus']} cores. One SAE per collection for both builds; best of "
        f"{result['rounds']} builds each, taking turns.",
        "",
        "| collection | nDCG@10 off | nDCG@10 redact | change | build s off | build s redact | overhead | replaced |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in result["cost"].items():
        replaced = ", ".join(f"{k} {v}" for k, v in (row["redact"]["audit"].get("counts") or {}).items()) or "none"
        lines.append(
            f"| {name} | {row['off']['ndcg@10']:.4f} | {row['redact']['ndcg@10']:.4f} | {row['ndcg_change']:+.4f} "
            f"| {row['off']['build_s']:.1f} | {row['redact']['build_s']:.1f} | {100 * row['build_overhead']:+.1f}% "
            f"| {replaced} |"
        )
    leak = result["leak_check"]
    lines += [
        "",
        f"Leak check: {leak['planted']} planted values ({len(leak['entities'])} types) in "
        f"{leak['passages']} passages, indexed with `redact` and an activation cache; "
        f"{leak['files']} files ({leak['cache_files']} in the cache, {leak['bytes_scanned'] / 1e6:.1f} MB) "
        f"searched: {len(leak['leaks'])} planted values found.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", type=Path, default=[DATASETS / "msmarco-5k", DATASETS / "cranfield"])
    parser.add_argument("--per-type", type=int, default=200, help="planted values per entity type (leak check)")
    parser.add_argument("--rounds", type=int, default=2, help="builds per setting (the fastest is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("benchmarks/.cache"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "privacy")
    args = parser.parse_args(argv)
    config = BuildConfig()
    llm = load_llm(config.llm, progress=True)
    work = Path(tempfile.mkdtemp(prefix="ragsae-privacy-"))
    try:
        costs = {path.name: cost(path, config, llm, args.cache_dir, work, args.rounds) for path in args.datasets}
        leak_sae = Index.current_sae_folder(work / f"{args.datasets[0].name}-off")
        from ragsae.sae import load_sae

        leaks = leak_check(config, llm, load_sae(leak_sae), args.per_type, args.seed, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": library_versions(),
        "load_average": os.getloadavg(),
        "rounds": args.rounds,
        "cost": costs,
        "leak_check": leaks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "privacy.json", result)
    write_text_atomic(args.out / "privacy.md", markdown(result))
    print(markdown(result))
    print(json.dumps({name: row["ndcg_change"] for name, row in costs.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
