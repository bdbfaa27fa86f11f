"""The service's settings, apart from the app so that the command line can read them without FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

API_KEY_ENV = "RAGSAE_API_KEY"
"""Environment variable read for the API key when `ragsae serve` is given none."""


@dataclass(frozen=True)
class ServiceConfig:
    """Limits, batching and access of the HTTP service."""

    max_batch: int = 32
    """Texts (or activation vectors) sent through the LLM and SAE as one micro-batch; 1 turns batching off."""
    max_wait_ms: float = 2.0
    """Milliseconds a request waits for others to share its micro-batch."""
    max_queue: int = 256
    """Requests waiting for the LLM at most (per queue: encode/search, ask); beyond it a request gets 503."""
    max_text_chars: int = 10_000
    """Longest query, question or text to encode, in characters."""
    max_texts: int = 64
    """Most texts in one /encode request."""
    max_vectors: int = 256
    """Most activation vectors in one /encode request."""
    max_k: int = 100
    """Largest k of /search."""
    max_ask_k: int = 9
    """Largest k of /ask (passages in the prompt; the answer's lead cites one of 1..9)."""
    max_documents: int = 64
    """Most documents in one POST /documents request."""
    max_document_chars: int = 1_000_000
    """Longest document of POST /documents, in characters (it is split into passages)."""
    read_only: bool = False
    """Refuse POST and DELETE /documents (403): the index is only searched."""
    max_body_bytes: int = 8 * 2**20
    """Largest request body in bytes; larger ones get 413."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token asked of every request but the page, /healthz and the schema; None: no authentication."""
    monitor_window: int = 4096
    """Tokens over which the sparsity monitor computes L0 and FVU."""
    monitor_interval_s: float = 1.0
    """At most one search batch per this many seconds also feeds the sparsity monitor (an extra forward pass)."""

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "max_text_chars",
            "max_texts",
            "max_vectors",
            "max_k",
            "max_ask_k",
            "max_documents",
            "max_document_chars",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServiceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"ServiceConfig.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.max_wait_ms >= 0 or not self.monitor_interval_s >= 0 or self.monitor_window < 1:
            raise ConfigError("ServiceConfig.max_wait_ms and monitor_interval_s must be >= 0, monitor_window >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("ServiceConfig.api_key must not be empty (None turns authentication off)")
