"""Command line: `ragsae {build,search,ask,info,verify,add,delete,compact,drift,retrain,export,train,demo,bench}`
(also `python -m ragsae`).

Each subcommand parses its arguments into the library's configs and calls one library function.
Options that set a config field take their help text, default and choices from the field itself
(`config.field_docs`), so the two cannot disagree. `-k` is always a number of hits; the SAE's k is
`--sae-k`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_MIN_RELATIVE_SUPPORT,
    SANITIZE_ENTITIES,
    SANITIZE_MODES,
    SEARCH_MODES,
    STORE_TEXTS,
    BuildConfig,
    CaptureConfig,
    LlmConfig,
    RayBuild,
    SaeConfig,
    SanitizeConfig,
    ScoringConfig,
    field_choices,
    field_docs,
    optional_int,
)
from .errors import ConfigError, RagsaeError

DEFAULT_DEMO_INDEX = Path("indexes") / "stdlib-docs"

CONFIG_OPTIONS: dict[type, dict[str, str]] = {
    LlmConfig: {"model": "--model", "gguf_file": "--gguf-file", "device": "--device", "dtype": "--dtype"},
    CaptureConfig: {"layer": "--layer", "window": "--window", "overlap": "--overlap", "batch_size": "--batch-size"},
    SaeConfig: {
        "architecture": "--architecture",
        "num_latents": "--num-latents",
        "k": "--sae-k",
        "epochs": "--epochs",
        "batch_size": "--sae-batch-size",
        "lr": "--lr",
        "ortho_coef": "--sae-ortho",
        "seed": "--seed",
    },
    ScoringConfig: {
        "pooling": "--pooling",
        "mode": "--mode",
        "max_latents": "--max-latents",
        "feedback_passages": "--feedback-passages",
    },
}
"""Config fields settable from the command line, with their flags."""

GROUP_TITLES = {LlmConfig: "LLM", CaptureConfig: "capture", SaeConfig: "sparse autoencoder", ScoringConfig: "scoring"}


def dest(cls: type, name: str) -> str:
    """argparse destination of a config field: unique across configs (SaeConfig.k and .batch_size clash)."""
    return f"{cls.__name__}.{name}"


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of `CONFIG_OPTIONS[cls]`: help from the field's docstring, default from the
    dataclass, choices from its `Literal` type."""
    group = parser.add_argument_group(GROUP_TITLES[cls])
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, flag in CONFIG_OPTIONS[cls].items():
        default = defaults[name]
        kwargs: dict[str, Any] = {"dest": dest(cls, name), "default": default, "metavar": name.upper()}
        choices = field_choices(cls, name)
        if choices is not None:
            kwargs.update(choices=choices, metavar=None)
        elif name == "max_latents":
            kwargs.update(type=optional_int, metavar="N|all")
        elif isinstance(default, bool):
            raise TypeError(f"{cls.__name__}.{name}: boolean fields need a flag action")
        elif isinstance(default, (int, float)):
            kwargs["type"] = type(default)
        help_text = field_docs(cls)[name].replace("%", "%%")
        group.add_argument(flag, help=f"{help_text} (default: {default})", **kwargs)


def add_build_args(parser: argparse.ArgumentParser) -> None:
    for cls in CONFIG_OPTIONS:
        add_config_args(parser, cls)


SANITIZE_OPTIONS = {
    "mode": "--sanitize",
    "store_text": "--store-text",
    "entities": "--sanitize-entities",
    "queries": "--no-sanitize-queries",
    "salt_env": "--salt-env",
}
"""SanitizeConfig fields settable from the command line (build, add), with their flags."""


def entity_list(text: str) -> tuple[str, ...]:
    """Entity types from a comma-separated list ('EMAIL,PHONE'); 'all' names every type."""
    if text.strip().lower() == "all":
        return SANITIZE_ENTITIES
    return tuple(name.strip().upper() for name in text.split(",") if name.strip())


