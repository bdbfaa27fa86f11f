"""The HTTP service over a real uvicorn server on a free loopback port: every endpoint, micro-batching
under concurrent requests, metrics, authentication and bad input."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_DOCS, msmarco_slice, tiny_config

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'ragsae[serve]'")
httpx = pytest.importorskip("httpx", reason="the service tests need httpx (test extra)")
uvicorn = pytest.importorskip("uvicorn", reason="the service needs the serve extra: pip install 'ragsae[serve]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ragsae.encode import passage_activations  # noqa: E402
from ragsae.errors import ConfigError, QueryError  # noqa: E402
from ragsae.generate import RAG, Answer  # noqa: E402
from ragsae.index import Hit, Index  # noqa: E402
from ragsae.service import ServiceConfig, create_app  # noqa: E402
from ragsae.service.batching import MicroBatcher, ServiceBusy  # noqa: E402

QUERIES = [
    "how do thermometers work",
    "definition of a sigmet",
    "causes of left ventricular hypertrophy",
    "cost of interior concrete flooring",
    "what is an axon terminal",
    "anthropological definition of environment",
    "declaratory judgment",
    "military suicide causes",
]
LIMITS = dict(max_text_chars=200, max_texts=4, max_vectors=4, max_k=20, max_ask_k=3, max_body_bytes=16384)
# The tiny model has random weights, so its support says nothing: /ask answers every question here.
ASK = dict(k=2, max_new_tokens=8, min_relative_support=0)


class LiveServer:
    """A uvicorn server for `app` in a thread, on a loopback port the OS chose."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def build_index(folder: Path, tiny_llm_dir: Path, tiny_llm) -> Index:
    """An index of a msmarco-5k slice by the tiny Llama, saved in `folder`/index."""
    collection = msmarco_slice(folder / "collection", 3, 30, 12)
    return Index.build(collection, folder / "index", tiny_config(tiny_llm_dir), llm=tiny_llm)


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_llm_dir, tiny_llm) -> Index:
    return build_index(tmp_path_factory.mktemp("service"), tiny_llm_dir, tiny_llm)


@pytest.fixture(scope="module")
def live(index) -> Iterator[LiveServer]:
    # A long batching window, so that requests sent together are computed together.
    config = ServiceConfig(max_batch=16, max_wait_ms=40, **LIMITS)
    server = LiveServer(create_app(index, RAG(index, **ASK), config))
    yield server
    server.close()


@pytest.fixture
def client(live) -> Iterator[httpx.Client]:
    with live.client() as c:
        yield c


def hit_tuple(hit: Hit | dict) -> tuple:
    if isinstance(hit, Hit):
        return hit.rank, hit.passage_id, hit.doc_id, hit.text, hit.score, dict(hit.latents)
    return (
        hit["rank"],
        hit["passage_id"],
        hit["doc_id"],
        hit["text"],
        hit["score"],
        {item["latent"]: item["contribution"] for item in hit["latents"]},
    )


def assert_same_hits(served: list[dict], expected: list[Hit]) -> None:
    """Same passages in the same order; scores and latent contributions equal up to float rounding (a
    batch's padding and width change the last bits of the LLM's activations)."""
    assert len(served) == len(expected)
    for got, want in zip(map(hit_tuple, served), map(hit_tuple, expected)):
        assert got[:4] == want[:4]
        assert got[4] == pytest.approx(want[4], rel=1e-4, abs=1e-5)
        shared = set(got[5]) & set(want[5])
        assert len(shared) >= len(want[5]) - 1  # a near-tie at the cut may swap one latent
        for latent in shared:
            assert got[5][latent] == pytest.approx(want[5][latent], rel=1e-3, abs=1e-5)


def metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


# --- search --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sparse", "faiss", "fused"])
def test_search_over_http_returns_what_index_search_returns(client, index, mode):
    for query, k, per_doc in [(QUERIES[0], 5, False), (QUERIES[1], 3, True), (QUERIES[2], 20, False)]:
        response = client.post("/search", json={"query": query, "k": k, "mode": mode, "per_doc": per_doc})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["query"], body["k"], body["mode"], body["per_doc"]) == (query, k, mode, per_doc)
        assert_same_hits(body["hits"], index.search(query, k, mode, per_doc))
        assert all(hit["latents"] for hit in body["hits"])


