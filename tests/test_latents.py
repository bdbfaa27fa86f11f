"""Latent catalog: statistics against naive recounts, save/load and refusal of damaged files, explain's
sums against the sparse score, the atlas file, and the `latents` / `atlas` / `explain` subcommands."""

import argparse
import json
import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import msmarco_slice, tiny_config

from ragsae.encode import encode_tokens, passage_activations, selection_dtype
from ragsae.errors import IndexFolderError, QueryError
from ragsae.index import Index
from ragsae.latents import (
    LATENTS_FILE,
    LatentCard,
    LatentCatalog,
    LatentContext,
    describe_latents,
    explain_query,
    passage_tokens,
    write_atlas,
)
from ragsae.latents.atlas import ATLAS_DATA_ID
from ragsae.latents.catalog import clean_token
from ragsae.latents.cli import add_latent_parsers
from ragsae.latents.describe import DescribeSettings, LatentStatistics, catalog_of, make_label
from ragsae.storage import json_checksum


@pytest.fixture(scope="module")
def described(tiny_llm, tiny_llm_dir, tmp_path_factory):
    """A tiny index of an msmarco slice, its passages' activations, their token codes and the catalog,
    saved in folder `idx` (where the index folder will keep it)."""
    corpus = msmarco_slice(tmp_path_factory.mktemp("latents") / "tiny", 3, 30, 12)
    config = tiny_config(tiny_llm_dir)
    index = Index.build(corpus, None, config, llm=tiny_llm)
    acts = passage_activations(tiny_llm, [p.text for p in index.passages], config.capture)
    catalog = describe_latents(tiny_llm, index.sae, index.passages, acts, config.capture)
    values, indices = encode_tokens(index.sae, acts.values, select_dtype=selection_dtype(tiny_llm))
    folder = tmp_path_factory.mktemp("latents-index") / "idx"
    folder.mkdir()
    catalog.save(folder)
    return index, acts, (values, indices), catalog, folder


def test_statistics_match_naive_recounts(described):
    index, acts, (values, indices), catalog, _ = described
    m, offsets = index.sae.num_latents, acts.offsets
    fired = [set() for _ in range(m)]  # passages
    tokens = np.zeros(m, dtype=int)
    for p in range(len(index.passages)):
        for row in range(offsets[p], offsets[p + 1]):
            for j, v in zip(indices[row], values[row]):
                if v > 0:
                    fired[j].add(p)
                    tokens[j] += 1
    live = [j for j in range(m) if tokens[j]]
    assert catalog.live.tolist() == live and catalog.dead == m - len(live)
    for j in live:
        card = catalog.card(j)
        assert (card.tokens, card.passages) == (tokens[j], len(fired[j]))
        assert sum(card.histogram) == card.tokens
        assert card.passage_frequency == pytest.approx(len(fired[j]) / len(index.passages))
    for j in set(range(m)) - set(live):
        with pytest.raises(QueryError, match="dead latent"):
            catalog.card(j)
    with pytest.raises(QueryError, match="does not exist"):
        catalog.card(m)


def test_every_context_fires_where_it_says(described):
    index, acts, (values, indices), catalog, _ = described
    rows_of = {p.passage_id: i for i, p in enumerate(index.passages)}
    tokens = passage_tokens(index.llm, [p.text for p in index.passages], index.config.capture)
    for card in catalog:
        assert card.contexts, f"latent {card.latent} fires but has no context"
        docs = [index.passages[rows_of[c.passage_id]].doc_id for c in card.contexts]
        assert len(set(docs)) == len(docs), "at most one context per document"
        assert [c.activation for c in card.contexts] == sorted((c.activation for c in card.contexts), reverse=True)
        assert card.max_activation == card.contexts[0].activation
        for c in card.contexts:
            p = rows_of[c.passage_id]
            row = acts.offsets[p] + c.position
            code = dict(zip(indices[row].tolist(), values[row].tolist()))
            assert code.get(card.latent, 0) > 0, f"latent {card.latent} does not fire at {c}"
            assert c.activation == pytest.approx(code[card.latent], rel=1e-3, abs=1e-3)
            text = index.passages[p].text
            start, end = tokens.starts[row], tokens.ends[row]
            assert c.left + text[start:end] + c.right in text
            # A token outside the passage's text (the space joining it to its prefix) shows as decoded.
            assert c.token == (text[start:end] if end > start else index.llm.tokenizer.decode([tokens.ids[row]]))
        # The best context is the latent's strongest activation anywhere in the corpus.
        strongest = values[indices == card.latent].max()
        assert card.contexts[0].activation == pytest.approx(strongest, rel=1e-3)


