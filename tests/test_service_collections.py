"""The HTTP service over several indexes (`Collections`), on a real uvicorn server with two tiny indexes:
/search and /ask route each query, /info lists every index, /encode and /documents act on the first,
routed searches are micro-batched into one capture, and `ragsae serve A B` builds such a service."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TOY_DOCS, tiny_config

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'ragsae[serve]'")
pytest.importorskip("httpx", reason="the service tests need httpx (test extra)")
pytest.importorskip("uvicorn", reason="the service needs the serve extra: pip install 'ragsae[serve]'")

from test_routing import KITCHEN_DOCS  # noqa: E402
from test_service import LiveServer, assert_code_is_row, assert_same_hits, metrics, sse_events  # noqa: E402

from ragsae import Collections, Index  # noqa: E402
from ragsae.generate import NOT_COVERED, RAG  # noqa: E402
from ragsae.service import ServiceConfig, create_app  # noqa: E402

QUESTIONS = ["How do I read a CSV file?", "How long should bread dough rise?", "open a network socket"]
# The tiny model has random weights, so its support says nothing: /ask answers every question here.
ASK = dict(k=2, max_new_tokens=4, min_relative_support=0)
LIMITS = dict(max_text_chars=200, max_texts=4, max_k=20, max_ask_k=3)


@pytest.fixture(scope="module")
def collections(tiny_llm, tiny_llm_dir, tmp_path_factory) -> Collections:
    """Two saved tiny indexes with their own SAEs over one LLM: 'docs' (stdlib-like) and 'kitchen'."""
    folder = tmp_path_factory.mktemp("routed-service")
    config = tiny_config(tiny_llm_dir)
    docs = Index.build(TOY_DOCS, folder / "docs", config, llm=tiny_llm)
    kitchen = Index.build(KITCHEN_DOCS, folder / "kitchen", config, llm=tiny_llm)
    return Collections([docs, kitchen])


@pytest.fixture(scope="module")
def live(collections) -> Iterator[LiveServer]:
    # A long batching window, so that requests sent together are computed together.
    config = ServiceConfig(max_batch=16, max_wait_ms=40, **LIMITS)
    server = LiveServer(create_app(collections, RAG(collections, **ASK), config))
    yield server
    server.close()


@pytest.fixture
def client(live):
    with live.client() as c:
        yield c


def test_search_routes_among_the_indexes_and_tags_each_hit(client, collections):
    for query in QUESTIONS:
        response = client.post("/search", json={"query": query, "k": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = collections.search(query, k=3)
        assert list(body["routing"]) == ["docs", "kitchen"]
        assert body["routing"] == pytest.approx(expected.routing, rel=1e-4, abs=1e-5)
        assert body["retrieved"] is True and body["chosen"] == expected.chosen and len(body["chosen"]) == 1
        assert {hit["index"] for hit in body["hits"]} == set(body["chosen"])  # route 'best': one index
        assert_same_hits(body["hits"], expected.hits)
        assert body["mode"] == "sparse" and body["k"] == 3


def test_route_all_and_top_n_search_the_indexes_chosen(client, collections):
    query = QUESTIONS[0]
    body = client.post("/search", json={"query": query, "k": 4, "route": "all"}).json()
    expected = collections.search(query, k=4, route="all")
    assert set(body["chosen"]) == {"docs", "kitchen"} and {hit["index"] for hit in body["hits"]} == {"docs", "kitchen"}
    assert [(h["index"], h["passage_id"]) for h in body["hits"]] == [(h.index, h.passage_id) for h in expected.hits]
    one = client.post("/search", json={"query": query, "k": 4, "route": "top-n", "top_n": 1}).json()
    assert one["chosen"] == expected.chosen[:1] and {hit["index"] for hit in one["hits"]} == set(one["chosen"])


def test_a_threshold_above_every_score_retrieves_nothing(client, collections):
    query = QUESTIONS[1]
    over = max(collections.route([query])[0].values()) + 0.01
    body = client.post("/search", json={"query": query, "route": "all", "threshold": over}).json()
    assert body["retrieved"] is False and body["hits"] == [] and body["chosen"] == []
    assert set(body["routing"]) == {"docs", "kitchen"}


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"route": "nearest"}, "route", "must be one of best, top-n, all"),
        ({"route": 1}, "route", "string"),
        ({"top_n": 0}, "top_n", "greater than or equal to 1"),
        ({"top_n": "2"}, "top_n", "integer"),
        ({"threshold": "high"}, "threshold", "number"),
        ({"threshold": True}, "threshold", "number"),
    ],
)
@pytest.mark.parametrize(("path", "text_field"), [("/search", "query"), ("/ask", "question")])
def test_bad_routing_fields_are_a_422_naming_the_field(client, path, text_field, fields, field, words):
    response = client.post(path, json={text_field: "q", **fields})
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == field and error["error"].startswith(field + ":") and words in error["error"], error


def test_ask_routes_the_question_and_names_the_index_of_each_source(client, collections):
    question = QUESTIONS[0]
    expected = RAG(collections, **ASK).ask(question)
    body = client.post("/ask", json={"question": question}).json()
    assert body["answer"] == expected.text and body["retrieved"] is True
    assert body["routing"] == pytest.approx(expected.routing, rel=1e-4, abs=1e-5)
    assert [(h["index"], h["passage_id"]) for h in body["hits"]] == [(h.index, h.passage_id) for h in expected.hits]
    assert body["sources"] and all(source["index"] in ("docs", "kitchen") for source in body["sources"])
    with client.stream("POST", "/ask", json={"question": question, "stream": True}) as response:
        events = sse_events(response)
    assert events[-1] == ("answer", body)  # the streamed answer carries the routing too
    over = max(expected.routing.values()) + 0.01
    refused = client.post("/ask", json={"question": question, "threshold": over}).json()
    assert refused["retrieved"] is False and refused["answer"] == NOT_COVERED and refused["hits"] == []


def test_info_lists_every_index_and_encode_acts_on_the_first(client, collections):
    info = client.get("/info").json()
    assert list(info["indexes"]) == ["docs", "kitchen"]
    for name, index in collections:
        assert info["indexes"][name]["passages"] == len(index) and info["indexes"][name]["path"] == str(index.path)
    assert info["routing"] == {"route": "best", "top_n": 2, "threshold": 0.0} and "api_key" not in info["service"]
    assert client.get("/healthz").json()["passages"] == len(TOY_DOCS) + len(KITCHEN_DOCS)
    encoded = client.post("/encode", json={"texts": QUESTIONS[:2]}).json()
    assert encoded["index"] == "docs"
    for row, code in enumerate(encoded["codes"]):
        assert_code_is_row(code, collections["docs"].encode_queries(QUESTIONS[:2]), row)
    schema = client.get("/openapi.json").json()
    assert "acts on the first, 'docs'" in schema["paths"]["/encode"]["post"]["description"]
    assert "acts on the first, 'docs'" in schema["paths"]["/documents"]["post"]["description"]
    routed = schema["components"]["schemas"]["RoutedSearchRequest"]["properties"]
    assert routed["route"]["enum"] == ["best", "top-n", "all"] and routed["top_n"]["default"] == 2


def test_concurrent_routed_searches_share_micro_batches_and_one_capture_each(live, collections):
    jobs = QUESTIONS * 4
    expected = {query: collections.search(query, k=3) for query in QUESTIONS}
    with live.client() as c:
        before = metrics(c)
    captures = collections.captures
    start = threading.Barrier(len(jobs))

    def send(query):
        with live.client() as c:
            start.wait()
            return c.post("/search", json={"query": query, "k": 3})

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(send, jobs))
    for query, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert response.json()["chosen"] == expected[query].chosen
        assert_same_hits(response.json()["hits"], expected[query].hits)
    with live.client() as c:
        after = metrics(c)
    batches = after[("ragsae_batch_requests_count", ())] - before.get(("ragsae_batch_requests_count", ()), 0)
    assert batches < len(jobs)  # at least one micro-batch served several requests
    assert collections.captures - captures == batches  # each batch: one LLM pass for both indexes
    ok = ("ragsae_requests_total", (("endpoint", "/search"), ("method", "POST"), ("status", "200")))
    assert after[ok] - before.get(ok, 0) == len(jobs)


def test_documents_are_changed_in_the_first_index_only(collections, tiny_llm, tiny_llm_dir, tmp_path):
    docs, kitchen = collections.indexes
    notes = Index.build(TOY_DOCS, tmp_path / "notes", tiny_config(tiny_llm_dir), sae=docs.sae, llm=tiny_llm)
    pair = Collections([notes, kitchen])
    server = LiveServer(create_app(pair, RAG(pair, **ASK)))
    document = {"id": "tarfile", "text": "The tarfile module reads and writes tar archives."}
    try:
        with server.client() as c:
            added = c.post("/documents", json={"documents": [document]})
            assert added.status_code == 200, added.text
            assert added.json()["index"] == "notes" and added.json()["passages"] == len(TOY_DOCS) + 1
            assert "tarfile" in notes.doc_rows and len(kitchen) == len(KITCHEN_DOCS)
            missing = c.delete("/documents/bread")  # a kitchen document: not in the first index
            assert missing.status_code == 404 and "'notes'" in missing.json()["error"]
            assert "bread" in kitchen.doc_rows
            deleted = c.delete("/documents/tarfile")
            assert deleted.status_code == 200 and deleted.json()["index"] == "notes"
    finally:
        server.close()
    assert "tarfile" not in Index.load(tmp_path / "notes", llm=tiny_llm).doc_rows


def test_create_app_refuses_a_rag_that_does_not_route_over_the_collections(collections):
    from ragsae.errors import ConfigError

    with pytest.raises(ConfigError, match="RAG over them"):
        create_app(collections, RAG(collections.indexes[0]))


def test_serve_command_takes_several_indexes(collections):
    import argparse

    from ragsae.service.cli import add_serve_parser, build_app, serve_settings

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    paths = [str(index.path) for index in collections.indexes]
    settings = serve_settings(parser.parse_args(["serve", *paths, "-k", "2"]))
    assert settings["indexes"] == paths
    app = build_app(settings)
    try:
        service = app.state.service
        assert service.collections.names == ["docs", "kitchen"] and service.rag.collections is service.collections
        assert service.collections["kitchen"].llm is service.index.llm  # one LLM for both
    finally:
        app.state.service.batcher.close()
    alone = build_app(serve_settings(parser.parse_args(["serve", paths[0]])))
    try:
        assert alone.state.service.collections is None and alone.state.service.index.path == collections.indexes[0].path
    finally:
        alone.state.service.batcher.close()


def test_the_search_page_shows_the_index_of_each_hit(browser, collections):
    from urllib.parse import urlencode

    # The service's RAG routes to all indexes: the page (which sends no route) gets the hits of both.
    server = LiveServer(create_app(collections, RAG(collections, route="all", **ASK)))
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        query = QUESTIONS[0]
        page.goto(f"{server.url}/?" + urlencode({"q": query, "k": 4}))
        page.wait_for_selector("body[data-state=highlighted]", timeout=60_000)
        shown = page.eval_on_selector_all(
            ".hit",
            """boxes => boxes.map(box => [box.dataset.passageId, box.querySelector('.index').textContent,
                                          box.querySelectorAll('mark').length])""",
        )
        expected = collections.search(query, k=4, route="all").hits
        assert [row[:2] for row in shown] == [[h.passage_id, f"from {h.index}"] for h in expected]
        # /encode uses the first index's SAE: only its hits are marked where their latents fire.
        marked = {(index, marks > 0) for _, index, marks in shown}
        assert marked == {("from docs", True), ("from kitchen", False)}
        assert page.inner_text("#about") == "Queries are routed among docs, kitchen."
        assert page.inner_text("#status").startswith("4 hits in") and "(sparse)" in page.inner_text("#status")
    finally:
        context.close()
        server.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