def add_sanitize_args(parser: argparse.ArgumentParser, as_built: bool = False) -> None:
    """The sanitisation flags (`SanitizeConfig`, help from its field docstrings). With `as_built` (add),
    a flag left out means the index's own setting, and a flag given must agree with it."""
    group = parser.add_argument_group("sanitisation")
    docs, defaults = field_docs(SanitizeConfig), SanitizeConfig()

    def option(name: str, **kwargs: Any) -> None:
        default = getattr(defaults, name)
        shown = "as built" if as_built else ("all" if name == "entities" and default is None else default)
        help_text = docs[name].replace("%", "%%")
        group.add_argument(
            SANITIZE_OPTIONS[name],
            dest=dest(SanitizeConfig, name),
            default=None if as_built else default,
            help=f"{help_text} (default: {shown})",
            **kwargs,
        )

    option("mode", choices=SANITIZE_MODES)
    option("store_text", choices=STORE_TEXTS)
    option("entities", type=entity_list, metavar="TYPE,TYPE")
    group.add_argument(
        SANITIZE_OPTIONS["queries"],
        dest=dest(SanitizeConfig, "queries"),
        action="store_const",
        const=False,
        default=None if as_built else True,
        help="leave queries as they are: encode and log them without sanitising "
        f"(SanitizeConfig.queries=False; hash-mode placeholders then cannot match a query; default: "
        f"{'as built' if as_built else 'sanitise queries'})",
    )
    option("salt_env", metavar="VAR")


def sanitize_config(args: argparse.Namespace) -> SanitizeConfig:
    """The SanitizeConfig the sanitisation flags set (defaults where the subcommand has none of them)."""
    given = {name: getattr(args, dest(SanitizeConfig, name), None) for name in SANITIZE_OPTIONS}
    return SanitizeConfig(**{name: value for name, value in given.items() if value is not None})


def check_sanitize_args(args: argparse.Namespace, index: str) -> None:
    """ConfigError when a sanitisation flag of `add` disagrees with how the index was built: an index
    keeps one setting, so that every segment's text and placeholders were made the same way."""
    from .index import read_manifest

    built = BuildConfig.from_dict(read_manifest(index)["config"]).sanitize
    for name, flag in SANITIZE_OPTIONS.items():
        value = getattr(args, dest(SanitizeConfig, name), None)
        if value is None:
            continue
        if name == "store_text":
            same = dataclasses.replace(built, store_text=value).stored_text == built.stored_text
        elif name == "entities":
            same = set(value) == set(built.entities or SANITIZE_ENTITIES)
        else:
            same = value == getattr(built, name)
        if not same:
            current = getattr(built, name)
            shown = ",".join(current) if name == "entities" and current else current
            raise ConfigError(
                f"{flag}: {index} was built with {name}={shown!r}; an index keeps the sanitisation it was "
                "built with (build a new index to change it)"
            )


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """`cls` with the fields its options set; defaults where the subcommand has none of them."""
    return cls(
        **{name: getattr(args, dest(cls, name)) for name in CONFIG_OPTIONS[cls] if hasattr(args, dest(cls, name))}
    )


RAY_OPTIONS = {
    "address": "--ray-address",
    "workers": "--ray-workers",
    "cpus_per_worker": "--ray-cpus-per-worker",
    "sae_sample_tokens": "--sae-sample-tokens",
    "shard_passages": "--ray-shard-passages",
}
"""RayBuild fields settable from `ragsae build`, with their flags (they take effect with --ray)."""


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed build (pip install 'ragsae[ray]')")
    group.add_argument(
        "--ray",
        action="store_true",
        help="capture and encode shards of the corpus on Ray workers, each loading the LLM and SAE once "
        "(the SAE, unless --sae is given, is trained first on a sample of --sae-sample-tokens tokens)",
    )
    docs, defaults = field_docs(RayBuild), RayBuild()
    for name, flag in RAY_OPTIONS.items():
        default = getattr(defaults, name)
        group.add_argument(
            flag,
            dest=f"ray_{name}",
            type=str if name == "address" else int,
            default=default,
            metavar="ADDRESS" if name == "address" else "N",
            help=f"{docs[name]} (default: {'a local Ray' if default is None else default})".replace("%", "%%"),
        )


def ray_build(args: argparse.Namespace) -> RayBuild | None:
    """The RayBuild of `ragsae build`'s flags; None without --ray (a Ray flag alone is an error)."""
    given = {name: getattr(args, f"ray_{name}") for name in RAY_OPTIONS}
    if not args.ray:
        changed = [RAY_OPTIONS[name] for name, value in given.items() if value != getattr(RayBuild(), name)]
        if changed:
            raise ConfigError(f"{', '.join(changed)}: only with --ray")
        return None
    return RayBuild(**given)


