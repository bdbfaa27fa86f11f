import json

import pytest

from ragsae.bench.beir import read_qrels, read_queries
from ragsae.errors import CorpusError
from ragsae.text import Document, fingerprint, load_documents, split_passages


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
