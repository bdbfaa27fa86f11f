"""Property-based tests: arbitrary Unicode through build -> save -> load -> search, arbitrary damage to
every file of an index folder, arbitrary edits of every manifest field. Bounded in examples and time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TOY_DOCS, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragsae.errors import CorpusError, QueryError, RagsaeError
from ragsae.index import Index
from ragsae.storage import json_checksum

COMMON = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llm_dir):
    """A saved toy index (its SAE is reused by the round-trip property, so nothing trains per example)."""
    from ragsae.lm import load_llm

    config = tiny_config(tiny_llm_dir, feedback_passages=3)
    llm = load_llm(config.llm)
    folder = tmp_path_factory.mktemp("properties") / "idx"
    index = Index.build(TOY_DOCS, folder, config, llm=llm)
    return index, folder, config, llm


def hits(index: Index, query: str) -> list[tuple[str, str, float, list[tuple[int, float]]]]:
    return [(h.passage_id, h.doc_id, h.score, h.latents) for h in index.search(query, k=5)]


unicode_text = st.text(st.characters(codec="utf-8"), max_size=80) | st.text(max_size=40)


@settings(COMMON, max_examples=25)
@given(
    documents=st.lists(st.tuples(unicode_text, unicode_text), min_size=1, max_size=5),
    query=unicode_text,
)
def test_arbitrary_unicode_survives_build_save_load_search(base, tmp_path_factory, documents, query):
    index, folder, config, llm = base
    records = [{"_id": doc_id, "text": text} for doc_id, text in documents]
    path = tmp_path_factory.mktemp("roundtrip") / "idx"
    try:
        built = Index.build(records, path, config, sae=folder / "sae", llm=llm)
    except CorpusError:
        return  # refused by name: duplicate, empty or unwritable ids, empty or unencodable text
    loaded = Index.load(path, llm=llm)
    assert [p.passage_id for p in loaded.passages] == [p.passage_id for p in built.passages]
    assert [p.text for p in loaded.passages] == [p.text for p in built.passages]
    assert {p.doc_id for p in loaded.passages} == {r["_id"] for r in records if r["text"].strip()}
    try:
        expected = hits(built, query)
    except (QueryError, CorpusError):
        with pytest.raises((QueryError, CorpusError)):
            loaded.search(query)
        return
    assert hits(loaded, query) == expected


def index_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@settings(COMMON, max_examples=60)
@given(data=st.data())
def test_damaged_index_files_are_refused_by_name_or_give_the_original_results(base, tmp_path_factory, data):
    index, folder, _, llm = base
    expected = hits(index, "comma separated files")
    damaged = tmp_path_factory.mktemp("damaged") / "idx"
    shutil.copytree(folder, damaged)
    name = data.draw(st.sampled_from(index_files(folder)), label="file")
    blob = bytearray((damaged / name).read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "empty"]), label="damage")
    if how == "flip" and blob:
        at = data.draw(st.integers(0, len(blob) - 1), label="byte")
        blob[at] ^= data.draw(st.integers(1, 255), label="mask")
    elif how == "truncate":
        del blob[data.draw(st.integers(0, max(0, len(blob) - 1)), label="keep") :]
    elif how == "append":
        blob += data.draw(st.binary(min_size=1, max_size=16), label="junk")
    else:
        blob = bytearray()
    (damaged / name).write_bytes(bytes(blob))
    try:
        loaded = Index.load(damaged, llm=llm)
    except RagsaeError as error:
        assert str(error), "a refusal names what is wrong"
        return
    assert hits(loaded, "comma separated files") == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


def json_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts (lists are treated as leaves)."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            paths += json_paths(child, (*prefix, key))
    return paths


@settings(COMMON, max_examples=60)
@given(data=st.data())
def test_edited_manifest_fields_are_refused_by_name_or_give_the_original_results(base, tmp_path_factory, data):
    index, folder, _, llm = base
    expected = hits(index, "network sockets")
    damaged = tmp_path_factory.mktemp("edited") / "idx"
    shutil.copytree(folder, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    path = data.draw(st.sampled_from(json_paths(manifest)), label="field")
    owner = manifest
    for key in path[:-1]:
        owner = owner[key]
    if data.draw(st.booleans(), label="delete"):
        del owner[path[-1]]
    else:
        owner[path[-1]] = data.draw(json_values, label="value")
    # Without a new checksum the edit is damage: refused, or harmless. With one it is a deliberate
    # edit (a tool's): the value may be legal and change results, but a bad one is still refused by name.
    deliberate = data.draw(st.booleans(), label="recompute checksum")
    if deliberate:
        manifest["checksum"] = json_checksum(manifest)
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    try:
        found = hits(Index.load(damaged, llm=llm), "network sockets")
    except RagsaeError as error:
        assert str(error)
        return
    assert deliberate or found == expected