def build_config(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(
        llm=config_from_args(LlmConfig, args),
        capture=config_from_args(CaptureConfig, args),
        sae=config_from_args(SaeConfig, args),
        scoring=config_from_args(ScoringConfig, args),
        sanitize=sanitize_config(args),
    )


def print_hits(hits: list[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=2, ensure_ascii=False))
        return
    for hit in hits:
        snippet = " ".join(hit.text.split())[:160]
        latents = ", ".join(f"#{j}:{w:.2f}" for j, w in hit.latents)
        print(f"{hit.rank:>3}. {hit.doc_id}  score={hit.score:.4f}  latents[{latents}]\n     {snippet}")


def cmd_build(args: argparse.Namespace) -> int:
    from .index import Index

    index = Index.build(
        args.corpus,
        args.output,
        build_config(args),
        sae=args.sae,
        skip_empty=args.skip_empty,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        progress=True,
        backend=args.backend,
        uri=args.uri,
        ray=ray_build(args),
    )
    print(json.dumps(index.info(), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .index.export import export_index

    summary = export_index(args.index, args.output, args.format, args.scale)
    print(json.dumps(summary))
    return 0


def index_and_text(args: argparse.Namespace, text_name: str) -> tuple[str | None, str]:
    """The index folder (None with --index: route among `args.indexes`) and the query or question, from
    the positional words of `search` and `ask`."""
    given = len(args.words)
    if args.indexes:
        if given != 1:
            raise ConfigError(
                f"{args.command}: with --index, give only the {text_name} (got {given} arguments; name every "
                "index folder with --index, or give one INDEX without --index)"
            )
        return None, args.words[0]
    if given != 2:
        raise ConfigError(f"{args.command}: give an index folder and a {text_name}, or --index (got {given} arguments)")
    return args.words[0], args.words[1]


def print_routing(routing: dict[str, float], relative: dict[str, float] | None = None) -> None:
    """Each index's routing score and, where there are backgrounds, its ratio to its background."""
    relative = relative or {}
    print(
        "routing: "
        + ", ".join(
            f"{name} {score:.4f}" + (f" ({relative[name]:.2f}x background)" if name in relative else "")
            for name, score in routing.items()
        )
    )


def cmd_search(args: argparse.Namespace) -> int:
    from .index import Index

    path, query = index_and_text(args, "query")
    if path is None:  # --index A --index B "query": routed among the indexes
        if args.profile:
            raise ConfigError("--profile: a profile belongs to one index; search it with `ragsae search INDEX QUERY`")
        return search_collections(args, query)
    index = Index.load(path, mode=args.mode, device=args.device)
    profile = None
    if args.profile:
        from .routing import Profile

        profile = Profile.load(args.profile, index)
    hits = index.search(query, args.k, per_doc=args.per_doc, profile=profile, weight=args.profile_weight)
    print_hits(hits, args.json)
    return 0


def search_collections(args: argparse.Namespace, query: str) -> int:
    """`ragsae search --index A --index B QUERY`: the routing scores, then the hits of the indexes chosen."""
    from .routing import Collections

    collections = Collections.load(args.indexes, mode=args.mode, device=args.device)
    routed = collections.search(query, args.k, args.route, args.top_n, args.threshold, per_doc=args.per_doc)
    if args.json:
        print(json.dumps(routed.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print_routing(routed.routing, routed.relative)
    if not routed.retrieved:
        print(f"no index reaches the threshold {args.threshold}: nothing retrieved")
    for hit in routed.hits:
        snippet = " ".join(hit.text.split())[:160]
        print(f"{hit.index}  {hit.rank:>3}. {hit.doc_id}  score={hit.score:.4f}\n     {snippet}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .generate import RAG
    from .index import Index
    from .routing import Collections

    path, question = index_and_text(args, "question")
    target: Index | Collections
    routing: dict[str, Any] = {}
    if path is None:  # --index A --index B "question": routed among the indexes
        target = Collections.load(args.indexes, mode=args.mode, device=args.device)
        routing = {"route": args.route, "route_n": args.top_n, "threshold": args.threshold}
    else:
        target = Index.load(path, mode=args.mode, device=args.device)
    rag = RAG(
        target,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        min_support=args.min_support,
        min_relative_support=args.min_relative_support,
        **routing,
    )
    answer = rag.ask(question)
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False))
        return 0
    if answer.routing is not None:
        print_routing(answer.routing)
        answer = dataclasses.replace(answer, routing=None)  # shown above, as `search` shows it, not twice
    print(f"Q: {answer.question}\nA: {answer.format()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .index import read_manifest, verify_index_folder

    manifest = read_manifest(args.index)
    try:
        verify_index_folder(args.index)
        manifest["verified"] = True
    except RagsaeError as error:
        manifest["verified"] = False
        manifest["verify_error"] = str(error)
    print(json.dumps(manifest, indent=2))
    return 0


def print_drift(report: dict[str, Any]) -> None:
    """One drift report, as a few lines on stderr-friendly terms."""
    ratio = report.get("fvu_ratio")
    divergence = report.get("divergence_ratio")
    print(
        f"drift ({report['operation']}, {report['passages']} passages vs {report['indexed_passages']} indexed): "
        f"FVU {report['fvu']:.3f}"
        + (f" ({ratio:.2f}x training)" if ratio is not None else "")
        + f", L0 {report['mean_l0']:.1f}, latent divergence {report['divergence']:.4f}"
        + (f" ({divergence:.2f}x a same-size sample)" if divergence is not None else "")
        + f", over-active latents {report['overactive_fraction']:.4f}"
    )
    if report["needs_retrain"]:
        print("needs retraining: " + "; ".join(report["reasons"]) + " (ragsae retrain INDEX)")


def cmd_add(args: argparse.Namespace) -> int:
    from .index import Index

    check_sanitize_args(args, args.index)
    index = Index.load(args.index, device=args.device)
    before = len(index)
    change = index.upsert if args.upsert else index.add
    report = change(args.corpus, skip_empty=args.skip_empty, progress=True)
    print(f"{args.index}: {len(index) - before:+d} passages, {len(index)} live in {len(index.segments)} segments")
    print_drift(report)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from .index import Index

    index = Index.load(args.index, device=args.device)
    deleted = index.delete(args.ids, missing_ok=args.missing_ok)
    print(
        f"{args.index}: deleted {deleted} passages; {len(index)} live ({len(index.passages) - len(index)} "
        "deleted rows until `ragsae compact`)"
    )
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from .index import Index

    index = Index.load(args.index, device=args.device)
    merged = index.compact()
    print(
        f"{args.index}: {merged['segments']} segments ({merged['rows']} rows, {merged['deleted']} deleted) "
        f"merged into 1 of {merged['after']['rows']} rows"
    )
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from .index import Index, read_index_folder

    if args.corpus:
        index = Index.load(args.index, device=args.device)
        report = index.drift(args.corpus, skip_empty=args.skip_empty, progress=True)
        print(json.dumps(report, indent=2) if args.json else "", end="\n" if args.json else "")
        if not args.json:
            print_drift(report)
        return 0
    history = read_index_folder(args.index).history
    if args.plot:
        from .index.drift import plot_history

        plot_history(history, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        print(json.dumps(history, indent=2))
    elif not history:
        print(f"{args.index}: no drift reports yet (one is made by every add)")
    for report in [] if args.json else history:
        print(f"{report['time']}  ", end="")
        print_drift(report)
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from .index import Index

    index = Index.load(args.index, device=args.device)
    record = index.retrain(from_current=not args.from_scratch, epochs=args.epochs, progress=True)
    print(json.dumps(record, indent=2))
    return 0


def open_index(args: argparse.Namespace) -> Any:
    from .index import Index

    return Index.load(args.index, device=getattr(args, "device", None))


def open_catalog(path: str) -> Any:
    from .index import Index

    return Index.latent_catalog(path)


def cmd_verify(args: argparse.Namespace) -> int:
    from .index import verify_index_folder

    summary = verify_index_folder(args.index)
    print(
        f"{args.index}: OK ({summary['passages']} passages of {summary['documents']} documents, "
        f"{summary['files_checked']} files checked against the manifest; LLM not loaded)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .capture import check_layer
    from .encode import CodeEncoder, fit_sae, passage_activations
    from .index.build import check_enough_tokens
    from .index.folder import occupied
    from .lm import load_llm
    from .lm.loading import check_declared_layer
    from .retrieval.scoring import CorpusStatistics
    from .storage import storage_precision
    from .text import load_documents, split_passages

    if occupied(args.output) and not args.overwrite:
        raise RagsaeError(f"{args.output}: already exists (pass --overwrite to replace it)")
    config = build_config(args)
    documents = load_documents(args.corpus, args.skip_empty)
    check_declared_layer(config.llm, config.capture.layer)
    llm = load_llm(config.llm, progress=True)
    check_layer(llm, config.capture.layer)
    passages = split_passages(documents, llm.tokenizer, config.capture.window, config.capture.overlap)
    check_enough_tokens(llm, passages, config)
    texts = [p.text for p in passages]
    acts = passage_activations(llm, texts, config.capture, progress=True)
    sae, report = fit_sae(llm, texts, acts, config.capture, config.sae, progress=True)
    # The statistics an index weights and prunes passages with, frozen with the SAE: indexes built with
    # it in one go or grown by adds then score alike (README, "Keeping an index up to date").
    pooled = CodeEncoder(llm, sae.to(llm.device).eval(), config.capture, config.scoring.pooling).pool_activations(acts)
    sae.metadata["reference"] = CorpusStatistics.of(storage_precision(pooled.codes), pooled.lengths).to_json()
    sae.save(args.output)
    print(json.dumps({**report.to_json(), "heldout": sae.metadata.get("fidelity")}, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_QUESTION, stdlib_documents
    from .generate import RAG
    from .index import Index

    path = Path(args.index)
    index = None
    if path.exists() and not args.rebuild:
        try:
            index = Index.load(path)
            print(f"Loaded {path} ({len(index)} passages)", file=sys.stderr)
        except RagsaeError as error:  # the demo's own index, e.g. from an older ragsae: rebuild it
            print(f"Rebuilding the demo index: {error}", file=sys.stderr)
    if index is None:
        documents = stdlib_documents()
        print(f"Building {path} from {len(documents)} Python standard-library docstrings...", file=sys.stderr)
        index = Index.build(documents, path, overwrite=True, progress=True)
    answer = RAG(index, k=args.k).ask(args.question or DEFAULT_QUESTION)
    print(f"Q: {answer.question}\nA: {answer.format()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, markdown_table, run_benchmark, sweep_stem

    bench = BenchConfig(
        dataset=args.dataset,
        split=args.split,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        baselines=tuple(b for b in args.baselines.split(",") if b),
        sae=args.sae,
        sweep=tuple(args.sweep or ()),
        build=build_config(args),
    )
    result = run_benchmark(bench, progress=True)
    print(markdown_table(result["rows"], result["collection"]))
    print(f"wrote {bench.output_dir}/{sweep_stem(result['collection'], bench.sweep)}.json, .md and plots")
    return 0


def add_hits_arg(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    parser.add_argument("-k", "--k", type=int, default=default, help=f"{what} (default: {default})")


def add_routing_args(parser: argparse.ArgumentParser, text_name: str) -> None:
    """`[INDEX] TEXT` and the routing options of `search` and `ask`: one index folder, or several with
    --index (`index_and_text` tells the two apart)."""
    from .routing import ROUTES

    parser.add_argument(
        "words",
        nargs="+",
        metavar=f"[INDEX] {text_name.upper()}",
        help=f"index folder and {text_name}; only the {text_name} with --index",
    )
    parser.add_argument(
        "--index",
        dest="indexes",
        action="append",
        metavar="INDEX",
        help="an index folder to route among; repeat it (the indexes must share the LLM and query capture)",
    )
    parser.add_argument(
        "--route",
        choices=ROUTES,
        default="best",
        help="with --index: the best index, the --top-n best, or all of "
        "those whose routing score reaches --threshold (default: best)",
    )
    parser.add_argument("--top-n", type=int, default=2, help="with --route top-n: how many indexes (default: 2)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="with --index: search no index whose routing score (signature match and best-passage support, "
        "0..1) is below this (default: 0, every index may be searched)",
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragsae",
        description="Retrieval-augmented generation over sparse autoencoder codes of an LLM's activations.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "build",
        help="build an index from a corpus (trains an SAE unless --sae is given)",
        description="Build an index: JSONL file, BEIR folder (corpus.jsonl) or folder of .txt/.md files.",
    )
    p.add_argument("corpus", help="JSONL file, BEIR folder or folder of text files")
    p.add_argument("-o", "--output", required=True, help="index folder to write (e.g. indexes/mycorpus)")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    p.add_argument("--cache-dir", help="cache captured activations here")
    p.add_argument(
        "--sae", help="reuse a trained SAE: its folder (from `ragsae train`) or an index folder (its current SAE)"
    )
    p.add_argument(
        "--backend",
        choices=("csr", "milvus"),
        default="csr",
        help="serve the index from its segments in memory (csr: exact CSR scoring and FAISS) or also from a "
        "Milvus collection kept in step with it (milvus; pip install 'ragsae[milvus]') (default: csr)",
    )
    p.add_argument(
        "--uri",
        help="with --backend milvus: a Milvus Lite file (path ending in .db) or a server (http://host:19530; "
        "credentials from $RAGSAE_MILVUS_TOKEN) (default: milvus.db inside the index folder)",
    )
    add_build_args(p)
    add_sanitize_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "search",
        help="top passages for a query, with contributing latents",
        usage="ragsae search [options] INDEX QUERY | ragsae search [options] --index INDEX [--index INDEX ...] QUERY",
        description="Search one index, or route the query among several (--index, repeated): it is captured once, "
        "scored against each index's latent signature, and searched in the indexes chosen by --route.",
    )
    add_routing_args(p, "query")
    p.add_argument("--profile", metavar="FILE", help="re-weight the query's latents by a user profile (Profile.save)")
    p.add_argument(
        "--profile-weight",
        type=float,
        default=1.0,
        help="how much the profile re-weights (0: plain search; default: 1)",
    )
    add_hits_arg(p, 10, "passages to return")
    p.add_argument("--mode", choices=SEARCH_MODES, help="override the index's scoring mode")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.add_argument("--json", action="store_true", help="print hits as JSON")
    p.add_argument(
        "--per-doc", action="store_true", help="one hit per document (its best passage) instead of per passage"
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "ask",
        help="answer a question from the index, citing passages as [1], [2]",
        usage="ragsae ask [options] INDEX QUESTION | ragsae ask [options] --index INDEX [--index INDEX ...] QUESTION",
        description="Answer from one index, or route the question among several (--index, repeated) and answer "
        "from the passages of the indexes chosen by --route; the answer's sources name their index.",
    )
    add_routing_args(p, "question")
    add_hits_arg(p, 3, "passages given to the LLM")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap in tokens (default: 96)")
    p.add_argument(
        "--min-support",
        type=float,
        default=0.0,
        help="say the passages do not answer when the best one's support is below this (RAG.min_support; "
        "0.22 separated answerable questions on the benchmark collections' default indexes; default: 0, off)",
    )
    p.add_argument(
        "--min-relative-support",
        type=float,
        default=DEFAULT_MIN_RELATIVE_SUPPORT,
        help="say the passages do not answer when the best one's support is below this many times the "
        "index's support for random-word questions (RAG.min_relative_support; "
        f"default: {DEFAULT_MIN_RELATIVE_SUPPORT}; 0: off)",
    )
    p.add_argument("--mode", choices=SEARCH_MODES, help="override the index's scoring mode")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.add_argument("--json", action="store_true", help="print the answer, its routing and its passages as JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("info", help="print an index's manifest and whether the index verifies")
    p.add_argument("index", help="index folder")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify",
        help="check an index folder completely without loading the LLM",
        description="Verify the manifest's checksum, every file's checksum, shapes, values and the SAE.",
    )
    p.add_argument("index", help="index folder")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "add",
        help="add documents to an index (encoded with its SAE into a new segment), with a drift report",
        description="Add the documents of CORPUS to INDEX without rebuilding it: they are encoded with the "
        "index's SAE into a new segment. Ids must be new unless --upsert. Prints how far the new passages "
        "drift from what the SAE was trained on.",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("corpus", help="JSONL file, BEIR folder or folder of text files")
    p.add_argument("--upsert", action="store_true", help="replace documents whose ids are already indexed")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    add_sanitize_args(p, as_built=True)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("delete", help="delete documents from an index by id")
    p.add_argument("index", help="index folder")
    p.add_argument("ids", nargs="+", metavar="ID", help="document ids")
    p.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the index")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("compact", help="merge an index's segments into one, dropping deleted passages")
    p.add_argument("index", help="index folder")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser(
        "drift",
        help="drift of documents against an index (without adding them), or the index's drift history",
        description="With CORPUS: how far its passages drift from the index's SAE and passages, nothing added. "
        "Without: the drift reports of every add so far (--plot draws them).",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("corpus", nargs="?", help="documents to check (JSONL file, BEIR folder or folder of text files)")
    p.add_argument("--plot", metavar="PNG", help="draw the drift history to this image")
    p.add_argument("--json", action="store_true", help="print reports as JSON")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser(
        "retrain",
        help="train a new SAE version on an index's passages, re-encode them and swap it in",
        description="Train a new SAE version on the live passages (by default continuing from the current SAE), "
        "re-encode every passage with it and swap it in atomically; the manifest keeps every version's lineage "
        "and a comparison of the two SAEs.",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("--from-scratch", action="store_true", help="train from a fresh initialisation")
    p.add_argument("--epochs", type=int, help="training epochs (default: the current SAE's)")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "export",
        help="write an index's stored latent weights for other engines (JSONL sparse vectors or CIFF)",
        description="Write the stored BM25 latent weights of every live passage, without loading the LLM: JSONL "
        '({"id", "doc_id", "vector": {"LATENT": weight}}, for rank_features or Qdrant sparse vectors) or CIFF '
        "(latents as terms, weights quantised to integer tf = max(1, round(weight * SCALE))).",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("--format", choices=("jsonl", "ciff"), default="jsonl", help="output format (default: jsonl)")
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.add_argument(
        "--scale", type=float, default=100.0, help="CIFF: term frequency per unit of stored weight (default: 100)"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "train",
        help="train an SAE on a corpus's passage activations and save it (for build --sae)",
        description="Train an SAE exactly as `ragsae build` would (same passages, prefix and capture) and save it.",
    )
    p.add_argument("corpus", help="JSONL file, BEIR folder or folder of text files")
    p.add_argument("-o", "--output", required=True, help="SAE folder to write")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SAE folder")
    add_config_args(p, LlmConfig)
    add_config_args(p, CaptureConfig)
    add_config_args(p, SaeConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="build an index of Python's stdlib docstrings and ask it a question")
    p.add_argument("--question", default=None, help="question to ask (default: how to read a CSV file)")
    p.add_argument("--index", default=str(DEFAULT_DEMO_INDEX), help=f"index folder (default: {DEFAULT_DEMO_INDEX})")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if the index exists")
    add_hits_arg(p, 3, "passages given to the LLM")
    p.set_defaults(func=cmd_demo)

    from .latents.cli import add_latent_parsers  # latents, atlas, explain

    add_latent_parsers(sub, open_index, open_catalog)

    from .service.cli import add_serve_parser  # needs FastAPI only when run

    add_serve_parser(sub)

    p = sub.add_parser(
        "bench",
        help="benchmark ragsae against BM25 and dense retrieval on a BEIR collection",
        description="Score ragsae (sparse, faiss, fused) and baselines on DATASET_DIR "
        "(corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv); write JSON, Markdown and plots.",
    )
    from .bench.runner import BenchConfig  # its field docstrings are these options' help

    bench_docs, bench = field_docs(BenchConfig), BenchConfig(dataset="")
    p.add_argument("dataset", help=bench_docs["dataset"])
    p.add_argument("--split", default=bench.split, help=f"{bench_docs['split']} (default: {bench.split})")
    for name in ("output_dir", "cache_dir"):
        default = getattr(bench, name)
        p.add_argument("--" + name.replace("_", "-"), default=default, help=f"{bench_docs[name]} (default: {default})")
    p.add_argument(
        "--baselines",
        default=",".join(bench.baselines),
        help=f"{bench_docs['baselines']}, comma-separated, '' for none (default: {','.join(bench.baselines)})",
    )
    p.add_argument("--sae", help=bench_docs["sae"])
    p.add_argument("--sweep", nargs="+", metavar="NAME=V1,V2", help=bench_docs["sweep"])
    add_build_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # what the LLM load is doing (it is the slow part of a command) is always shown
        loading = logging.getLogger("ragsae.lm.loading")
        if not loading.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            loading.addHandler(handler)
            loading.setLevel(logging.INFO)
            loading.propagate = False
    try:
        return args.func(args)
    except RagsaeError as error:
        if args.debug:
            traceback.print_exc()
        print(f"ragsae {args.command}: error: {error}", file=sys.stderr)
        return 2