def test_hits_carry_the_labels_of_their_latents(client, index):
    body = client.post("/search", json={"query": QUERIES[0], "k": 3}).json()
    for served, hit in zip(body["hits"], index.search(QUERIES[0], 3)):
        labels = dict(zip([j for j, _ in hit.latents], hit.labels))
        for item in served["latents"]:
            if item["latent"] in labels:
                assert item["label"] == labels[item["latent"]]
    has_labels = any(item["label"] for hit in body["hits"] for item in hit["latents"])
    assert has_labels == (index.catalog is not None)


def test_a_sanitising_index_encodes_and_searches_the_sanitised_text(tmp_path, tiny_llm_dir, tiny_llm):
    from dataclasses import replace

    from ragsae.config import SanitizeConfig

    passage = "Write to jane.doe@example.com for help with csv files."
    docs = [*TOY_DOCS, {"_id": "mail", "title": "contact", "text": passage}]
    config = replace(tiny_config(tiny_llm_dir), sanitize=SanitizeConfig(mode="redact"))
    index = Index.build(docs, tmp_path / "idx", config, llm=tiny_llm)
    query = "mail jane.doe@example.com about csv files"
    server = LiveServer(create_app(index, RAG(index, **ASK)))
    try:
        with server.client() as c:
            code = c.post("/encode", json={"texts": [query], "per_token": True}).json()["codes"][0]
            assert_code_is_row(code, index.encode_queries([query]), 0)  # which sanitises the query first
            assert "<EMAIL>" in code["text"] and "jane" not in code["text"]
            assert all(code["text"][t["start"] : t["end"]] == t["text"] for t in code["token_codes"])
            document = c.post("/encode", json={"texts": [passage], "kind": "document", "per_token": True}).json()
            assert "jane" not in document["codes"][0]["text"]
            assert_code_is_row(
                document["codes"][0], index.encoder.encode_documents([document["codes"][0]["text"]]).codes, 0
            )
            response = c.post("/search", json={"query": query, "k": 3})
            assert_same_hits(response.json()["hits"], index.search(query, 3))
    finally:
        server.close()


def test_search_defaults_to_the_index_mode_and_ten_hits(client, index):
    body = client.post("/search", json={"query": QUERIES[3]}).json()
    assert body["mode"] == index.config.scoring.mode and body["k"] == 10
    assert_same_hits(body["hits"], index.search(QUERIES[3]))


def test_concurrent_searches_are_batched_and_each_gets_its_own_hits(live, index):
    jobs = [(q, k) for q in QUERIES for k in (3, 7)] * 2  # two k values: two groups per batch
    expected = {job: index.search(*job) for job in set(jobs)}
    with live.client() as c:
        before = metrics(c)
    start = threading.Barrier(len(jobs))

    def send(job):
        with live.client() as c:
            start.wait()
            return c.post("/search", json={"query": job[0], "k": job[1]})

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    for job, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert_same_hits(response.json()["hits"], expected[job])
    with live.client() as c:
        after = metrics(c)
    # At least one micro-batch served several requests: fewer batches than requests.
    batches = after[("ragsae_batch_requests_count", ())] - before.get(("ragsae_batch_requests_count", ()), 0)
    served = after[("ragsae_batch_requests_sum", ())] - before.get(("ragsae_batch_requests_sum", ()), 0)
    assert served == len(jobs) and batches < len(jobs)


def test_concurrent_encodes_each_get_their_own_codes(live, index):
    texts = [[q] for q in QUERIES] + [QUERIES[:3], QUERIES[3:5]]
    start = threading.Barrier(len(texts))

    def send(batch):
        with live.client() as c:
            start.wait()
            return c.post("/encode", json={"texts": batch})

    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(send, texts))
    for batch, response in zip(texts, responses):
        assert response.status_code == 200, response.text
        expected = index.encode_queries(batch)
        for row, code in enumerate(response.json()["codes"]):
            assert_code_is_row(code, expected, row)


# --- encode --------------------------------------------------------------------------------
def assert_code_is_row(code: dict, codes, row: int) -> None:
    lo, hi = codes.indptr[row], codes.indptr[row + 1]
    want = dict(zip(codes.indices[lo:hi].tolist(), codes.data[lo:hi].tolist()))
    got = dict(zip(code["latents"], code["values"]))
    assert set(got) == set(want)
    for latent, value in want.items():
        assert got[latent] == pytest.approx(value, rel=1e-4, abs=1e-5)
    assert code["values"] == sorted(code["values"], reverse=True)


