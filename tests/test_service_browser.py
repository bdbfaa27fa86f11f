"""The search page in a real headless Chromium against a real server on a loopback port.

Needs a Chromium binary (Debian's `chromium`; `scripts/install_browser.sh` installs it, or set
$RAGSAE_CHROMIUM) and the `playwright` package, which drives it; skipped without either (the `browser`
fixture of conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'ragsae[serve]'")
pytest.importorskip("httpx", reason="the service tests need httpx (test extra)")

from test_service import ASK, QUERIES, LiveServer, build_index  # noqa: E402

from ragsae.generate import RAG  # noqa: E402
from ragsae.index import Index  # noqa: E402
from ragsae.service import ServiceConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_llm_dir, tiny_llm) -> Index:
    return build_index(tmp_path_factory.mktemp("service-page"), tiny_llm_dir, tiny_llm)


@pytest.fixture(scope="module")
def live(index: Index) -> Iterator[LiveServer]:
    server = LiveServer(create_app(index, RAG(index, **ASK), ServiceConfig(max_k=20)))
    yield server
    server.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def rendered_hits(page) -> list[dict]:
    return page.eval_on_selector_all(
        ".hit",
        """boxes => boxes.map(box => ({
            passage_id: box.dataset.passageId,
            doc_id: box.dataset.docId,
            rank: Number(box.dataset.rank),
            text: box.querySelector('.passage').textContent,
            latents: Array.from(box.querySelectorAll('.latent')).map(chip => Number(chip.dataset.latent)),
            marks: box.querySelectorAll('mark').length,
        }))""",
    )


def assert_page_shows(page, index: Index, query: str, k: int) -> None:
    page.wait_for_selector("body[data-state=highlighted]", timeout=60_000)
    expected = index.search(query, k)
    shown = rendered_hits(page)
    assert [(h["rank"], h["passage_id"], h["doc_id"]) for h in shown] == [
        (h.rank, h.passage_id, h.doc_id) for h in expected
    ]
    for hit, want in zip(shown, expected):
        assert hit["text"] == want.text  # the highlighting keeps the passage text intact
        assert set(hit["latents"]) >= {j for j, _ in want.latents[:-1]}  # a near-tie may swap the last one
        assert hit["marks"] > 0  # the matching latents fire somewhere in the passage
    assert page.inner_text("#status").startswith(f"{k} hits in")


def test_the_page_searches_the_query_in_its_url_and_marks_where_latents_fire(page, live, index):
    query = QUERIES[0]
    page.goto(f"{live.url}/?" + urlencode({"q": query, "k": 4}))
    assert_page_shows(page, index, query, 4)
    assert page.input_value("#q") == query
    info = page.inner_text("#about")
    assert f"{len(index)} passages" in info and f"layer {index.config.capture.layer}" in info


def test_typing_a_query_and_submitting_shows_its_hits(page, live, index):
    page.goto(live.url + "/")
    page.fill("#q", QUERIES[1])
    page.fill("#k", "3")
    page.click("#go")
    assert_page_shows(page, index, QUERIES[1], 3)
    assert f"q={QUERIES[1].split()[0]}" in page.url  # the query is kept in the address
    # Pointing at a latent lights the tokens it fires on, and only those.
    first = page.locator(".hit").first
    chip = first.locator(".latent:not(.absent)").first
    latent = chip.get_attribute("data-latent")
    chip.hover()
    lit = first.locator("mark.on")
    assert lit.count() > 0
    for i in range(lit.count()):
        assert latent in lit.nth(i).get_attribute("data-latents").split()


def test_the_page_shows_the_services_error_message(page, live):
    page.goto(f"{live.url}/?" + urlencode({"q": QUERIES[2], "k": 50}))  # over the service's max_k
    page.wait_for_selector("#status.error", timeout=60_000)
    assert page.inner_text("#status").startswith("k: Input should be less than or equal to 20")
    assert page.locator(".hit").count() == 0
