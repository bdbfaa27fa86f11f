"""`ragsae export`: the JSONL vectors are the stored weights of the live passages, exactly; the CIFF file
parses back with the same postings (weights quantised as documented) and document records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TOY_DOCS, tiny_config

from ragsae import Index
from ragsae.cli import main
from ragsae.index.export import ciff_messages, export_index, quantise, read_ciff, stored_passages


@pytest.fixture(scope="module")
def index(tiny_llm, tiny_llm_dir, tmp_path_factory):
    """Two segments, one document deleted: the export must follow the rows the index searches."""
    path = tmp_path_factory.mktemp("export") / "index"
    built = Index.build(TOY_DOCS[:6], path, tiny_config(tiny_llm_dir), llm=tiny_llm, describe_latents=False)
    built.add(TOY_DOCS[6:])
    built.delete(["math"])
    return built


def live_rows(index: Index) -> list[int]:
    return sorted(r for rows in index.doc_rows.values() for r in rows)


def test_jsonl_vectors_are_the_stored_weights_of_the_live_passages(index, tmp_path, capsys):
    out = tmp_path / "codes.jsonl"
    assert main(["export", str(index.path), "--format", "jsonl", "-o", str(out)]) == 0
    rows = live_rows(index)
    assert json.loads(capsys.readouterr().out)["passages"] == len(rows)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [index.passages[r].passage_id for r in rows]
    assert [line["doc_id"] for line in lines] == [index.passages[r].doc_id for r in rows]
    assert "math" not in {line["doc_id"] for line in lines}
    stored = index.retriever.rows(rows)
    for i, line in enumerate(lines):
        lo, hi = stored.indptr[i], stored.indptr[i + 1]
        expected = {int(j): np.float32(w) for j, w in zip(stored.indices[lo:hi], stored.data[lo:hi]) if w != 0}
        assert {int(j): np.float32(w) for j, w in line["vector"].items()} == expected
        assert all(w > 0 for w in line["vector"].values())  # what rank_features accepts


def test_ciff_parses_back_with_the_stored_postings(index, tmp_path, capsys):
    out = tmp_path / "codes.ciff"
    assert main(["export", str(index.path), "--format", "ciff", "-o", str(out), "--scale", "50"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ciff = read_ciff(out)
    rows = live_rows(index)
    stored = index.retriever.rows(rows).tocsc()
    stored.eliminate_zeros()
    stored.sort_indices()
    expected = {
        str(j): list(zip(stored.indices[lo:hi].tolist(), quantise(stored.data[lo:hi], 50).tolist()))
        for j, (lo, hi) in enumerate(zip(stored.indptr[:-1], stored.indptr[1:]))
        if hi > lo
    }
    assert ciff.postings == expected
    assert summary["postings_lists"] == len(expected) == ciff.header.num_postings_lists
    lengths = [int(np.rint(s.lengths[i])) for s in index.segments for i in s.live]
    assert ciff.documents == [(d, index.passages[r].passage_id, n) for d, (r, n) in enumerate(zip(rows, lengths))]
    header = ciff.header
    assert (header.version, header.num_doc_records, header.total_docs) == (1, len(rows), len(rows))
    assert header.total_terms_in_collection == sum(lengths)
    assert "round(weight * 50)" in header.description


def read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def test_ciff_docids_are_gaps_as_the_format_says(index, tmp_path):
    """Read the postings lists by hand: each docid after the first is the difference from the previous."""
    out = tmp_path / "codes.ciff"
    export_index(index.path, out, "ciff")
    header_class, _, postings_class, _ = ciff_messages()
    data = out.read_bytes()
    size, position = read_varint(data, 0)
    header = header_class.FromString(data[position : position + size])
    decoded = read_ciff(out).postings
    assert header.num_postings_lists == len(decoded)
    checked = 0
    for _ in range(header.num_postings_lists):
        size, position = read_varint(data, position + size)
        plist = postings_class.FromString(data[position : position + size])
        gaps = [p.docid for p in plist.postings]
        assert np.cumsum(gaps).tolist() == [d for d, _ in decoded[plist.term]]
        checked += len(gaps) > 1 and any(g != d for g, (d, _) in zip(gaps, decoded[plist.term]))
    assert checked  # some list where gaps and docids differ, so the decoding was tested


def test_export_reads_the_folder_as_the_index_searches_it(index):
    stored = stored_passages(index.path)
    rows = live_rows(index)
    assert [p.passage_id for p in stored.passages] == [index.passages[r].passage_id for r in rows]
    np.testing.assert_array_equal(stored.weights.toarray(), index.retriever.rows(rows).toarray())


def test_a_truncated_ciff_file_is_a_clear_error(index, tmp_path):
    from ragsae import IndexFolderError

    out = tmp_path / "codes.ciff"
    export_index(index.path, out, "ciff")
    out.write_bytes(out.read_bytes()[:-3])
    with pytest.raises(IndexFolderError, match="codes.ciff"):
        read_ciff(out)