def test_encode_texts_gives_the_encoders_pooled_codes_and_token_codes(client, index):
    texts = QUERIES[:3]
    body = client.post("/encode", json={"texts": texts, "per_token": True}).json()
    assert body["kind"] == "query" and body["num_latents"] == index.sae.num_latents
    assert body["layer"] == index.config.capture.layer and body["pooling"] == "sum"
    expected = index.encoder.encode_queries(texts)
    for row, (text, code) in enumerate(zip(texts, body["codes"])):
        assert_code_is_row(code, expected.codes, row)
        assert code["tokens"] == expected.lengths[row] == len(code["token_codes"])
        # Sum pooling: the token codes add up to the pooled code.
        summed: dict[int, float] = {}
        for token in code["token_codes"]:
            assert text[token["start"] : token["end"]] == token["text"] and token["text"].strip()
            assert len(token["latents"]) <= index.sae.config.k
            for latent, value in zip(token["latents"], token["values"]):
                summed[latent] = summed.get(latent, 0.0) + value
        assert set(summed) == set(code["latents"])
        for latent, value in zip(code["latents"], code["values"]):
            assert summed[latent] == pytest.approx(value, rel=1e-4)
        # Query stopwords feed the LLM but get no codes of their own.
        assert "how" not in [t["text"].lower() for t in code["token_codes"]]


def test_encode_documents_gives_the_passage_codes_and_spans(client, index):
    passage = index.passages[0].text
    body = client.post("/encode", json={"texts": [passage], "kind": "document", "per_token": True}).json()
    code = body["codes"][0]
    assert_code_is_row(code, index.encoder.encode_documents([passage]).codes, 0)
    spans = code["token_codes"]
    assert spans[0]["start"] == 0 and len(spans) == code["tokens"]
    for a, b in zip(spans, spans[1:]):  # in order, and covering the text but for whitespace
        assert a["end"] <= b["start"] and not passage[a["end"] : b["start"]].strip()


def test_encode_activation_vectors_gives_their_sae_codes(client, index):
    passage = index.passages[1].text
    acts = passage_activations(index.llm, [passage], index.config.capture)
    vectors = acts.values[:4].astype(np.float32)
    body = client.post("/encode", json={"activations": vectors.tolist()}).json()
    assert body["kind"] == "activations" and len(body["codes"]) == 4
    tokens = client.post("/encode", json={"texts": [passage], "kind": "document", "per_token": True}).json()
    for code, token in zip(body["codes"], tokens["codes"][0]["token_codes"][:4]):
        assert code["tokens"] == 1 and code["token_codes"] is None
        got, want = dict(zip(code["latents"], code["values"])), dict(zip(token["latents"], token["values"]))
        assert set(got) == set(want)
        assert [got[j] for j in want] == pytest.approx(list(want.values()), rel=1e-4, abs=1e-5)


# --- ask -----------------------------------------------------------------------------------
def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
    return events


