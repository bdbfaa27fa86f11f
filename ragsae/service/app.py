"""The HTTP service: a FastAPI app over an `Index` (and a `RAG` for /ask), with a search page.

`create_app(index, rag, config)` returns the ASGI app; `ragsae serve` (`service/cli.py`) runs it with
uvicorn. /encode and /search go through the micro-batcher (`batching.py`); /ask holds the batcher's
gate while the LLM answers. Every error a client can cause is a 4xx with a JSON body
`{"error": message, "field": name or null}`.

Given `Collections` instead of an index, /search and /ask route each query among its indexes (request
fields `route`, `top_n`, `threshold`; responses add `routing`, `retrieved` and each hit's `index`), and
/encode and /documents act on its first index: one SAE encodes, one folder takes changes, and the
responses name it.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and the request models are classes local to `create_app` (their limits come from the config).

import asyncio
import copy
import dataclasses
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._version import __version__
from ..config import SearchMode
from ..errors import ConfigError, IndexFolderError, RagsaeError
from ..generate import RAG, Answer
from ..index import Hit, Index
from ..routing import ROUTES, Collections, RoutedHit
from ..text import Document
from .batching import MicroBatcher, ServiceBusy, ServiceClosed, SparseCode
from .config import ServiceConfig
from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "search.html"
PUBLIC_PATHS = frozenset({"/", "/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
"""Paths served without the API key: the page (it holds no data), the health check and the schema."""


# --- response shapes (for the OpenAPI schema) ------------------------------------------------
class LatentContribution(BaseModel):
    latent: int
    contribution: float
    """What this latent added to the hit's sparse score."""
    label: str | None = None
    """A short label of the latent (its characteristic tokens), where the index has a latent catalog."""


class HitOut(BaseModel):
    rank: int
    score: float
    passage_id: str
    doc_id: str
    text: str
    latents: list[LatentContribution]
    """The latents that made the match, strongest first."""


class SearchResponse(BaseModel):
    query: str
    k: int
    mode: str
    per_doc: bool
    hits: list[HitOut]


class RoutedHitOut(HitOut):
    index: str
    """The name of the index the hit came from; its score and rank are that index's own."""


class RoutedSearchResponse(SearchResponse):
    mode: str | None  # type: ignore[assignment]
    """The mode asked for, else the indexes' own mode; null when their modes differ (each used its own)."""
    routing: dict[str, float]
    """Every index's routing score for the query (in [0, 1]: `routing_score`), by name."""
    relative: dict[str, float]
    """Each routing score divided by the index's background (`Collections.backgrounds`), which ranks them;
    empty without backgrounds."""
    chosen: list[str]
    """The indexes searched, best relative score first."""
    retrieved: bool
    """False when no index's routing score reached the threshold: nothing was searched, no hits."""
    hits: list[RoutedHitOut]  # type: ignore[assignment]
    """At most k hits of the indexes chosen: their rank-1 hits (best-routed index first), then rank 2, ..."""


class OfIndex(BaseModel):
    index: str
    """With several indexes: the one this acted on (the first)."""


class TokenCodeOut(BaseModel):
    start: int
    end: int
    """Character span of the token in the text."""
    text: str
    latents: list[int]
    values: list[float]


class CodeOut(BaseModel):
    latents: list[int]
    """Latent ids, strongest first."""
    values: list[float]
    tokens: int
    """Tokens pooled into this code (1 for an activation vector)."""
    token_codes: list[TokenCodeOut] | None = None
    text: str | None = None
    """With per-token codes: the text as encoded (sanitised where the index sanitises), which their spans index."""


class EncodeResponse(BaseModel):
    kind: str
    """'query' or 'document' (texts), or 'activations'."""
    layer: int
    num_latents: int
    pooling: str
    codes: list[CodeOut]


class AskResponse(BaseModel):
    question: str
    answer: str
    answered: bool
    citations: list[int]
    """1-based numbers of the hits the answer cites."""
    support: float | None
    relative_support: float | None
    """Support divided by the index's support for random-word questions; /ask abstains below the
    service's min_relative_support."""
    sources: list[HitOut]
    """The cited hits."""
    hits: list[HitOut]
    """Every passage given to the LLM."""


