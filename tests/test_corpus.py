import json
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragsae.bench.beir import read_qrels, read_queries
from ragsae.errors import ConfigError, CorpusError
from ragsae.text import Document, fingerprint, load_documents, read_jsonl, split_passages
from ragsae.text.corpus import LINE_BREAKS


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_and_beir_folder(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "a", "title": "T", "text": "body"}, {"id": 7, "text": "x"}])
    for source in (tmp_path / "corpus.jsonl", tmp_path):
        docs = load_documents(source)
        assert [d.doc_id for d in docs] == ["a", "7"]
        assert docs[0].full_text == "T\nbody"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"_id": "a", "text": "ok"}\n{"_id": "b", "text": \n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: malformed JSON"):
        load_documents(path)


def test_missing_field_names_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "body": "no text field"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: missing or non-string field 'text'"):
        load_documents(path)


def test_empty_document_and_corpus(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": "fine"}, {"_id": "b", "text": "   "}])
    with pytest.raises(CorpusError, match=r"document 'b' is empty"):
        load_documents(path)
    assert [d.doc_id for d in load_documents(path, skip_empty=True)] == ["a"]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match="has no documents"):
        load_documents(tmp_path / "empty.jsonl")
    with pytest.raises(CorpusError, match="has no documents"):
        load_documents([])


def test_duplicate_ids_and_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="appears twice"):
        load_documents([{"_id": "x", "text": "a"}, {"_id": "x", "text": "b"}])
    with pytest.raises(CorpusError, match="no such file or folder"):
        load_documents(tmp_path / "nope")


def test_folder_and_iterables(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert [d.doc_id for d in load_documents(tmp_path)] == ["a.txt", "sub/b.md"]
    docs = load_documents(["one", Document("d", "two"), {"_id": "e", "text": "three"}])
    assert [d.doc_id for d in docs] == ["0", "d", "e"]


def test_split_passages_windows_and_offsets(tokenizer):
    text = " ".join(f"word{i}" for i in range(300))
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    passages = split_passages([Document("long", text), Document("short", "tiny text")], tokenizer, 64, 16)
    long = [p for p in passages if p.doc_id == "long"]
    assert len(long) == -(-(n_tokens - 16) // 48)
    for p in long:
        assert text[p.char_start : p.char_end] == p.text
        assert len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 64 + 2
    assert long[0].char_start == 0 and long[-1].char_end == len(text)
    assert long[1].char_start < long[0].char_end  # overlap
    assert passages[-1].passage_id == "short"


def test_qrels_and_queries(tmp_path):
    (tmp_path / "q.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t2\n1\td2\t0\n2\td3\t1\n")
    assert read_qrels(tmp_path / "q.tsv") == {"1": {"d1": 2, "d2": 0}, "2": {"d3": 1}}
    (tmp_path / "bad.tsv").write_text("1\td1\n")
    with pytest.raises(CorpusError, match=r"bad\.tsv:1: expected 3"):
        read_qrels(tmp_path / "bad.tsv")
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "1", "text": "what"}])
    assert read_queries(tmp_path / "queries.jsonl") == {"1": "what"}


def test_fingerprint_is_order_sensitive():
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"])
    assert fingerprint(["a", "b"]) == fingerprint(iter(["a", "b"]))


# --- bad input is refused with where it is, never built into a broken index ---

LONG_TEXT = " ".join(f"word{i}" for i in range(600))  # several 256-token windows


def test_line_breaks_are_what_splitlines_splits_on():
    # docids.txt is read back with str.splitlines, so the refused set must be exactly its separators.
    splitting = {chr(c) for c in range(sys.maxunicode + 1) if len(f"a{chr(c)}b".splitlines()) > 1}
    assert set(LINE_BREAKS) == splitting