def test_ask_answers_as_rag_does_and_the_stream_joins_to_the_same_answer(client, index):
    question = QUERIES[0]
    expected = RAG(index, **ASK).ask(question)
    body = client.post("/ask", json={"question": question}).json()
    assert body["answer"] == expected.text and body["citations"] == expected.citations
    assert [h["passage_id"] for h in body["hits"]] == [h.passage_id for h in expected.hits]
    assert [h["passage_id"] for h in body["sources"]] == [h.passage_id for h in expected.sources()]
    assert body["answered"] is True and body["answer"].startswith("According to passage [")

    with client.stream("POST", "/ask", json={"question": question, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names[-1] == "answer" and set(names[:-1]) == {"token"} and len(names) > 2
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert streamed.strip() == expected.text
    assert events[-1][1] == body


def test_a_client_leaving_a_stream_stops_the_generation_and_frees_the_llm(index):
    # 5,000 tokens would take the tiny Llama well over ten seconds on this CPU.
    server = LiveServer(
        create_app(index, RAG(index, k=2, max_new_tokens=5000, min_relative_support=0), ServiceConfig())
    )
    try:
        with server.client() as c:
            with c.stream("POST", "/ask", json={"question": QUERIES[0], "stream": True}) as response:
                lines = response.iter_lines()
                assert next(lines) == "event: token"  # the citation lead has come; generation runs
            left = time.monotonic()
        gate = server.app.state.service.batcher.gate
        assert gate.acquire(timeout=10), "the LLM is still held after the client left"
        gate.release()
        assert time.monotonic() - left < 10
        deadline = time.monotonic() + 10
        while [t for t in threading.enumerate() if t.name in ("ragsae-generate", "ragsae-ask-stream")]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with server.client() as c:  # and the service goes on
            assert c.post("/search", json={"query": QUERIES[1], "k": 2}).status_code == 200
    finally:
        server.close()


def test_ask_k_changes_the_passages_given(client, index):
    body = client.post("/ask", json={"question": QUERIES[1], "k": 3}).json()
    assert [h["passage_id"] for h in body["hits"]] == [h.passage_id for h in index.search(QUERIES[1], 3)]


def test_rag_stream_yields_pieces_then_the_answer_ask_gives(index):
    rag = RAG(index, k=2, max_new_tokens=12, min_relative_support=0)
    items = list(rag.stream(QUERIES[2]))
    answer = rag.ask(QUERIES[2])
    assert isinstance(items[-1], Answer) and all(isinstance(p, str) for p in items[:-1])
    assert "".join(items[:-1]).strip() == answer.text == items[-1].text
    assert items[-1].citations == answer.citations and items[-1].prompt == answer.prompt


def test_closing_a_rag_stream_stops_its_generation(index):
    stream = RAG(index, k=2, max_new_tokens=400, min_relative_support=0).stream(QUERIES[3])
    next(stream), next(stream)  # the citation lead, then the first generated piece
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "ragsae-generate"]


def test_rag_stream_abstains_like_ask(index):
    rag = RAG(index, k=2, min_support=1.5)  # support is a cosine: out of reach
    items = list(rag.stream(QUERIES[0]))
    assert items[0] == items[-1].text and not items[-1].answered and items[-1].text == rag.ask(QUERIES[0]).text


def test_ask_over_http_reports_relative_support_and_abstains_below_the_services_threshold(index):
    rag = RAG(index, k=2, min_relative_support=1e6)  # far above any question's ratio
    server = LiveServer(create_app(index, rag))
    try:
        with server.client() as c:
            body = c.post("/ask", json={"question": QUERIES[0]}).json()
    finally:
        server.close()
    expected = rag.relative_support(QUERIES[0])
    assert not body["answered"] and body["citations"] == [] and len(body["hits"]) == 2
    assert body["relative_support"] == pytest.approx(expected) and 0 < body["relative_support"] < 1e6
    assert body["support"] == pytest.approx(rag.support(QUERIES[0]))


# --- health, info, schema, page, metrics ---------------------------------------------------
def test_healthz_info_schema_and_page(client, index):
    assert client.get("/healthz").json() == {"status": "ok", "passages": len(index), "queued": 0}
    info = client.get("/info").json()
    assert {k: info[k] for k in ("passages", "documents", "layer")} == {
        k: index.info()[k] for k in ("passages", "documents", "layer")
    }
    assert info["service"]["max_k"] == LIMITS["max_k"] and "api_key" not in info["service"]
    schema = client.get("/openapi.json").json()
    assert {"/encode", "/search", "/ask", "/healthz", "/info", "/metrics"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["SearchRequest"]["properties"]["k"]["maximum"] == LIMITS["max_k"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="q"' in page.text and "/search" in page.text and "://" not in page.text  # nothing from the network


def test_metrics_count_requests_time_them_and_monitor_sparsity(live, index):
    with live.client() as c:
        before = metrics(c)
        for query in QUERIES[:3]:
            assert c.post("/search", json={"query": query}).status_code == 200
        assert c.post("/search", json={"query": ""}).status_code == 422
        assert c.post("/encode", json={"texts": QUERIES[:2]}).status_code == 200
        after = metrics(c)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("ragsae_requests_total", endpoint="/search", method="POST", status="200") == 3
    assert delta("ragsae_requests_total", endpoint="/search", method="POST", status="422") == 1
    assert delta("ragsae_requests_total", endpoint="/encode", method="POST", status="200") == 1
    assert delta("ragsae_request_duration_seconds_count", endpoint="/search") == 4
    assert delta("ragsae_request_duration_seconds_sum", endpoint="/search") > 0
    assert after[("ragsae_queue_depth", (("queue", "batch"),))] == 0
    assert after[("ragsae_queue_depth", (("queue", "ask"),))] == 0
    # /encode inputs always feed the sparsity monitor: L0 is at most the SAE's k; FVU is finite.
    assert delta("ragsae_sparsity_tokens_total") >= sum(index.encode_queries(QUERIES[:2]).getnnz(axis=1) > 0)
    assert 0 < after[("ragsae_sparsity_l0", ())] <= index.sae.config.k
    assert 0 <= after[("ragsae_sparsity_fvu", ())] < 10 and math.isfinite(after[("ragsae_sparsity_fvu", ())])
    assert after[("ragsae_sparsity_window_tokens", ())] > 0
    assert ("ragsae_sae_train_fvu", ()) in after


def test_sparsity_monitor_reports_l0_and_fvu_of_its_recent_window(index):
    import torch

    from ragsae.service.metrics import SparsityMonitor

    sae = index.sae
    acts = passage_activations(index.llm, [p.text for p in index.passages[:6]], index.config.capture)
    x = torch.from_numpy(acts.values.astype(np.float32))
    codes = sae.encode(x)
    monitor = SparsityMonitor(sae, window=int(acts.offsets[3]))
    assert monitor.summary() == {"tokens": 0, "l0": None, "fvu": None}
    for i in range(6):  # one passage at a time; the window keeps about the last three
        lo, hi = acts.offsets[i], acts.offsets[i + 1]
        monitor.observe(x[lo:hi], codes.values[lo:hi], codes.indices[lo:hi])
    kept = slice(int(acts.offsets[6] - monitor.summary()["tokens"]), int(acts.offsets[6]))
    assert acts.offsets[3] <= monitor.summary()["tokens"] < acts.offsets[3] + max(np.diff(acts.offsets))
    with torch.no_grad():
        xn = sae.normalise(x[kept])
        recon = sae.decode(codes.values[kept], codes.indices[kept])
        fvu = float((xn - recon).pow(2).sum() / xn.pow(2).sum())
    summary = monitor.summary()
    assert summary["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert summary["l0"] == pytest.approx(float((codes.values[kept] > 0).sum(1).float().mean()), rel=1e-6)
    assert summary["l0"] <= sae.config.k and monitor.tokens_seen == acts.offsets[6]


# --- bad input -----------------------------------------------------------------------------
WIDE = 64  # the tiny Llama's hidden size
BAD_REQUESTS = [
    # (path, JSON body or raw bytes, content type, status, field, words in the message)
    ("/search", {}, None, 422, "query", "required"),
    ("/search", {"query": ""}, None, 422, "query", "at least 1"),
    ("/search", {"query": "  \n "}, None, 422, "query", "non-whitespace"),
    ("/search", {"query": "x" * 201}, None, 422, "query", "at most 200"),
    ("/search", {"query": 42}, None, 422, "query", "string"),
    ("/search", {"query": "a", "k": 0}, None, 422, "k", "greater than or equal to 1"),
    ("/search", {"query": "a", "k": 21}, None, 422, "k", "less than or equal to 20"),
    ("/search", {"query": "a", "k": 2.5}, None, 422, "k", "integer"),
    ("/search", {"query": "a", "k": True}, None, 422, "k", "integer"),
    ("/search", {"query": "a", "k": "3"}, None, 422, "k", "integer"),
    ("/search", {"query": "a", "k": 10**30}, None, 422, "k", "less than"),
    ("/search", {"query": "a", "mode": "dense"}, None, 422, "mode", "'sparse', 'faiss' or 'fused'"),
    ("/search", {"query": "a", "per_doc": "yes"}, None, 422, "per_doc", "boolean"),
    ("/search", {"query": "a", "top_k": 3}, None, 422, "top_k", "unknown field"),
    ("/search", [1, 2], None, 422, None, "object"),
    ("/search", b'{"query": "a", ', "application/json", 400, None, "malformed JSON"),
    ("/search", b"", "application/json", 422, None, "required"),
    ("/search", b"query=a", "application/x-www-form-urlencoded", 415, None, "Content-Type: application/json"),
    ("/search", b'{"query": "a"}', "", 415, None, "Content-Type: application/json"),
    ("/search", b'{"query": "' + b"a" * 20000 + b'"}', "application/json", 413, None, "over the limit"),
    ("/encode", {"texts": []}, None, 422, "texts", "at least 1"),
    ("/encode", {"texts": ["a"] * 5}, None, 422, "texts", "at most 4"),
    ("/encode", {"texts": ["ok", ""]}, None, 422, "texts.1", "at least 1"),
    ("/encode", {}, None, 422, None, "either 'texts' or 'activations'"),
    ("/encode", {"texts": ["a"], "activations": [[0.0] * WIDE]}, None, 422, None, "either"),
    ("/encode", {"texts": ["a"], "kind": "poem"}, None, 422, "kind", "'query' or 'document'"),
    ("/encode", {"texts": ["a"], "per_token": 1}, None, 422, "per_token", "boolean"),
    ("/encode", {"activations": [[0.0] * (WIDE - 1)]}, None, 422, "activations.0", f"expected {WIDE} values"),
    ("/encode", {"activations": [[0.0] * WIDE, [1.0] * (WIDE + 1)]}, None, 422, "activations.1", "got 65"),
    ("/encode", {"activations": [[0.0] * WIDE] * 5}, None, 422, "activations", "at most 4"),
    ("/encode", {"activations": [["1"] * WIDE]}, None, 422, "activations.0.0", "number"),
    (
        "/encode",
        b'{"activations": [[NaN' + b", 0" * (WIDE - 1) + b"]]}",
        "application/json",
        422,
        "activations.0.0",
        "finite",
    ),
    (
        "/encode",
        b'{"activations": [[0' + b", Infinity" * (WIDE - 1) + b"]]}",
        "application/json",
        422,
        "activations.0.1",
        "finite",
    ),
    ("/encode", {"activations": [[1e39] * WIDE]}, None, 422, "activations.0", "float32"),
    ("/encode", {"activations": [[3e38] * WIDE]}, None, 400, None, "not finite"),
    ("/ask", {"question": ""}, None, 422, "question", "at least 1"),
    ("/ask", {"question": "why?", "k": 4}, None, 422, "k", "less than or equal to 3"),
    ("/ask", {"question": "why?", "stream": "true"}, None, 422, "stream", "boolean"),
]


@pytest.mark.parametrize(("path", "body", "content_type", "status", "field", "words"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_with_a_json_message_naming_the_field(
    client, path, body, content_type, status, field, words
):
    if isinstance(body, bytes):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post(path, content=body, headers=headers)
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert words in error["error"], error
    assert error["field"] == field
    if field:
        assert error["error"].startswith(field + ":")


def test_wrong_methods_and_paths_are_json_4xx_and_the_server_keeps_serving(client, index):
    assert client.get("/search").status_code == 405 and client.get("/search").json()["error"]
    assert client.get("/nowhere").status_code == 404 and client.get("/nowhere").json()["error"]
    response = client.post("/search", json={"query": QUERIES[0], "k": 2})
    assert response.status_code == 200
    assert_same_hits(response.json()["hits"], index.search(QUERIES[0], 2))


def test_a_full_queue_is_a_503_and_the_queued_requests_still_complete(index):
    server = LiveServer(create_app(index, RAG(index, **ASK), ServiceConfig(max_queue=2, max_batch=1)))
    try:
        batcher = server.app.state.service.batcher
        with ThreadPoolExecutor(3) as pool:
            with batcher.gate:  # the worker takes one request, then waits for the LLM
                futures = [pool.submit(post_search, server, q) for q in QUERIES[:3]]
                deadline = time.monotonic() + 60
                while (batcher.computing(), batcher.depth()) != (1, 2):
                    assert time.monotonic() < deadline, (batcher.computing(), batcher.depth())
                    time.sleep(0.01)
                with server.client() as c:
                    busy = c.post("/search", json={"query": QUERIES[4]})
                    assert busy.status_code == 503 and "retry later" in busy.json()["error"]
                    assert busy.headers["retry-after"] == "1"
                    assert metrics(c)[("ragsae_queue_depth", (("queue", "batch"),))] == 2
            for future, query in zip(futures, QUERIES[:3]):
                response = future.result(60)
                assert response.status_code == 200
                assert_same_hits(response.json()["hits"], index.search(query, 10))
    finally:
        server.close()


def post_search(server: LiveServer, query: str):
    with server.client() as c:
        return c.post("/search", json={"query": query})


def test_the_batcher_gives_an_error_only_to_the_request_that_caused_it(index):
    batcher = MicroBatcher(index, max_batch=8, max_wait_ms=0)
    try:
        with batcher.gate:  # hold the worker so that all three are computed in one batch
            first = batcher.search(QUERIES[0], 3)
            deadline = time.monotonic() + 60
            while batcher.computing() != 1:  # taken alone by the worker, which now waits for the gate
                assert time.monotonic() < deadline
                time.sleep(0.01)
            good, bad = batcher.search(QUERIES[1], 3), batcher.search("   ", 3)  # not validated here
            other = batcher.search(QUERIES[2], 3)
        assert [h.passage_id for h in first.result(60)] == [h.passage_id for h in index.search(QUERIES[0], 3)]
        assert [h.passage_id for h in good.result(60)] == [h.passage_id for h in index.search(QUERIES[1], 3)]
        assert [h.passage_id for h in other.result(60)] == [h.passage_id for h in index.search(QUERIES[2], 3)]
        with pytest.raises(QueryError, match="empty"):
            bad.result(60)
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.search(QUERIES[0])


def test_the_batcher_refuses_work_beyond_its_queue(index):
    batcher = MicroBatcher(index, max_batch=1, max_queue=1)
    try:
        with batcher.gate:
            running = batcher.search(QUERIES[0], 2)
            deadline = time.monotonic() + 30
            while batcher.computing() != 1:  # taken by the worker
                assert time.monotonic() < deadline
                time.sleep(0.01)
            queued = batcher.search(QUERIES[1], 2)
            with pytest.raises(ServiceBusy):
                batcher.search(QUERIES[2], 2)
        assert len(running.result(60)) == len(queued.result(60)) == 2
    finally:
        batcher.close()


# --- authentication ------------------------------------------------------------------------
def test_api_key_guards_everything_but_the_page_health_and_schema(index):
    server = LiveServer(create_app(index, RAG(index, **ASK), ServiceConfig(api_key="s3cret-key")))
    try:
        with server.client() as anonymous:
            for method, path in [
                ("POST", "/search"),
                ("POST", "/encode"),
                ("POST", "/ask"),
                ("GET", "/info"),
                ("GET", "/metrics"),
            ]:
                response = anonymous.request(method, path, json={"query": "a"})
                assert response.status_code == 401, path
                assert response.headers["www-authenticate"] == "Bearer" and "API key" in response.json()["error"]
            for path in ("/", "/healthz", "/openapi.json"):
                assert anonymous.get(path).status_code == 200, path
        with server.client(headers={"Authorization": "Bearer wrong-key"}) as wrong:
            assert wrong.post("/search", json={"query": "a"}).status_code == 401
        with server.client(headers={"Authorization": "Bearer s3cret-key"}) as allowed:
            response = allowed.post("/search", json={"query": QUERIES[0], "k": 2})
            assert response.status_code == 200
            assert_same_hits(response.json()["hits"], index.search(QUERIES[0], 2))
            assert allowed.get("/metrics").status_code == 200
    finally:
        server.close()


def test_service_config_refuses_bad_limits():
    with pytest.raises(ConfigError, match="max_batch"):
        ServiceConfig(max_batch=0)
    with pytest.raises(ConfigError, match="api_key"):
        ServiceConfig(api_key=" ")
    assert "s3cret" not in repr(ServiceConfig(api_key="s3cret"))


# --- the command -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_parses_its_options_and_refuses_bad_ones():
    import argparse

    from ragsae.service.cli import add_serve_parser, serve_settings

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "idx", "--port", "9001", "--max-batch", "1", "--max-wait-ms", "0.5", "-k", "2"])
    settings = serve_settings(args)
    assert args.host == "127.0.0.1" and settings["service"]["max_batch"] == 1
    assert settings["service"]["max_wait_ms"] == 0.5 and settings["rag"]["k"] == 2
    with pytest.raises(ConfigError, match="max_batch"):
        serve_settings(parser.parse_args(["serve", "idx", "--max-batch", "0"]))
    with pytest.raises(ConfigError, match="port"):
        serve_settings(parser.parse_args(["serve", "idx", "--port", "70000"]))


def test_serve_command_serves_a_saved_index(index):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAGSAE_API_KEY": "from-env"}
    command = [sys.executable, "-m", "ragsae", "serve", str(index.path), "--port", str(port), "-k", "2"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "ragsae serve did not start"
                time.sleep(0.2)
            assert c.post("/search", json={"query": QUERIES[0]}).status_code == 401  # the key from the environment
            response = c.post(
                "/search", json={"query": QUERIES[0], "k": 3}, headers={"Authorization": "Bearer from-env"}
            )
            assert response.status_code == 200
            assert_same_hits(response.json()["hits"], index.search(QUERIES[0], 3))
    finally:
        process.terminate()
        process.wait(30)


def test_serve_command_reports_a_missing_index_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ragsae", "serve", str(tmp_path / "nothing"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("ragsae serve: error:") and "Traceback" not in done.stderr
    assert Path(tmp_path / "nothing").name in done.stderr


NEW_DOC = {
    "id": "tarfile",
    "title": "tarfile",
    "text": "The tarfile module reads and writes tar archives, compressed or not.",
}


def test_documents_are_added_upserted_and_deleted_through_the_lifecycle_api(tmp_path, tiny_llm_dir, tiny_llm):
    index = Index.build(TOY_DOCS, tmp_path / "idx", tiny_config(tiny_llm_dir), llm=tiny_llm)
    built = index.generation
    server = LiveServer(create_app(index, RAG(index, **ASK)))
    try:
        with server.client() as c:
            response = c.post("/documents", json={"documents": [NEW_DOC]})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["documents"] == 1 and body["passages"] == len(TOY_DOCS) + 1 and body["generation"] == built + 1
            assert "needs_retrain" in body["drift"]
            # faiss mode with k above the index's size: every live passage (the tiny model ranks at random)
            every = {"query": "tar archives", "k": 20, "mode": "faiss"}
            hits = c.post("/search", json=every).json()["hits"]
            assert "tarfile" in [h["doc_id"] for h in hits] and len(hits) == len(TOY_DOCS) + 1
            assert_same_hits(hits, index.search("tar archives", 20, "faiss"))

            again = c.post("/documents", json={"documents": [NEW_DOC]})
            assert again.status_code == 409 and again.json()["field"] == "documents.0.id"
            replaced = {**NEW_DOC, "text": "The tarfile module packs files into tape archives."}
            assert c.post("/documents", json={"documents": [replaced], "upsert": True}).status_code == 200
            stored = [h["text"] for h in c.post("/search", json={**every, "query": "tape"}).json()["hits"]]
            assert any("tape archives" in text for text in stored) and not any("compressed" in t for t in stored)

            deleted = c.delete("/documents/tarfile")
            assert deleted.status_code == 200 and deleted.json()["deleted_passages"] == 1
            after = c.post("/search", json=every).json()["hits"]
            assert "tarfile" not in [h["doc_id"] for h in after] and len(after) == len(TOY_DOCS)
            missing = c.delete("/documents/tarfile")
            assert missing.status_code == 404 and "tarfile" in missing.json()["error"]
            assert c.get("/info").json()["generation"] == built + 3
    finally:
        server.close()
    reloaded = Index.load(tmp_path / "idx", llm=tiny_llm)  # every change was committed to the folder
    assert reloaded.generation == built + 3 and "tarfile" not in reloaded.doc_rows and len(reloaded) == len(TOY_DOCS)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"documents": []}, "documents"),
        ({"documents": [{"id": "x"}]}, "documents.0.text"),
        ({"documents": [{"id": "x", "text": "   "}]}, "documents.0.text"),
        ({"documents": [{"id": 7, "text": "seven"}]}, "documents.0.id"),
        ({"documents": [{"id": "x", "text": "a", "author": "me"}]}, "documents.0.author"),
        ({"documents": [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]}, "documents.1.id"),
        ({"documents": [{"id": "a\nb", "text": "a line break in an id"}]}, None),
    ],
)
def test_bad_documents_are_refused_and_change_nothing(tmp_path, tiny_llm_dir, tiny_llm, body, field):
    index = Index.build(TOY_DOCS, tmp_path / "idx", tiny_config(tiny_llm_dir), llm=tiny_llm)
    server = LiveServer(create_app(index, RAG(index, **ASK)))
    try:
        with server.client() as c:
            response = c.post("/documents", json=body)
            assert 400 <= response.status_code < 500 and response.json()["field"] == field, response.text
            assert response.json()["error"]
    finally:
        server.close()
    assert Index.load(tmp_path / "idx", llm=tiny_llm).generation == index.generation


def test_a_read_only_service_refuses_changes(index):
    server = LiveServer(create_app(index, RAG(index, **ASK), ServiceConfig(read_only=True)))
    try:
        with server.client() as c:
            assert c.post("/documents", json={"documents": [NEW_DOC]}).status_code == 403
            assert c.delete(f"/documents/{index.documents[0]}").status_code == 403
            assert c.post("/search", json={"query": QUERIES[0], "k": 1}).status_code == 200
    finally:
        server.close()