class RoutedAskResponse(AskResponse):
    routing: dict[str, float]
    """Every index's routing score for the question, by name."""
    retrieved: bool
    """False when no index's routing score reached the threshold: nothing retrieved, the answer says so."""
    sources: list[RoutedHitOut]  # type: ignore[assignment]
    hits: list[RoutedHitOut]  # type: ignore[assignment]


class RoutedEncodeResponse(EncodeResponse, OfIndex):
    pass


class DocumentsResponse(BaseModel):
    documents: int
    """Documents added (or replaced)."""
    passages: int
    """Live passages in the index after the change."""
    generation: int
    """The index's generation after the change (one per committed change)."""
    drift: dict[str, Any]
    """The drift report of the new passages (`Index.add`)."""


class DeleteResponse(BaseModel):
    doc_id: str
    deleted_passages: int
    passages: int
    generation: int


class RoutedDocumentsResponse(DocumentsResponse, OfIndex):
    pass


class RoutedDeleteResponse(DeleteResponse, OfIndex):
    pass


def hit_json(hit: Hit) -> dict[str, Any]:
    labels = hit.labels
    out = {
        "rank": hit.rank,
        "score": hit.score,
        "passage_id": hit.passage_id,
        "doc_id": hit.doc_id,
        "text": hit.text,
        "latents": [
            {"latent": j, "contribution": w, "label": labels[i] if i < len(labels) else None}
            for i, (j, w) in enumerate(hit.latents)
        ],
    }
    if isinstance(hit, RoutedHit):
        out["index"] = hit.index
    return out


def answer_json(answer: Answer) -> dict[str, Any]:
    out = {
        "question": answer.question,
        "answer": answer.text,
        "answered": answer.answered,
        "citations": answer.citations,
        "support": answer.support,
        "relative_support": answer.relative_support,
        "sources": [hit_json(h) for h in answer.sources()],
        "hits": [hit_json(h) for h in answer.hits],
    }
    if answer.routing is not None:  # the RAG routes (several indexes, or a retrieve-or-not threshold)
        out.update(routing=answer.routing, retrieved=answer.retrieved)
    return out


def code_json(code: SparseCode) -> dict[str, Any]:
    out: dict[str, Any] = {"latents": code.latents, "values": code.values, "tokens": code.tokens, "token_codes": None}
    if code.token_codes is not None and code.text is not None:
        text = code.text
        out["token_codes"] = [
            {"start": t.start, "end": t.end, "text": text[t.start : t.end], "latents": t.latents, "values": t.values}
            for t in code.token_codes
        ]
        out["text"] = text
    return out