def test_characteristic_tokens_and_labels(described):
    index, acts, (values, indices), catalog, _ = described
    tokens = passage_tokens(index.llm, [p.text for p in index.passages], index.config.capture)
    decoded = {t: index.llm.tokenizer.decode([t]) for t in np.unique(tokens.ids).tolist()}
    ids_of: dict[str, set[int]] = {}
    for t, text in decoded.items():
        ids_of.setdefault(text, set()).add(t)
    checked = 0
    for card in catalog:
        assert card.characteristic, f"latent {card.latent} has no characteristic token"
        assert card.label == make_label([c.token for c in card.characteristic])
        for c in card.characteristic[:2]:
            if len(ids_of[c.token]) > 1:  # bytes of a multi-byte character decode alike
                continue
            checked += 1
            rows = np.flatnonzero(tokens.ids == next(iter(ids_of[c.token])))
            assert c.count == len(rows)
            assert c.fires == int(((indices[rows] == card.latent) & (values[rows] > 0)).any(axis=1).sum())
        assert len(card.logit_lens) == DescribeSettings().logit_tokens
        assert len(card.neighbours) == DescribeSettings().neighbours
        assert all(j in catalog.live and j != card.latent for j, _ in card.neighbours)
    assert checked > len(catalog)


def test_streaming_in_small_slices_changes_nothing(described):
    index, acts, (values, indices), catalog, _ = described
    capture = index.config.capture
    small = describe_latents(
        index.llm, index.sae, index.passages, acts, capture, settings=DescribeSettings(chunk_passages=7)
    )
    assert list(small) == list(catalog)
    # Codes fed in slices that cut passages in two (as a caller pooling them might) count the same.
    tokens = passage_tokens(index.llm, [p.text for p in index.passages], capture)
    stats = LatentStatistics(index.sae.num_latents, tokens, [p.doc_id for p in index.passages])
    for lo in range(0, len(values), 13):
        stats.add(lo, values[lo : lo + 13], indices[lo : lo + 13])
    with pytest.raises(ValueError, match="in order"):
        stats.add(0, values[:1], indices[:1])
    sliced = catalog_of(stats, index.llm, index.sae, index.passages, capture, DescribeSettings())
    assert list(sliced) == list(catalog)


def test_catalog_round_trips(described, tmp_path):
    _, _, _, catalog, folder = described
    assert catalog.save(tmp_path) == [LATENTS_FILE]
    loaded = LatentCatalog.load(tmp_path)
    assert list(loaded) == list(catalog)
    assert (loaded.num_latents, loaded.passages, loaded.tokens) == (
        catalog.num_latents,
        catalog.passages,
        catalog.tokens,
    )
    assert loaded.settings == catalog.settings and loaded.source == catalog.source
    assert LatentCatalog.load(folder, num_latents=catalog.num_latents).live.tolist() == catalog.live.tolist()
    with pytest.raises(IndexFolderError, match="describes 128 latents, but the index's SAE has 64"):
        LatentCatalog.load(folder, num_latents=64)


