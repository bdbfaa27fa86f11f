"""Service room: the index as an HTTP service (`ragsae serve`): /encode, /search, /ask, metrics and a
search page, with concurrent requests micro-batched through the LLM and SAE.

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client): `pip install 'ragsae[serve]'`. Importing
this package does not import them; `create_app` and the batcher load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import API_KEY_ENV, ServiceConfig

if TYPE_CHECKING:
    from .app import create_app
    from .batching import MicroBatcher

__all__ = ["API_KEY_ENV", "MicroBatcher", "ServiceConfig", "create_app"]

INSTALL_HINT = "the service needs FastAPI, uvicorn and prometheus-client: pip install 'ragsae[serve]'"


def __getattr__(name: str) -> Any:
    if name not in ("create_app", "MicroBatcher"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import app, batching
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return app.create_app if name == "create_app" else batching.MicroBatcher