def error_body(message: str, field_name: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": message, "field": field_name, **extra}


class InputError(Exception):
    """Bad input found after the request models' own validation (HTTP 422)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# --- the service object --------------------------------------------------------------------
class Service:
    """What the endpoints share: the index (with `collections`, their first), the RAG, the batcher and the
    metrics (whose sparsity monitor watches that index's SAE)."""

    def __init__(self, index: Index, rag: RAG, config: ServiceConfig, collections: Collections | None = None):
        self.index = index
        self.collections = collections
        self.rag = rag
        self.config = config
        self.metrics = ServiceMetrics(index.sae, config.monitor_window)
        self.batcher = MicroBatcher(
            index,
            self.metrics,
            config.max_batch,
            config.max_wait_ms,
            config.max_queue,
            config.monitor_interval_s,
            collections,
        )
        self._asks = 0
        self._asks_lock = threading.Lock()
        self.metrics.watch_queue("batch", self.batcher.depth)
        self.metrics.watch_queue("ask", lambda: self._asks)

    def change(self, documents: list[Document], upsert: bool) -> dict[str, Any]:
        """`Index.add` (or `upsert`) with the LLM and the index to itself (blocking): searches wait."""
        with self.batcher.gate:
            report = self.index.upsert(documents) if upsert else self.index.add(documents)
            return self._after_change({"documents": len(documents), "drift": report})

    def delete(self, doc_id: str) -> dict[str, Any]:
        """`Index.delete` of one document (blocking); 404 when it is not live."""
        with self.batcher.gate:
            if doc_id not in self.index.doc_rows:
                where = f" in index {self.first_name!r} (the first: the one this service changes)"
                raise HTTPException(404, f"no live document with id {doc_id!r}{where if self.routed else ''}")
            deleted = self.index.delete([doc_id])
            return self._after_change({"doc_id": doc_id, "deleted_passages": deleted})

    def _after_change(self, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "passages": len(self.index), "generation": self.index.generation}
        return {**body, "index": self.first_name} if self.routed else body

    @property
    def routed(self) -> bool:
        """Whether /search and /ask route among several indexes (the service was given `Collections`)."""
        return self.collections is not None

    @property
    def first_name(self) -> str:
        """The name of the index that /encode and /documents act on (with `Collections`: their first)."""
        return self.collections.names[0] if self.collections is not None else ""

    def check_writable(self) -> None:
        if self.config.read_only:
            raise HTTPException(403, "this service is read-only (ragsae serve --read-only)")
        if self.index.path is None:
            raise HTTPException(403, "this service's index has no folder to write changes to")

    def rag_for(
        self, k: int | None, route: str | None = None, route_n: int | None = None, threshold: float | None = None
    ) -> RAG:
        """The service's RAG, with `k` passages and the routing settings given (those not given: its own)."""
        asked = {"k": k, "route": route, "route_n": route_n, "threshold": threshold}
        changes = {name: value for name, value in asked.items() if value is not None}
        if all(getattr(self.rag, name) == value for name, value in changes.items()):
            return self.rag
        rag = copy.copy(self.rag)
        for name, value in changes.items():
            setattr(rag, name, value)
        return rag

    def check_ask_room(self) -> None:
        """ServiceBusy when `max_queue` questions already wait for or use the LLM."""
        if self._asks >= self.config.max_queue:
            raise ServiceBusy(f"{self._asks} questions are queued (the service's max_queue); retry later")

    @contextmanager
    def ask_slot(self) -> Iterator[None]:
        """Count an /ask waiting for or using the LLM; ServiceBusy beyond `max_queue`."""
        with self._asks_lock:
            self.check_ask_room()
            self._asks += 1
        try:
            yield
        finally:
            with self._asks_lock:
                self._asks -= 1

    def ask(self, rag: RAG, question: str) -> Answer:
        """`rag.ask(question)` with the LLM to itself (blocking)."""
        with self.batcher.gate:
            return rag.ask(question)

    async def ask_events(self, rag: RAG, question: str) -> AsyncIterator[str]:
        """Server-Sent Events of `rag.stream(question)`: 'token' events ({"text"}), then one 'answer'
        event (the /ask response), or an 'error' event ({"error"}). Generation runs in a thread that
        holds the gate, and stops when the client goes away."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancelled.set()

        def produce() -> None:
            try:
                with self.ask_slot(), self.batcher.gate:
                    if cancelled.is_set():
                        return
                    stream = rag.stream(question)
                    try:
                        for item in stream:
                            put(item)
                            if cancelled.is_set():
                                break
                    finally:
                        stream.close()  # stops generation if the client left
                put(done)
            except BaseException as error:
                put(error)

        threading.Thread(target=produce, name="ragsae-ask-stream", daemon=True).start()
        try:
            while True:
                item = await items.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    if not isinstance(item, (RagsaeError, ServiceBusy)):
                        logger.error("streamed answer failed", exc_info=item)
                    yield sse(
                        "error",
                        error_body(str(item) if isinstance(item, (RagsaeError, ServiceBusy)) else "internal error"),
                    )
                    return
                if isinstance(item, Answer):
                    yield sse("answer", answer_json(item))
                else:
                    yield sse("token", {"text": item})
        finally:
            cancelled.set()


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


# --- middleware ----------------------------------------------------------------------------
async def send_error(scope: Scope, receive: Receive, send: Send, status: int, message: str, **headers: str) -> None:
    await JSONResponse(error_body(message), status_code=status, headers=headers or None)(scope, receive, send)


class RequestGuard:
    """Authentication (bearer token, constant-time comparison), JSON content type and body size, checked
    before a request reaches FastAPI."""

    def __init__(self, app: ASGIApp, config: ServiceConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = self.config.api_key
        if key is not None and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                await send_error(
                    scope,
                    receive,
                    send,
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    **{"WWW-Authenticate": "Bearer"},
                )
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            shown = content_type or "none"
            await send_error(
                scope, receive, send, 415, f"send a JSON body with Content-Type: application/json (got {shown})"
            )
            return
        limit = self.config.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await send_error(
                scope, receive, send, 413, f"request body of {declared} bytes is over the limit of {limit}"
            )
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_error(scope, receive, send, 413, f"request body is over the limit of {limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Counts every response by endpoint (the route's path template), method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Callable[[], list[Any]]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def endpoint(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return getattr(route, "path", "unmatched")
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = anyio.current_time()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(self.endpoint(scope), scope["method"], status, anyio.current_time() - start)


# --- the app -------------------------------------------------------------------------------
def _non_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain a non-whitespace character")
    return text


def _route(name: str) -> str:
    if name not in ROUTES:
        raise ValueError(f"must be one of {', '.join(ROUTES)}")
    return name


def create_app(index: Index | Collections, rag: RAG | None = None, config: ServiceConfig | None = None) -> FastAPI:
    """The service over `index`: /encode, /search, /ask, /healthz, /info, /metrics, the search page at /
    and the OpenAPI schema at /openapi.json. `rag` answers /ask (default: `RAG(index)`).

    Given `Collections`, /search and /ask route each query among its indexes (`rag` must then be a RAG over
    those collections, whose route, route_n and threshold are the requests' defaults), and /encode,
    POST /documents and DELETE /documents act on the first index."""
    settings = config or ServiceConfig()
    collections = index if isinstance(index, Collections) else None
    service_rag = rag or RAG(index)
    if collections is not None:
        if service_rag.collections is not collections:  # else /ask would not route as /search does
            raise ConfigError("create_app: with Collections, rag must be a RAG over them (RAG(collections, ...))")
        index = collections.indexes[0]
    assert isinstance(index, Index)  # one index, or the first of the collections
    service = Service(index, service_rag, settings, collections)
    d_model, layer = index.sae.d_model, index.config.capture.layer
    page = PAGE.read_text(encoding="utf-8")

    Text = Annotated[
        str, Field(strict=True, min_length=1, max_length=settings.max_text_chars), AfterValidator(_non_blank)
    ]
    Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]

    def _width(vector: list[float]) -> list[float]:
        if len(vector) != d_model:
            raise ValueError(f"expected {d_model} values (the SAE's d_model, layer {layer}), got {len(vector)}")
        return vector

    Vector = Annotated[list[Number], AfterValidator(_width)]

    class EncodeRequest(BaseModel):
        """Texts, or raw activation vectors of the index's layer, to encode into SAE codes."""

        model_config = ConfigDict(extra="forbid")
        texts: list[Text] | None = Field(None, min_length=1, max_length=settings.max_texts)
        activations: list[Vector] | None = Field(None, min_length=1, max_length=settings.max_vectors)
        kind: Literal["query", "document"] = "query"
        """How texts are read: as queries (prefix "Question: ", stopwords left out) or as passages."""
        per_token: bool = Field(False, strict=True)
        """Also return each token's code with its character span."""

        @model_validator(mode="after")
        def one_input(self) -> "EncodeRequest":
            if (self.texts is None) == (self.activations is None):
                raise ValueError("give either 'texts' or 'activations'")
            return self

    class SearchRequest(BaseModel):
        """A query to search the index with."""

        model_config = ConfigDict(extra="forbid")
        query: Text
        k: int = Field(10, strict=True, ge=1, le=settings.max_k)
        mode: SearchMode | None = None
        """'sparse', 'faiss' or 'fused'; default: the index's."""
        per_doc: bool = Field(False, strict=True)
        """One hit per document (its best passage)."""

    Route = Annotated[str, Field(strict=True, json_schema_extra={"enum": list(ROUTES)}), AfterValidator(_route)]

    class RouteFields(BaseModel):
        """Which of the service's indexes a query is searched in (`Collections.search`); the defaults are the
        service's RAG's."""

        route: Route = service_rag.route
        """'best': the best-matching index; 'top-n': the `top_n` best; 'all': every index (each only if its
        routing score reaches `threshold`)."""
        top_n: int = Field(service_rag.route_n, strict=True, ge=1)
        """Indexes searched with route 'top-n'."""
        threshold: Number = service_rag.threshold
        """Search no index whose routing score (in [0, 1]: `routing_score`) is below this; none reaching it: no hits."""

    class RoutedSearchRequest(SearchRequest, RouteFields):
        """A query to route among the service's indexes and search in those chosen."""

    class AskRequest(BaseModel):
        """A question to answer from the index."""

        model_config = ConfigDict(extra="forbid")
        question: Text
        k: int | None = Field(None, strict=True, ge=1, le=settings.max_ask_k)
        """Passages given to the LLM; default: the service's."""
        stream: bool = Field(False, strict=True)
        """Send the answer token by token as Server-Sent Events."""

    class RoutedAskRequest(AskRequest, RouteFields):
        """A question to route among the service's indexes and answer from the passages of those chosen."""

    DocumentText = Annotated[
        str, Field(strict=True, min_length=1, max_length=settings.max_document_chars), AfterValidator(_non_blank)
    ]

    class DocumentIn(BaseModel):
        """One document to index: split into passages and encoded with the index's SAE."""

        model_config = ConfigDict(extra="forbid")
        id: str = Field(strict=True, min_length=1, max_length=1000)
        text: DocumentText
        title: str = Field("", strict=True, max_length=settings.max_text_chars)

    class DocumentsRequest(BaseModel):
        """Documents to add to the index (new ids), or with `upsert` to add or replace by id."""

        model_config = ConfigDict(extra="forbid")
        documents: list[DocumentIn] = Field(min_length=1, max_length=settings.max_documents)
        upsert: bool = Field(False, strict=True)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.batcher.close()

    app = FastAPI(
        title="ragsae",
        version=__version__,
        description="Sparse SAE codes of an LLM's activations: encode, search, ask.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(RequestGuard, config=settings)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics, routes=lambda: app.router.routes)

    # --- errors ---------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "cannot be parsed")
            at = first["loc"][-1] if len(first["loc"]) > 1 else "?"
            return JSONResponse(error_body(f"malformed JSON: {reason} at character {at}"), status_code=400)
        loc = [str(part) for part in first["loc"] if part != "body"]
        name = ".".join(loc) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            message = "unknown field (check the schema at /openapi.json)"
        if "input" in first and first.get("type") not in ("missing",) and _short(first["input"]):
            message += f" (got {json.dumps(first['input'])})"
        details = [
            {
                "field": ".".join(str(p) for p in e["loc"] if p != "body"),
                "message": e["msg"].removeprefix("Value error, "),
            }
            for e in errors
        ]
        return JSONResponse(
            error_body(f"{name or 'request body'}: {message}", name, details=details[:20]), status_code=422
        )

    @app.exception_handler(InputError)
    async def bad_input(_request: Request, error: InputError) -> JSONResponse:
        return JSONResponse(error_body(str(error), error.field), status_code=422)

    @app.exception_handler(IndexFolderError)
    async def folder_conflict(_request: Request, error: IndexFolderError) -> JSONResponse:
        return JSONResponse(error_body(str(error)), status_code=409)

    @app.exception_handler(RagsaeError)
    async def user_error(_request: Request, error: RagsaeError) -> JSONResponse:
        return JSONResponse(error_body(str(error)), status_code=400)

    @app.exception_handler(ServiceBusy)
    async def busy(_request: Request, error: ServiceBusy) -> JSONResponse:
        return JSONResponse(error_body(str(error)), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ServiceClosed)
    async def closed(_request: Request, error: ServiceClosed) -> JSONResponse:
        return JSONResponse(error_body(str(error)), status_code=503)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, error: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=error)
        return JSONResponse(error_body(f"internal error ({type(error).__name__}); see the server log"), status_code=500)

    # --- endpoints ------------------------------------------------------------------------
    # The POST endpoints return their JSON as a JSONResponse: `response_model` documents the shape in
    # the schema, and FastAPI's re-validation and encoding of every hit is skipped (event-loop time that
    # would otherwise slow the loop which feeds the micro-batcher).
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self' 'unsafe-inline'"})

    served = collections.indexes if collections is not None else [index]

    def on_first_index(endpoint: Any) -> Any:
        """With several indexes, say in the endpoint's description (the schema's) that it acts on the first."""
        if collections is not None:
            endpoint.__doc__ = (endpoint.__doc__ or "") + (
                f"\n\nThis service has several indexes: this acts on the first, {collections.names[0]!r} "
                "(the response's `index`)."
            )
        return endpoint

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Whether the service can answer: 200 when its worker runs, else 503."""
        ok = service.batcher.alive
        passages = sum(len(served_index) for served_index in served)
        body = {"status": "ok" if ok else "down", "passages": passages, "queued": service.batcher.depth()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """The index's summary (`Index.info`) and the service's settings; with several indexes, each one's
        summary by name and the default routing."""
        limits = {k: v for k, v in dataclasses.asdict(settings).items() if k != "api_key"}
        about = {"service": {"version": __version__, "auth": settings.api_key is not None, **limits}}
        if collections is None:
            return {**index.info(), **about}
        routing = {"route": service_rag.route, "top_n": service_rag.route_n, "threshold": service_rag.threshold}
        return {"indexes": {name: each.info() for name, each in collections}, "routing": routing, **about}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: requests and latency per endpoint, queue depth, batch sizes, sparsity."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/encode", response_model=RoutedEncodeResponse if collections is not None else EncodeResponse)
    @on_first_index
    async def encode(body: EncodeRequest) -> JSONResponse:
        """SAE codes of texts (pooled over their tokens; per token on request) or of activation vectors."""
        info = {"layer": layer, "num_latents": index.sae.num_latents, "pooling": index.encoder.pooling}
        if collections is not None:
            info["index"] = service.first_name
        if body.activations is not None:
            vectors = np.asarray(body.activations, dtype=np.float64)
            beyond = (np.abs(vectors) > np.finfo(np.float32).max).any(axis=1)
            if beyond.any():
                raise InputError(f"activations.{int(np.argmax(beyond))}", "values beyond float32's range")
            codes = await asyncio.wrap_future(service.batcher.encode_vectors(vectors.astype(np.float32)))
            return JSONResponse({"kind": "activations", **info, "codes": [code_json(c) for c in codes]})
        texts = body.texts or []
        codes = await asyncio.wrap_future(service.batcher.encode(texts, body.kind, body.per_token))
        return JSONResponse({"kind": body.kind, **info, "codes": [code_json(c) for c in codes]})

    async def answer(rag: RAG, question: str, stream: bool) -> Response:
        """/ask's response: the answer as JSON, or streamed as Server-Sent Events."""
        if stream:
            service.check_ask_room()  # a full queue is a 503, not an error event in a 200 stream
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(service.ask_events(rag, question), media_type="text/event-stream", headers=headers)
        with service.ask_slot():
            answered = await anyio.to_thread.run_sync(service.ask, rag, question)
        return JSONResponse(answer_json(answered))

    if collections is None:

        @app.post("/search", response_model=SearchResponse)
        async def search(body: SearchRequest) -> JSONResponse:
            """Top-k passages for a query, each with the latents that made it match."""
            hits = await asyncio.wrap_future(service.batcher.search(body.query, body.k, body.mode, body.per_doc))
            mode = body.mode or index.config.scoring.mode
            return JSONResponse(
                {
                    "query": body.query,
                    "k": body.k,
                    "mode": mode,
                    "per_doc": body.per_doc,
                    "hits": [hit_json(h) for h in hits],
                }
            )

        @app.post("/ask", response_model=AskResponse, responses={200: {"content": {"text/event-stream": {}}}})
        async def ask(body: AskRequest) -> Response:
            """A cited answer from the top passages; with `stream`, Server-Sent Events: 'token' events
            ({"text"}) as the answer is generated, then one 'answer' event (this endpoint's JSON)."""
            return await answer(service.rag_for(body.k), body.question, body.stream)

    else:
        modes = {each.config.scoring.mode for each in collections.indexes}
        shared_mode = modes.pop() if len(modes) == 1 else None

        @app.post("/search", response_model=RoutedSearchResponse)
        async def routed_search(body: RoutedSearchRequest) -> JSONResponse:
            """Route a query among the indexes by their latent signatures, then the top-k passages of those
            chosen, each tagged with its index and the latents that made it match; concurrent requests with
            the same settings share one LLM pass."""
            future = service.batcher.routed_search(
                body.query, body.k, body.route, body.top_n, body.threshold, body.mode, body.per_doc
            )
            routed = await asyncio.wrap_future(future)
            return JSONResponse(
                {
                    "query": body.query,
                    "k": body.k,
                    "mode": body.mode or shared_mode,
                    "per_doc": body.per_doc,
                    "routing": routed.routing,
                    "relative": routed.relative,
                    "chosen": routed.chosen,
                    "retrieved": routed.retrieved,
                    "hits": [hit_json(h) for h in routed.hits],
                }
            )

        @app.post("/ask", response_model=RoutedAskResponse, responses={200: {"content": {"text/event-stream": {}}}})
        async def routed_ask(body: RoutedAskRequest) -> Response:
            """Route a question among the indexes, then a cited answer from the top passages of those chosen
            (each source names its index); none chosen: the answer says no index covers the question. With
            `stream`, Server-Sent Events: 'token' events ({"text"}), then one 'answer' event (this JSON)."""
            rag_asked = service.rag_for(body.k, body.route, body.top_n, body.threshold)
            return await answer(rag_asked, body.question, body.stream)

    @app.post("/documents", response_model=RoutedDocumentsResponse if collections is not None else DocumentsResponse)
    @on_first_index
    async def add_documents(body: DocumentsRequest) -> JSONResponse:
        """Add documents to the index (`Index.add`; with `upsert`, `Index.upsert`), committed to its folder
        before the response. Searches wait while the new passages are encoded."""
        service.check_writable()
        seen: set[str] = set()
        for i, doc in enumerate(body.documents):
            if doc.id in seen:
                raise InputError(f"documents.{i}.id", f"{doc.id!r} appears twice in this request")
            seen.add(doc.id)
        if not body.upsert:
            existing = [i for i, doc in enumerate(body.documents) if doc.id in index.doc_rows]
            if existing:
                doc_id = body.documents[existing[0]].id
                return JSONResponse(
                    error_body(
                        f'document id {doc_id!r} is already in the index; send "upsert": true to replace it',
                        f"documents.{existing[0]}.id",
                    ),
                    status_code=409,
                )
        documents = [Document(doc.id, doc.text, doc.title) for doc in body.documents]
        changed = await anyio.to_thread.run_sync(service.change, documents, body.upsert)
        return JSONResponse(json.loads(json.dumps(changed, default=_plain)))

    @app.delete(
        "/documents/{doc_id:path}", response_model=RoutedDeleteResponse if collections is not None else DeleteResponse
    )
    @on_first_index
    async def delete_document(doc_id: str) -> JSONResponse:
        """Delete a document (all its passages) from the index, committed to its folder before the response."""
        service.check_writable()
        return JSONResponse(await anyio.to_thread.run_sync(service.delete, doc_id))

    return app


def _plain(value: Any) -> Any:
    """JSON for the numpy values in a drift report."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _short(value: Any) -> bool:
    """Whether a rejected input is small enough to quote back in an error message."""
    try:
        return len(json.dumps(value)) <= 80
    except (TypeError, ValueError):
        return False
