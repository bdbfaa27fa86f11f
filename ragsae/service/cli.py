"""`ragsae serve INDEX [INDEX ...]`: the index as an HTTP service (FastAPI app run by uvicorn); with several
indexes, /search and /ask route each query among them (`Collections`).

`add_serve_parser(subparsers)` adds the subcommand to a parser and `run_serve(args)` runs it; the
service's limits take their flags' help and defaults from `ServiceConfig`'s fields. Also runs alone:
`python -m ragsae.service.cli INDEX [--port 8000 ...]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ..config import DEFAULT_MIN_RELATIVE_SUPPORT, SEARCH_MODES, field_docs
from ..errors import ConfigError, RagsaeError
from .config import API_KEY_ENV, ServiceConfig

logger = logging.getLogger(__name__)

SERVICE_OPTIONS = {
    "max_batch": "--max-batch",
    "max_wait_ms": "--max-wait-ms",
    "max_queue": "--max-queue",
    "max_text_chars": "--max-text-chars",
    "max_texts": "--max-texts",
    "max_vectors": "--max-vectors",
    "max_k": "--max-k",
    "max_ask_k": "--max-ask-k",
    "max_documents": "--max-documents",
    "max_document_chars": "--max-document-chars",
    "max_body_bytes": "--max-body-bytes",
    "monitor_window": "--monitor-window",
    "monitor_interval_s": "--monitor-interval-s",
}
"""`ServiceConfig` fields settable from the command line (the API key has its own option)."""
SETTINGS_ENV = "RAGSAE_SERVE_SETTINGS"
"""How `run_serve` hands its settings to worker processes (`--workers` > 1)."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to `subparsers` (from `ArgumentParser.add_subparsers`); it sets `func`."""
    p = subparsers.add_parser(
        "serve",
        help="serve an index (or several, routed) over HTTP: /encode, /search, /ask, /metrics and a search page",
        description="Serve an index over HTTP (FastAPI + uvicorn; pip install 'ragsae[serve]'). Endpoints: "
        "POST /encode, /search, /ask; GET /healthz, /info, /metrics, /openapi.json; the search page at /. "
        "Given several indexes (built over one LLM and query capture; named by their folders), /search and "
        "/ask route each query among them (request fields route, top_n, threshold), while /encode and "
        "POST/DELETE /documents act on the first.",
    )
    p.add_argument(
        "indexes",
        nargs="+",
        metavar="INDEX",
        help="index folder; with several, queries are routed among them and /encode and /documents use the first",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes, each with its own copy of the index and LLM (default: 1; one process "
        "micro-batches concurrent requests, several share the CPU cores between them)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"bearer token every API request must carry (default: ${API_KEY_ENV} if set, else no authentication)",
    )
    p.add_argument(
        "--read-only",
        action="store_true",
        help="refuse POST and DELETE /documents: the index is searched and asked, never changed",
    )
    p.add_argument("--mode", choices=SEARCH_MODES, help="override the index's scoring mode")
    p.add_argument("--device", help="device for the LLM and SAE (default: as built)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each server process's LLM and SAE (default: torch's, the cores; with --workers, "
        "the cores shared among the workers)",
    )
    p.add_argument("-k", "--k", type=int, default=3, help="passages /ask gives the LLM unless asked (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap in tokens (default: 96)")
    p.add_argument(
        "--min-support",
        type=float,
        default=0.0,
        help="/ask says the passages do not answer below this support (RAG.min_support; default: 0, off)",
    )
    p.add_argument(
        "--min-relative-support",
        type=float,
        default=DEFAULT_MIN_RELATIVE_SUPPORT,
        help="/ask says the passages do not answer below this many times the index's support for random-word "
        f"questions (RAG.min_relative_support; default: {DEFAULT_MIN_RELATIVE_SUPPORT}; 0: off)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level",
    )
    group = p.add_argument_group("limits and batching")
    docs = field_docs(ServiceConfig)
    defaults = ServiceConfig()
    for name, flag in SERVICE_OPTIONS.items():
        default = getattr(defaults, name)
        group.add_argument(
            flag,
            dest=f"service_{name}",
            type=type(default),
            default=default,
            metavar=name.upper(),
            help=f"{docs[name].replace('%', '%%')} (default: {default})",
        )
    p.set_defaults(func=run_serve)
    return p


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a server process needs to build the app, as JSON-able values."""
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    service = {name: getattr(args, f"service_{name}") for name in SERVICE_OPTIONS}
    service["read_only"] = args.read_only
    ServiceConfig(**service, api_key=api_key)  # ConfigError now, before the index loads
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads
    if threads is None and args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    return {
        "indexes": [str(path) for path in args.indexes],
        "mode": args.mode,
        "device": args.device,
        "threads": threads,
        "rag": {
            "k": args.k,
            "max_new_tokens": args.max_new_tokens,
            "min_support": args.min_support,
            "min_relative_support": args.min_relative_support,
        },
        "service": {**service, "api_key": api_key},
    }


def build_app(settings: dict[str, Any]) -> Any:
    """Load the index (several: `Collections` over one LLM) and make the app, from `serve_settings`."""
    try:
        from .app import create_app
    except ImportError as error:
        raise ConfigError(f"ragsae serve needs the serve extra: pip install 'ragsae[serve]' ({error})") from error
    import torch

    from ..generate import RAG
    from ..index import Index
    from ..routing import Collections

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    paths, mode, device = settings["indexes"], settings["mode"], settings["device"]
    served: Index | Collections
    if len(paths) == 1:
        served = Index.load(paths[0], mode=mode, device=device)
    else:
        served = Collections.load(paths, mode=mode, device=device)
    return create_app(served, RAG(served, **settings["rag"]), ServiceConfig(**settings["service"]))


def app_from_environment() -> Any:
    """The app of one worker process (uvicorn's factory with `--workers` > 1), from the settings
    `run_serve` left in the environment."""
    return build_app(json.loads(os.environ[SETTINGS_ENV]))


def run_serve(args: argparse.Namespace) -> int:
    """Run the service until interrupted."""
    settings = serve_settings(args)
    try:
        import uvicorn
    except ImportError as error:
        raise ConfigError(f"ragsae serve needs the serve extra: pip install 'ragsae[serve]' ({error})") from error
    if args.host not in LOOPBACK and settings["service"]["api_key"] is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    run = {"host": args.host, "port": args.port, "log_level": args.log_level}
    if args.workers > 1:
        os.environ[SETTINGS_ENV] = json.dumps(settings)
        uvicorn.run("ragsae.service.cli:app_from_environment", factory=True, workers=args.workers, **run)
    else:
        uvicorn.run(build_app(settings), **run)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ragsae.service.cli INDEX [INDEX ...] [options]`: `ragsae serve` on its own."""
    parser = argparse.ArgumentParser(prog="ragsae", description="Serve a ragsae index over HTTP.")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except RagsaeError as error:
        print(f"ragsae serve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
