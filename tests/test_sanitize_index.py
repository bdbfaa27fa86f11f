"""Sanitisation wired into the index (issue 18): build, add, search, save and load with redact and hash
modes, what `store_text` keeps, the audit in the manifest, the salt, and a byte search of every file of
the index folder for the planted values."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import TOY_DOCS, tiny_config

from ragsae import Index
from ragsae.cli import main
from ragsae.config import SanitizeConfig
from ragsae.errors import ConfigError, IndexFolderError
from ragsae.generate import RAG
from ragsae.layout import MANIFEST_FILE, SALT_FILE
from ragsae.text import Document, Sanitizer

pytest.importorskip("presidio_analyzer")

EMAIL = "maria.garcia@acme-corp.com"
EMAIL_2 = "j.smith+news@stats.ox.ac.uk"
TITLE_EMAIL = "peter.parker@dailybugle.com"
CARD = "4111 1111 1111 1111"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
LONG_EMAIL = "olga.ivanova@northwind-traders.example.org"

FILLER = "The warehouse ships parcels on weekdays and the office closes early on public holidays. "
SECRET_DOCS = [
    {
        "_id": "billing",
        "title": "billing",
        "text": f"Invoices go out monthly. For billing questions write to {EMAIL} before Friday. "
        f"The card {CARD} was charged twice.",
    },
    {
        "_id": "deploy",
        "title": "deploy",
        "text": f"export AWS_ACCESS_KEY_ID={AWS_KEY} and the repository was cloned with {GITHUB_TOKEN} yesterday.",
    },
    {"_id": "support", "title": f"Mail from {TITLE_EMAIL}", "text": f"Contact: {EMAIL_2} about support tickets."},
    # Several passages (32-token windows): the value sits where a window edge may cut its placeholder.
    {"_id": "long", "title": "shipping", "text": FILLER * 3 + f"Complaints go to {LONG_EMAIL} please. " + FILLER * 3},
]
DOCUMENTS = SECRET_DOCS + TOY_DOCS
VALUES = [EMAIL, EMAIL_2, TITLE_EMAIL, CARD, CARD.replace(" ", ""), AWS_KEY, GITHUB_TOKEN, LONG_EMAIL]
AUDIT = {
    "texts": len(DOCUMENTS),
    "changed": len(SECRET_DOCS),
    "counts": {"API_KEY": 2, "CREDIT_CARD": 1, "EMAIL": 4},
}
SALT_VAR = "RAGSAE_TEST_SANITIZE_SALT"


def sanitized_config(tiny_llm_dir: Path, **sanitize) -> object:
    from dataclasses import replace

    return replace(tiny_config(tiny_llm_dir), sanitize=SanitizeConfig(**sanitize))


def leaks(folder: Path) -> list[str]:
    """'file: value' for every planted value found in the bytes of any file under `folder`."""
    found = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        for value in VALUES:
            for form in {value, value.lower(), value.upper()}:
                if form.encode("utf-8") in data or form.encode("utf-16-le") in data:
                    found.append(f"{file.relative_to(folder)}: {value}")
    return found


def text_leaks(text: str) -> list[str]:
    return [value for value in VALUES if value.lower() in text.lower()]


def stored_records(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for file in sorted(folder.glob("segments/*/passages.jsonl"))
        for line in file.read_text(encoding="utf-8").splitlines()
    ]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def redacted(tmp_path_factory, tiny_llm, tiny_llm_dir):
    folder = tmp_path_factory.mktemp("sanitize") / "redacted"
    index = Index.build(DOCUMENTS, folder, sanitized_config(tiny_llm_dir, mode="redact"), llm=tiny_llm)
    return index, folder


@pytest.fixture(scope="module")
def hashed(tmp_path_factory, tiny_llm, tiny_llm_dir):
    folder = tmp_path_factory.mktemp("sanitize") / "hashed"
    index = Index.build(DOCUMENTS, folder, sanitized_config(tiny_llm_dir, mode="hash"), llm=tiny_llm)
    return index, folder


@pytest.mark.parametrize("fixture", ["redacted", "hashed"])
def test_no_planted_value_is_anywhere_in_the_index(fixture, request, tiny_llm):
    index, folder = request.getfixturevalue(fixture)
    assert leaks(folder) == []  # every file: manifest, passages, docids, codes, FAISS, SAE, salt
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert text_leaks(json.dumps(manifest)) == []
    assert text_leaks(json.dumps(index.info())) == []
    for passage in index.passages:
        assert text_leaks(passage.text + passage.title) == []
    queries = [EMAIL, f"who owns card {CARD}", AWS_KEY, "billing questions", "support tickets"]
    for hits in index.batch_search(queries, k=len(index)).values():
        assert all(text_leaks(hit.text) == [] for hit in hits)
    assert any("<EMAIL" in p.text for p in index.passages) and any("<API_KEY" in p.text for p in index.passages)
    reloaded = Index.load(folder, llm=tiny_llm)
    assert all(text_leaks(p.text) == [] for p in reloaded.passages)


def test_the_activation_cache_holds_no_planted_value(tiny_llm, tiny_llm_dir, tmp_path):
    cache = tmp_path / "cache"
    config = sanitized_config(tiny_llm_dir, mode="redact")
    index = Index.build(DOCUMENTS, tmp_path / "idx", config, llm=tiny_llm, cache_dir=cache)
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached, "the build wrote no activation cache"
    assert leaks(cache) == [] and leaks(tmp_path / "idx") == []
    index.add([{"_id": "late", "text": f"Late mail for {EMAIL} and key {AWS_KEY}."}])  # add captures too
    assert leaks(cache) == [] and leaks(tmp_path / "idx") == []


def test_the_audit_counts_each_type_and_is_in_the_manifest(redacted, hashed):
    for index, folder in (redacted, hashed):
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        assert manifest["sanitize_audit"] == AUDIT
        assert manifest["config"]["sanitize"]["mode"] == index.config.sanitize.mode
        assert index.sanitize_audit.to_dict() == AUDIT
        assert index.info()["sanitize"]["audit"] == AUDIT
    assert json.loads((redacted[1] / MANIFEST_FILE).read_text())["salt_fingerprint"] is None
    fingerprint = json.loads((hashed[1] / MANIFEST_FILE).read_text())["salt_fingerprint"]
    assert fingerprint == hashed[0].sanitizer.salt_fingerprint and len(fingerprint) == 16


def test_info_command_shows_the_audit(redacted, capsys):
    assert main(["info", str(redacted[1])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and info["sanitize_audit"] == AUDIT


def test_hash_mode_query_by_an_email_finds_the_passage_holding_it(tiny_llm, tiny_llm_dir, tmp_path, monkeypatch):
    # A fixed salt: the placeholder's hex digits are tokens the query shares with one passage only, and which
    # tokens they are (so how the random tiny model ranks) must not change from run to run.
    monkeypatch.setenv(SALT_VAR, "a fixed salt for this test")
    config = sanitized_config(tiny_llm_dir, mode="hash", salt_env=SALT_VAR)
    index = Index.build(DOCUMENTS, tmp_path / "idx", config, llm=tiny_llm)
    placeholder = index.sanitize_query(EMAIL)
    assert placeholder.startswith("<EMAIL_") and placeholder == index.sanitize_query(EMAIL.upper())
    billing = next(p for p in index.passages if p.doc_id == "billing")
    assert placeholder in billing.text
    for query in (EMAIL, f"mail to {EMAIL}"):
        assert index.search(query, k=1)[0].doc_id == "billing", query


def test_redact_mode_queries_are_sanitised_before_encoding(redacted):
    index, _ = redacted
    assert index.sanitize_query(f"mail {EMAIL} now") == "mail <EMAIL> now"
    same = index.encode_queries([f"mail {EMAIL} now"]) != index.encode_queries(["mail <EMAIL> now"])
    assert same.nnz == 0


def test_queries_are_left_alone_when_turned_off(tiny_llm, tiny_llm_dir):
    config = sanitized_config(tiny_llm_dir, mode="redact", queries=False)
    index = Index.build(DOCUMENTS, config=config, llm=tiny_llm)
    assert index.sanitize_query(EMAIL) == EMAIL
    assert text_leaks(" ".join(p.text for p in index.passages)) == []


def test_add_sanitises_and_sums_the_audit_and_the_salt_stays_private(hashed, tiny_llm, tmp_path):
    index, folder = hashed
    assert (folder / SALT_FILE).is_file() and mode_of(folder / SALT_FILE) == 0o600
    copy = tmp_path / "copy"
    index.save(copy)
    assert mode_of(copy / SALT_FILE) == 0o600 and (copy / SALT_FILE).read_bytes() == (folder / SALT_FILE).read_bytes()
    grown = Index.load(copy, llm=tiny_llm)
    extra = "sales.contact@acme-corp.com"
    grown.add([{"_id": "sales", "text": f"Sales leads go to {extra} and to {EMAIL}."}])
    expected = dict(AUDIT, texts=AUDIT["texts"] + 1, changed=AUDIT["changed"] + 1)
    expected["counts"] = dict(AUDIT["counts"], EMAIL=AUDIT["counts"]["EMAIL"] + 2)
    assert grown.sanitize_audit.to_dict() == expected
    assert json.loads((copy / MANIFEST_FILE).read_text())["sanitize_audit"] == expected
    sales = next(p for p in grown.passages if p.doc_id == "sales")
    assert index.sanitize_query(EMAIL) in sales.text and extra not in sales.text  # the same salt as at build
    assert mode_of(copy / SALT_FILE) == 0o600
    grown.upsert([{"_id": "sales", "text": f"Sales leads now go to {AWS_KEY}."}])
    assert grown.sanitize_audit.counts["API_KEY"] == 3
    grown.delete(["support"])
    grown.compact()
    assert mode_of(copy / SALT_FILE) == 0o600
    assert leaks(copy) == [] and extra.encode() not in b"".join(p.read_bytes() for p in copy.rglob("*") if p.is_file())
    reloaded = Index.load(copy, llm=tiny_llm)
    assert reloaded.sanitize_audit == grown.sanitize_audit  # deleted documents stay counted
    # The reloaded index hashes with the build's salt (retrieval by a hashed value is tested with a fixed salt above:
    # with this fixture's random salt, how the random tiny model ranks changes from run to run).
    placeholder = reloaded.sanitize_query(EMAIL)
    assert placeholder == index.sanitize_query(EMAIL)
    assert "billing" in {p.doc_id for p in reloaded.passages if placeholder in p.text}


def test_drift_sanitises_without_counting(redacted):
    index, _ = redacted
    before = index.sanitize_audit
    report = index.drift([{"_id": "new", "text": f"Write to {EMAIL} or call about {AWS_KEY}."}])
    assert report["passages"] == 1 and index.sanitize_audit == before


def test_a_wrong_salt_from_the_environment_is_refused(tiny_llm, tiny_llm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(SALT_VAR, "the first salt, thirty-two bytes")
    folder = tmp_path / "env-salt"
    config = sanitized_config(tiny_llm_dir, mode="hash", salt_env=SALT_VAR)
    built = Index.build(DOCUMENTS[:6], folder, config, llm=tiny_llm)
    assert not (folder / SALT_FILE).exists()  # the salt stays in the environment
    assert leaks(folder) == [] and b"the first salt" not in (folder / MANIFEST_FILE).read_bytes()
    assert Index.load(folder, llm=tiny_llm).sanitize_query(EMAIL) == built.sanitize_query(EMAIL)
    monkeypatch.setenv(SALT_VAR, "another salt, also thirty-two bytes")
    with pytest.raises(IndexFolderError, match="not the one this index was built with"):
        Index.load(folder, llm=tiny_llm)
    monkeypatch.delenv(SALT_VAR)
    with pytest.raises(IndexFolderError, match=f"{SALT_VAR} is not set"):
        Index.load(folder, llm=tiny_llm)


def test_a_missing_or_replaced_salt_file_is_refused(hashed, tiny_llm, tmp_path):
    index, _ = hashed
    copy = tmp_path / "copy"
    index.save(copy)
    (copy / SALT_FILE).chmod(0o600)
    (copy / SALT_FILE).write_bytes(os.urandom(32))
    with pytest.raises(IndexFolderError, match="not the one this index was built with"):
        Index.load(copy, llm=tiny_llm)
    (copy / SALT_FILE).unlink()
    with pytest.raises(IndexFolderError, match="salt"):
        Index.load(copy, llm=tiny_llm)


def test_an_in_memory_hash_index_writes_its_salt_on_save(tiny_llm, tiny_llm_dir, tmp_path):
    index = Index.build(DOCUMENTS[:6], config=sanitized_config(tiny_llm_dir, mode="hash"), llm=tiny_llm)
    placeholder = index.sanitize_query(EMAIL)
    index.save(tmp_path / "saved")
    assert mode_of(tmp_path / "saved" / SALT_FILE) == 0o600
    assert Index.load(tmp_path / "saved", llm=tiny_llm).sanitize_query(EMAIL) == placeholder


def test_store_text_none_keeps_ids_and_offsets_only(tiny_llm, tiny_llm_dir, tmp_path):
    folder = tmp_path / "none"
    config = sanitized_config(tiny_llm_dir, mode="redact", store_text="none")
    index = Index.build(DOCUMENTS, folder, config, llm=tiny_llm)
    assert not index.stores_text
    records = stored_records(folder)
    assert records and all(r["text"] == "" and r["title"] == "" for r in records)
    assert leaks(folder) == []
    originals = {d["_id"]: Document(d["_id"], d["text"], d["title"]) for d in DOCUMENTS}
    hits = index.search("billing questions", k=len(index))
    assert hits and all(hit.text == "" for hit in hits)
    for hit in hits:  # the caller resolves a hit: passage id -> document id and offsets in the original
        passage = index.passage(hit.passage_id)
        assert passage.doc_id == hit.doc_id and 0 <= passage.char_start < passage.char_end
        assert passage.char_end <= len(originals[hit.doc_id].full_text)
    billing = [index.passage(p.passage_id) for p in index.passages if p.doc_id == "billing"]
    assert any(EMAIL in originals["billing"].full_text[p.char_start : p.char_end] for p in billing)
    with pytest.raises(ConfigError, match="store_text='none'"):
        RAG(index).ask("Where do billing questions go?")
    with pytest.raises(ConfigError, match="store_text='none'"):
        index.retrain(epochs=1)


def test_store_text_full_keeps_the_original_while_the_llm_reads_placeholders(tiny_llm, tiny_llm_dir, tmp_path):
    config = sanitized_config(tiny_llm_dir, mode="redact", store_text="full")
    index = Index.build(DOCUMENTS, tmp_path / "full", config, llm=tiny_llm)
    originals = {d["_id"]: Document(d["_id"], d["text"], d["title"]) for d in DOCUMENTS}
    for passage in index.passages:  # offsets into the original document, placeholders cut by a window taken whole
        assert passage.text == originals[passage.doc_id].full_text[passage.char_start : passage.char_end]
    assert any(LONG_EMAIL in p.text for p in index.passages if p.doc_id == "long")
    assert any(EMAIL in p.text for p in index.passages if p.doc_id == "billing")
    assert all(p.title == f"Mail from {TITLE_EMAIL}" for p in index.passages if p.doc_id == "support")
    # The codes were computed from the sanitised text: those of a build that stores it, bit for bit.
    redacted = Index.build(DOCUMENTS, config=sanitized_config(tiny_llm_dir, mode="redact"), llm=tiny_llm, sae=index.sae)
    assert (index.codes != redacted.codes).nnz == 0
    assert [p.passage_id for p in index.passages] == [p.passage_id for p in redacted.passages]
    assert index.sanitize_audit == redacted.sanitize_audit


def test_retrain_reads_sanitised_text_when_the_original_is_stored(tiny_llm, tiny_llm_dir, monkeypatch):
    import ragsae.index.index as index_module

    config = sanitized_config(tiny_llm_dir, mode="redact", store_text="full")
    index = Index.build(DOCUMENTS, config=config, llm=tiny_llm)
    read: list[str] = []
    capture = index_module.passage_activations

    def spy(llm, texts, *args, **kwargs):
        read.extend(texts)
        return capture(llm, texts, *args, **kwargs)

    monkeypatch.setattr(index_module, "passage_activations", spy)
    index.retrain(epochs=1)
    assert len(read) == len(index) and text_leaks(" ".join(read)) == []
    assert any(EMAIL in p.text for p in index.passages)  # what is stored is unchanged


def test_passages_of_a_sanitised_document_cover_its_sanitised_text(redacted):
    index, _ = redacted
    sanitizer = Sanitizer(SanitizeConfig(mode="redact"))
    long = Document("long", SECRET_DOCS[3]["text"], SECRET_DOCS[3]["title"])
    clean, _ = sanitizer.sanitize_document(long)
    passages = [p for p in index.passages if p.doc_id == "long"]
    assert len(passages) > 1
    assert all(p.text == clean.full_text[p.char_start : p.char_end] for p in passages)


def test_off_mode_writes_no_salt_and_no_audit(tiny_llm, tiny_llm_dir, tmp_path):
    index = Index.build(DOCUMENTS[:6], tmp_path / "off", tiny_config(tiny_llm_dir), llm=tiny_llm)
    manifest = json.loads((tmp_path / "off" / MANIFEST_FILE).read_text())
    assert manifest["sanitize_audit"] is None and manifest["salt_fingerprint"] is None
    assert not (tmp_path / "off" / SALT_FILE).exists() and index.sanitizer is None
    assert index.sanitize_query(EMAIL) == EMAIL
    assert any(EMAIL in p.text for p in index.passages)


def test_cli_build_and_add_take_the_sanitisation_flags(tiny_llm_dir, tmp_path, capsys):
    corpus, more = tmp_path / "corpus.jsonl", tmp_path / "more.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    more.write_text(json.dumps({"_id": "more", "text": f"Ask {EMAIL} or use key {AWS_KEY} for the card {CARD}."}))
    folder = tmp_path / "index"
    tiny = ["--model", str(tiny_llm_dir), "--layer", "1", "--num-latents", "64", "--sae-k", "4", "--epochs", "1"]
    tiny += ["--sae-batch-size", "32", "--window", "32", "--overlap", "4"]
    flags = ["--sanitize", "redact", "--store-text", "redacted", "--sanitize-entities", "email,CREDIT_CARD"]
    assert main(["build", str(corpus), "-o", str(folder), *tiny, *flags, "--no-sanitize-queries"]) == 0
    built = json.loads(capsys.readouterr().out)["sanitize"]
    assert built["mode"] == "redact" and built["entities"] == ["EMAIL", "CREDIT_CARD"] and not built["queries"]
    assert built["audit"]["counts"] == {"CREDIT_CARD": 1, "EMAIL": 4}  # API keys were not asked for
    assert main(["add", str(folder), str(more), "--sanitize", "hash"]) == 2
    assert "built with mode='redact'" in capsys.readouterr().err
    assert main(["add", str(folder), str(more), "--sanitize-entities", "CREDIT_CARD,EMAIL"]) == 0
    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sanitize_audit"] == {
        "texts": len(DOCUMENTS) + 1,
        "changed": 4,
        "counts": {"CREDIT_CARD": 2, "EMAIL": 5},
    }
    assert info["config"]["sanitize"]["store_text"] == "redacted"
    records = stored_records(folder)
    assert text_leaks(json.dumps(records)) == [AWS_KEY]  # the one type left out stays, as asked
    assert main(["build", str(corpus), "-o", str(tmp_path / "bad"), *tiny, "--store-text", "redacted"]) == 2
    assert "needs mode" in capsys.readouterr().err
    assert main(["build", str(corpus), "-o", str(tmp_path / "bad"), *tiny, "--sanitize-entities", "NAME"]) == 2
    assert "unknown type" in capsys.readouterr().err