@pytest.mark.parametrize("brk", list(LINE_BREAKS))
def test_id_with_line_break_refused_naming_file_line_and_item(tmp_path, brk):
    bad_id = f"a{brk}b"
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "ok", "text": "fine"}, {"_id": bad_id, "text": "t"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: document id .* holds a line break") as error:
        load_documents(path)
    assert repr(bad_id) in str(error.value)
    for item in ({"_id": bad_id, "text": "t"}, Document(bad_id, "t")):
        with pytest.raises(CorpusError, match=r"^item 1: document id .* holds a line break"):
            load_documents([{"_id": "ok", "text": "fine"}, item])


def test_folder_file_name_with_line_break_refused(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b\nc.txt").write_text("beta")
    with pytest.raises(CorpusError, match=r"c\.txt'?: document id 'b\\nc\.txt' \(file name\) holds a line break"):
        load_documents(tmp_path)


def test_folder_file_name_not_utf8_refused(tmp_path):
    try:
        (tmp_path / os.fsdecode(b"\xff.txt")).write_text("body")
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    with pytest.raises(CorpusError, match=r"file name of document '\\udcff\.txt' holds an unpaired surrogate"):
        load_documents(tmp_path)


def test_empty_id_refused(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "", "text": "t"}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: empty document id \(field '_id'\)"):
        load_documents(path)
    with pytest.raises(CorpusError, match=r"item 0: empty document id"):
        load_documents([Document("", "t")])


def test_number_ids_kept_other_id_types_refused(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": 7, "text": "a"}, {"id": 1.5, "text": "b"}])
    assert [d.doc_id for d in load_documents(path)] == ["7", "1.5"]
    for bad, kind in ((None, "null"), ([1], "list"), ({"a": 1}, "dict"), (True, "bool")):
        path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "ok", "text": "a"}, {"_id": bad, "text": "b"}])
        with pytest.raises(CorpusError, match=rf"c\.jsonl:2: id field '_id' must be a string or a number, got {kind}"):
            load_documents(path)
    with pytest.raises(CorpusError, match=r"item 0: Document field 'doc_id' must be a string, got int"):
        load_documents([Document(5, "t")])  # type: ignore[arg-type]