def edit_catalog(folder, edit, checksum=True):
    path = folder / LATENTS_FILE
    data = json.loads(path.read_text())
    edit(data)
    if checksum:
        data["checksum"] = json_checksum(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "checksum", "message"),
    [
        (lambda d: d["latents"]["label"].__setitem__(0, "edited"), False, "checksum mismatch"),
        (lambda d: d.update(format_version=99), True, "format_version 99"),
        (lambda d: d.update(kind="something else"), True, "kind must be"),
        (lambda d: d["contexts"]["activation"].__setitem__(0, "x"), True, r"contexts.activation\[0\] must be a float"),
        (lambda d: d["contexts"]["left"].__setitem__(1, 3), True, r"contexts.left\[1\] must be a str"),
        (lambda d: d["latents"]["latent"].__setitem__(0, 10**6), True, r"latents.latent\[0\] is 1000000, outside"),
        (lambda d: d["latents"]["tokens"].pop(), True, "latents.tokens has"),
        (lambda d: d["latents"]["histogram"].__setitem__(0, 10**6), True, "latents.histogram"),
        (lambda d: d["characteristic"]["offsets"].__setitem__(1, -1), True, "characteristic.offsets must start"),
        (lambda d: d["neighbours"].pop("cosine"), True, "neighbours.cosine is missing"),
        (lambda d: d["characteristic"]["fires"].__setitem__(0, 10**9), True, r"characteristic.fires\[0\]"),
        (lambda d: d["latents"]["max_activation"].__setitem__(0, float("nan")), True, "must be a finite number"),
    ],
)
def test_damaged_catalog_is_refused(described, tmp_path, edit, checksum, message):
    _, _, _, catalog, _ = described
    catalog.save(tmp_path)
    edit_catalog(tmp_path, edit, checksum)
    with pytest.raises(IndexFolderError, match=message) as error:
        LatentCatalog.load(tmp_path)
    assert LATENTS_FILE in str(error.value)


def test_truncated_or_missing_catalog_is_refused(described, tmp_path):
    _, _, _, catalog, _ = described
    with pytest.raises(IndexFolderError, match="missing"):
        LatentCatalog.load(tmp_path)
    catalog.save(tmp_path)
    path = tmp_path / LATENTS_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IndexFolderError, match="malformed JSON"):
        LatentCatalog.load(tmp_path)


def test_search_finds_latents_by_the_tokens_they_fire_on(described):
    _, _, _, catalog, _ = described
    for card in list(catalog)[:20]:
        word = clean_token(card.contexts[0].token)
        found = [c.latent for c in catalog.search(word.upper(), limit=catalog.num_latents)]
        assert card.latent in found, (word, card.latent)
        first = clean_token(card.characteristic[0].token)
        assert card.latent in [c.latent for c in catalog.search(first, limit=catalog.num_latents)]
    with pytest.raises(QueryError):
        catalog.search("  ")
    assert catalog.search("no-such-token-anywhere") == []


@pytest.mark.parametrize("query", ["how does a thermometer measure temperature", "axon terminals synapse"])
def test_explain_shares_add_up_to_the_sparse_score(described, query):
    index, _, _, catalog, _ = described
    hits = index.search(query, k=3, mode="sparse")
    for hit in hits:
        explanation = explain_query(index, catalog, query, hit.passage_id)
        assert explanation.passage_id == hit.passage_id
        assert explanation.score == pytest.approx(hit.score, rel=1e-5)
        assert sum(s.contribution for s in explanation.latents) == pytest.approx(hit.score, rel=1e-5)
        assert sum(s.share for s in explanation.latents) == pytest.approx(1.0)
        top = [(s.latent, s.contribution) for s in explanation.latents[: len(hit.latents)]]
        np.testing.assert_allclose([w for _, w in top], [w for _, w in hit.latents], rtol=1e-5)
        for shared in explanation.latents:
            assert shared.label == catalog.label(shared.latent)
            assert shared.contribution == pytest.approx(shared.query_weight * shared.passage_weight, rel=1e-6)
            for fired in shared.tokens:
                # A token outside the text (the space after the prefix) has an empty span and shows as decoded.
                assert explanation.text[fired.start : fired.end] in (fired.token, "") and fired.activation > 0
    assert explain_query(index, catalog, query).passage_id == index.search(query, k=1)[0].passage_id
    by_doc = explain_query(index, catalog, query, hits[0].doc_id)
    assert by_doc.doc_id == hits[0].doc_id and by_doc.score >= hits[0].score * (1 - 1e-5)
    with pytest.raises(QueryError, match="not in the index"):
        explain_query(index, catalog, query, "no-such-document")


