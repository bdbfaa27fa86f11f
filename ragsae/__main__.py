"""Command line: `ragsae {build,search,ask,info,train,demo,bench}` (also `python -m ragsae`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import (
    POOLINGS,
    SAE_ARCHITECTURES,
    SEARCH_MODES,
    BuildConfig,
    CaptureConfig,
    LlmConfig,
    SaeConfig,
    ScoringConfig,
    optional_int,
)

DEFAULT_DEMO_INDEX = Path("indexes") / "stdlib-docs"


def add_llm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LLM")
    group.add_argument("--model", help="Hugging Face id or local folder (default: bundled SmolLM2-135M-Instruct GGUF)")
    group.add_argument("--gguf-file", help="GGUF file inside --model's folder")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    group.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto)")


def add_build_args(parser: argparse.ArgumentParser) -> None:
    add_llm_args(parser)
    cap, sae, score = CaptureConfig(), SaeConfig(), ScoringConfig()
    group = parser.add_argument_group("capture")
    group.add_argument("--layer", type=int, default=cap.layer, help=f"residual stream layer (default: {cap.layer})")
    group.add_argument("--window", type=int, default=cap.window, help=f"tokens per passage (default: {cap.window})")
    group.add_argument(
        "--overlap", type=int, default=cap.overlap, help=f"tokens shared by passages (default: {cap.overlap})"
    )
    group.add_argument("--batch-size", type=int, default=cap.batch_size, help="passages per forward pass")
    group = parser.add_argument_group("sparse autoencoder")
    group.add_argument("--sae", help="reuse a trained SAE folder instead of training one on the corpus")
    group.add_argument("--architecture", choices=SAE_ARCHITECTURES, default=sae.architecture)
    group.add_argument(
        "--num-latents", type=int, default=sae.num_latents, help=f"dictionary size (default: {sae.num_latents})"
    )
    group.add_argument(
        "-k", "--sae-k", dest="sae_k", type=int, default=sae.k, help=f"active latents per token (default: {sae.k})"
    )
    group.add_argument("--epochs", type=int, default=sae.epochs, help=f"SAE training epochs (default: {sae.epochs})")
    group.add_argument("--seed", type=int, default=sae.seed)
    group = parser.add_argument_group("scoring")
    group.add_argument("--pooling", choices=POOLINGS, default=score.pooling, help=f"(default: {score.pooling})")
    group.add_argument("--mode", choices=SEARCH_MODES, default=score.mode, help=f"(default: {score.mode})")
    group.add_argument(
        "--max-latents",
        type=optional_int,
        default=score.max_latents,
        help=f"strongest latents kept per passage, or 'all' (default: {score.max_latents})",
    )
    group.add_argument(
        "--feedback-passages",
        type=int,
        default=score.feedback_passages,
        help=f"pseudo-relevance feedback passages, 0 for none (default: {score.feedback_passages})",
    )


def build_config(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(
        llm=LlmConfig(model=args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype),
        capture=CaptureConfig(layer=args.layer, window=args.window, overlap=args.overlap, batch_size=args.batch_size),
        sae=SaeConfig(
            architecture=args.architecture,
            num_latents=args.num_latents,
            k=args.sae_k,
            epochs=args.epochs,
            seed=args.seed,
        ),
        scoring=ScoringConfig(
            pooling=args.pooling,
            mode=args.mode,
            max_latents=args.max_latents,
            feedback_passages=args.feedback_passages,
        ),
    )


def print_hits(hits, as_json: bool) -> None:
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
    )
    print(json.dumps(index.info(), indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .index import Index

    index = Index.load(args.index, mode=args.mode, device=args.device)
    print_hits(index.search(args.query, args.top), args.json)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .generate import RAG
    from .index import Index

    index = Index.load(args.index, mode=args.mode, device=args.device)
    answer = RAG(index, k=args.top, max_new_tokens=args.max_new_tokens).ask(args.question)
    print(f"Q: {answer.question}\nA: {answer.format()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .index import Index

    print(json.dumps(Index.read_manifest(args.index), indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .capture import capture
    from .corpus import fingerprint, load_documents, split_passages
    from .llm import load_llm
    from .sae import train_sae

    config = build_config(args)
    llm = load_llm(config.llm, progress=True)
    passages = split_passages(
        load_documents(args.corpus, args.skip_empty), llm.tokenizer, config.capture.window, config.capture.overlap
    )
    texts = [p.text for p in passages]
    acts = capture(llm, texts, [config.capture.layer], config.capture.window, config.capture.batch_size, progress=True)[
        config.capture.layer
    ]
    sae, report = train_sae(acts.values, config.sae, llm.device, progress=True)
    sae.metadata.update(
        llm_id=llm.model_id,
        llm_hash=llm.model_hash,
        layer=config.capture.layer,
        train_fingerprint=fingerprint(texts),
        train_passages=len(texts),
    )
    sae.save(args.output)
    print(json.dumps(report.to_json(), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import stdlib_documents
    from .generate import RAG
    from .index import Index, IndexFolderError

    path = Path(args.index)
    index = None
    if path.exists() and not args.rebuild:
        try:
            index = Index.load(path)
            print(f"Loaded {path} ({len(index)} passages)", file=sys.stderr)
        except IndexFolderError as error:  # the demo's own index, e.g. from an older ragsae: rebuild it
            print(f"Rebuilding the demo index: {error}", file=sys.stderr)
    if index is None:
        documents = stdlib_documents()
        print(f"Building {path} from {len(documents)} Python standard-library docstrings...", file=sys.stderr)
        index = Index.build(documents, path, overwrite=True, progress=True)
    answer = RAG(index, k=args.top).ask(args.question)
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragsae",
        description="Retrieval-augmented generation over sparse autoencoder codes of an LLM's activations.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
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
    add_build_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("search", help="top passages for a query, with contributing latents")
    p.add_argument("index", help="index folder")
    p.add_argument("query")
    p.add_argument("-k", "--top", type=int, default=10, help="passages to return (default: 10)")
    p.add_argument("--mode", choices=SEARCH_MODES, help="override the index's scoring mode")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.add_argument("--json", action="store_true", help="print hits as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from the index, citing passages as [1], [2]")
    p.add_argument("index", help="index folder")
    p.add_argument("question")
    p.add_argument("-k", "--top", type=int, default=3, help="passages given to the LLM (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--mode", choices=SEARCH_MODES, help="override the index's scoring mode")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("info", help="print an index's manifest")
    p.add_argument("index", help="index folder")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train an SAE on a corpus's activations and save it")
    p.add_argument("corpus", help="JSONL file, BEIR folder or folder of text files")
    p.add_argument("-o", "--output", required=True, help="SAE folder to write")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    add_build_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="build an index of Python's stdlib docstrings and ask it a question")
    p.add_argument("--question", default=None, help="question to ask (default: how to read a CSV file)")
    p.add_argument("--index", default=str(DEFAULT_DEMO_INDEX), help=f"index folder (default: {DEFAULT_DEMO_INDEX})")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if the index exists")
    p.add_argument("-k", "--top", type=int, default=3, help="passages given to the LLM (default: 3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="benchmark ragsae against BM25 and dense retrieval on a BEIR collection",
        description="Score ragsae (sparse, faiss, fused) and baselines on DATASET_DIR "
        "(corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv); write JSON, Markdown and plots.",
    )
    p.add_argument("dataset", help="BEIR-layout folder")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument("--output-dir", default="benchmarks/results", help="where results go (default: benchmarks/results)")
    p.add_argument("--cache-dir", default="benchmarks/.cache", help="activation/SAE/embedding cache")
    p.add_argument("--baselines", default="bm25,dense", help="comma list of bm25,dense ('' for none)")
    p.add_argument(
        "--sweep",
        nargs="+",
        metavar="NAME=V1,V2",
        help="sweep settings, e.g. layer=4,8,12 k=16,32 latents=4096,8192 pooling=max,sum",
    )
    add_build_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "question", "") is None:
        from .demo import DEFAULT_QUESTION

        args.question = DEFAULT_QUESTION
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"ragsae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