def test_title_null_is_empty_and_bad_types_refused(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "title": None, "text": "body"}])
    assert load_documents(path)[0].full_text == "body"
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "title": 0, "text": "body"}])
    with pytest.raises(
        CorpusError, match=r"c\.jsonl:1: field 'title' must be a string or null \(document 'a', got int"
    ):
        load_documents(path)
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "a", "text": 12}])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: missing or non-string field 'text' \(document 'a', got int"):
        load_documents(path)


@pytest.mark.parametrize("field", ["_id", "text", "title"])
def test_unpaired_surrogate_refused_naming_line_and_field(tmp_path, field):
    record = {"_id": "a", "title": "T", "text": "body"}
    record[field] += "\ud800"
    path = write_jsonl(tmp_path / "c.jsonl", [{"_id": "ok", "text": "fine"}, record])  # written as a \ud800 escape
    with pytest.raises(CorpusError, match=rf"c\.jsonl:2: field '{field}' of document .* unpaired surrogate \(U\+D800"):
        load_documents(path)


def test_unpaired_surrogate_in_iterables_refused():
    with pytest.raises(CorpusError, match=r"item 1: field 'text' of document '1' holds an unpaired surrogate"):
        load_documents(["fine", "bad \udfff"])
    with pytest.raises(CorpusError, match=r"item 0: field 'title' of document 'd' holds an unpaired surrogate"):
        load_documents([Document("d", "t", "\udc80")])
    with pytest.raises(CorpusError, match=r"item 0: field 'contents' of document 'd'"):
        load_documents([{"_id": "d", "contents": "\ud83d x"}])


def test_non_utf8_jsonl_names_file_and_line_and_streams(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(
        CorpusError, match=r"c\.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 25 of the line\)"
    ):
        load_documents(path)
    documents = read_jsonl(path)
    assert next(documents).doc_id == "a"  # read line by line: line 1 comes before line 2 fails


def test_jsonl_with_byte_order_mark_accepted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"_id": "a", "text": "ok"}\n')
    assert [d.doc_id for d in load_documents(path)] == ["a"]
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfbody")
    (tmp_path / "c.jsonl").unlink()
    assert load_documents(tmp_path)[0].text == "body"


def test_jsonl_lines_end_at_newline_only(tmp_path):
    path = tmp_path / "c.jsonl"
    text = "one\u2028two\x85three"  # raw in the file with ensure_ascii=False; not line ends in JSONL
    path.write_text(json.dumps({"_id": "a", "text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_documents(path)[0].text == text


def test_json_too_deep_or_too_long_a_number_is_malformed(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: malformed JSON"):
        load_documents(path)
    path.write_text('{"_id": ' + "9" * 5000 + ', "text": "t"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: malformed JSON"):
        load_documents(path)


def test_unreadable_sources_refused(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.jsonl: cannot read"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
    with pytest.raises(CorpusError, match="got a mapping"):
        load_documents({"_id": "a", "text": "t"})
    with pytest.raises(CorpusError, match=r"item 1: expected a Document, a dict or a string, got int"):
        load_documents(["a", 3])


def test_passage_id_colliding_with_document_id_refused(tokenizer):
    for documents in (
        [Document("x", LONG_TEXT), Document("x#0", "short")],
        [Document("x#0", "short"), Document("x", LONG_TEXT)],
        [Document("x#1", LONG_TEXT), Document("x", LONG_TEXT)],
    ):
        with pytest.raises(CorpusError, match=r"passage 'x#\d' of document 'x' has the id of document 'x#\d'.*'#'"):
            split_passages(documents, tokenizer, 256, 32)
    with pytest.raises(CorpusError, match="'d' appears twice"):
        split_passages([Document("d", "one"), Document("d", "two")], tokenizer, 256, 32)
    # '#' and digits alone are fine where no document of the prefix is split.
    passages = split_passages(
        [Document("x#0", LONG_TEXT), Document("y", "short"), Document("y#0", "s")], tokenizer, 256, 32
    )
    ids = [p.passage_id for p in passages]
    assert ids[:2] == ["x#0#0", "x#0#1"] and ids[-2:] == ["y", "y#0"] and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("window", "overlap"), [(64, 64), (64, 100), (0, 0), (64, -1)])
def test_split_passages_refuses_a_step_below_one(tokenizer, window, overlap):
    with pytest.raises(ConfigError, match="overlap < window"):
        split_passages([Document("long", LONG_TEXT)], tokenizer, window, overlap)


def test_fingerprint_odd_input():
    assert fingerprint(["\ud800"]) != fingerprint(["\udfff"])  # hashes, does not crash
    assert fingerprint(["caf\u00e9"]) == fingerprint(iter(["caf\u00e9"]))
    with pytest.raises(TypeError):
        fingerprint("ab")
    with pytest.raises(TypeError):
        fingerprint([b"ab"])  # type: ignore[list-item]


# --- properties: any input loads exactly or raises CorpusError ---

# Mostly arbitrary text, with the characters that matter here made common (surrogates, line breaks, '#').
ODD = st.sampled_from(list(LINE_BREAKS) + ["\ud800", "\udc00", "\ud83d", "\ude00", "#", "0", " ", "\ufeff", '"'])
TEXT = st.text(st.one_of(st.characters(exclude_categories=()), ODD), max_size=20)


def assert_indexable(documents, records):
    assert [(d.doc_id, d.text) for d in documents] == [(r["_id"], r["text"]) for r in records]
    for doc in documents:
        assert (doc.doc_id + "\n").splitlines() == [doc.doc_id]  # one line of docids.txt
        doc.full_text.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4))
def test_load_documents_is_exact_or_corpus_error(pairs):
    records = [{"_id": doc_id, "text": text} for doc_id, text in pairs]
    for source in (records, [Document(r["_id"], r["text"]) for r in records]):
        try:
            documents = load_documents(source)
        except CorpusError:
            continue
        assert_indexable(documents, records)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4), st.booleans())
def test_jsonl_round_trip_is_exact_or_corpus_error(tmp_path_factory, pairs, ensure_ascii):
    records = [{"_id": doc_id, "text": text} for doc_id, text in pairs]
    path = tmp_path_factory.mktemp("jsonl") / "c.jsonl"
    # Lone surrogates written raw (ensure_ascii=False) are not UTF-8: the reader must say so by line.
    lines = "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records)
    path.write_bytes(lines.encode("utf-8", "surrogatepass"))
    try:
        documents = load_documents(path)
    except CorpusError:
        return
    assert_indexable(documents, records)