def script_text(value: str) -> str:
    """`value` as it appears inside the atlas's embedded JSON."""
    return json.dumps(value, ensure_ascii=False)[1:-1].replace("<", "\\u003c").replace("/", "\\/")


def test_atlas_is_one_self_contained_html_file(described, tmp_path):
    _, _, _, catalog, _ = described
    path = write_atlas(catalog, tmp_path / "atlas.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count("<html") == 1
    assert not re.search(r"https?://|src\s*=|<link|@import|url\(|fetch\(|XMLHttpRequest", page, re.IGNORECASE)
    data = json.loads(page.split(f'id="{ATLAS_DATA_ID}">', 1)[1].split("</script>", 1)[0])
    assert data["latents"]["label"] == [catalog.label(j) for j in catalog.live.tolist()]
    for card in catalog:
        assert script_text(card.label) in page
    assert list(path.parent.iterdir()) == [path]


def test_atlas_keeps_corpus_text_inert(tmp_path):
    hostile = "</script><script>alert(1)</script> see http://example.com/x <!-- "
    card = LatentCard(
        latent=3,
        label="</b>",
        passages=1,
        tokens=1,
        passage_frequency=1.0,
        token_frequency=1.0,
        mean_activation=1.0,
        max_activation=1.0,
        histogram=(0, 1),
        contexts=(LatentContext("p1", 0, 1.0, hostile, "x", hostile),),
        characteristic=(),
        logit_lens=("https://a",),
        neighbours=(),
    )
    catalog = LatentCatalog.from_cards(8, 1, 1, (1.0,), [card])
    page = write_atlas(catalog, tmp_path / "a.html").read_text()
    assert page.count("</script>") == 2 and "<script>alert" not in page
    assert not re.search(r"https?://", page)
    data = json.loads(page.split(f'id="{ATLAS_DATA_ID}">', 1)[1].split("</script>", 1)[0])
    assert data["contexts"]["left"] == [hostile] and data["logit_lens"]["token"] == ["https://a"]


def run_cli(argv, index):
    parser = argparse.ArgumentParser(prog="ragsae")
    add_latent_parsers(parser.add_subparsers(dest="command", required=True), lambda args: index, LatentCatalog.load)
    args = parser.parse_args(argv)
    return args.func(args)


def test_latents_atlas_and_explain_commands(described, tmp_path, capsys):
    index, _, _, catalog, folder = described
    card = max(catalog, key=lambda c: c.tokens)
    word = clean_token(card.characteristic[0].token)
    assert run_cli(["latents", str(folder), "--search", word, "--limit", "200"], index) == 0
    assert f"#{card.latent} " in capsys.readouterr().out
    assert run_cli(["latents", str(folder), "--id", str(card.latent)], index) == 0
    out = capsys.readouterr().out
    assert f"Latent #{card.latent}: {card.label}" in out and "top contexts" in out
    assert run_cli(["latents", str(folder), "--id", str(card.latent), "--json"], index) == 0
    assert json.loads(capsys.readouterr().out)["label"] == card.label
    assert run_cli(["latents", str(folder)], index) == 0
    assert f"{len(catalog)} live latents of {catalog.num_latents}" in capsys.readouterr().out
    with pytest.raises(QueryError, match="does not exist"):
        run_cli(["latents", str(folder), "--id", "100000"], index)
    assert run_cli(["atlas", str(folder), "-o", str(tmp_path / "atlas.html")], index) == 0
    assert (tmp_path / "atlas.html").is_file() and "wrote" in capsys.readouterr().out
    query = "what is an axon terminal"
    assert run_cli(["explain", str(folder), query], index) == 0
    out = capsys.readouterr().out
    top = index.search(query, k=1)[0]
    assert f"Passage {top.passage_id}" in out and "sparse score" in out
    assert run_cli(["explain", str(folder), query, "--doc", top.doc_id, "--json"], index) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["doc_id"] == top.doc_id and sum(s["share"] for s in data["latents"]) == pytest.approx(1.0)
    with pytest.raises(IndexFolderError, match="missing"):
        run_cli(["latents", str(tmp_path)], index)


def test_describe_refuses_activations_of_other_passages(described):
    index, acts, _, _, _ = described
    with pytest.raises(ValueError, match="passages but activations"):
        describe_latents(index.llm, index.sae, index.passages[:-1], acts, index.config.capture)
    other = replace(index.config.capture, window=16)
    with pytest.raises(ValueError, match="other lengths"):
        describe_latents(index.llm, index.sae, index.passages, acts, other)


def test_atlas_renders_in_a_headless_browser(described, tmp_path, browser):
    _, _, _, catalog, _ = described
    path = write_atlas(catalog, tmp_path / "atlas.html")
    first = min(catalog, key=lambda c: (-c.tokens, c.latent))  # the list opens sorted by frequency
    page = browser.new_context().new_page()
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(path.as_uri())
    assert page.locator("#list li").count() == len(catalog)
    assert re.match(rf"#{first.latent}\s", page.locator("#card h2").inner_text())
    marks = page.locator("#card mark").evaluate_all("marks => marks.map(m => m.textContent)")
    assert marks == [c.token for c in first.contexts]
    page.fill("#q", clean_token(first.characteristic[0].token))
    shown = page.locator("#list li").evaluate_all("items => items.map(li => Number(li.dataset.id))")
    assert first.latent in shown and len(shown) < len(catalog)
    other = int(catalog.live[-1])
    page.evaluate(f"location.hash = 'latent-{other}'")
    page.wait_for_function(f"document.querySelector('#card h2').textContent.startsWith('#{other} ')")
    assert catalog.label(other) in page.locator("#card h2").inner_text()
    assert page.locator("#card .hist div").count() >= 1
    assert requests == [path.as_uri()], "the atlas must fetch nothing"
    assert not errors, errors


def test_an_index_describes_its_latents_at_build_and_labels_its_hits(described, tiny_llm, tmp_path, capsys):
    """The catalog `Index.build` gathers from the codes it pools equals a separate `describe_latents`
    pass; it is saved with the SAE version, checked on load, labels every hit, and a retrain describes
    the new SAE."""
    from ragsae.cli import main

    index, _, _, catalog, _ = described
    assert index.catalog is not None and index.catalog.to_json() == catalog.to_json()
    hits = index.search("what is an axon terminal", k=3)
    assert all(h.labels == [catalog.label(j) for j, _ in h.latents] and h.labels for h in hits)
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "sae" / "v1" / "latents.json").is_file()
    assert Index.latent_catalog(tmp_path / "idx").to_json() == catalog.to_json()
    reopened = Index.load(tmp_path / "idx", llm=tiny_llm)
    assert reopened.search("what is an axon terminal", k=3) == hits
    card = max(catalog, key=lambda c: c.tokens)
    assert main(["latents", str(tmp_path / "idx"), "--id", str(card.latent)]) == 0
    assert card.label in capsys.readouterr().out
    fresh = Index.load(tmp_path / "idx", llm=tiny_llm)
    fresh._catalog, fresh._catalog_loaded = catalog, True
    with open(tmp_path / "idx" / "sae" / "v1" / "latents.json", "a", encoding="utf-8") as handle:
        handle.write(" ")
    assert main(["latents", str(tmp_path / "idx")]) == 2
    assert "latents.json: checksum mismatch" in capsys.readouterr().err
    with pytest.raises(IndexFolderError, match=r"latents\.json: checksum mismatch"):
        Index.load(tmp_path / "idx", llm=tiny_llm)
    fresh.save(tmp_path / "again")
    record = fresh.retrain(epochs=1)
    assert record["latents"] is not None and fresh.catalog is not None
    assert Index.latent_catalog(tmp_path / "again").to_json() == fresh.catalog.to_json()
    assert fresh.catalog.source["sae_k"] == fresh.sae.config.k
