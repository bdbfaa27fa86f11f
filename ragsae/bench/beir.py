"""BEIR-layout collections: corpus.jsonl, queries.jsonl and qrels/<split>.tsv."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import CorpusError
from ..text import Document, load_documents, read_jsonl


def read_queries(path: str | Path) -> dict[str, str]:
    """BEIR `queries.jsonl`: query id -> text."""
    return {doc.doc_id: doc.text for doc in read_jsonl(path)}


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (query-id, corpus-id, score; header row optional): qid -> {docid: grade}."""
    qrels: dict[str, dict[str, int]] = {}
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t"), 1):
            if not row or (line_no == 1 and row[0] in ("query-id", "query_id", "qid")):
                continue
            if len(row) < 3:
                raise CorpusError(f"{path}:{line_no}: expected 3 tab-separated fields, got {len(row)}")
            try:
                grade = int(float(row[-1]))
            except ValueError:
                raise CorpusError(f"{path}:{line_no}: score {row[-1]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[-2]] = grade
    if not qrels:
        raise CorpusError(f"{path}: no judgments")
    return qrels


def load_beir(
    folder: str | Path, split: str = "test"
) -> tuple[list[Document], dict[str, str], dict[str, dict[str, int]]]:
    """Documents (empty ones dropped), judged queries and qrels of a BEIR-layout folder."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not path.is_file():
            raise CorpusError(f"{path}: missing (expected BEIR layout: corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    documents = load_documents(folder / "corpus.jsonl", skip_empty=True)
    qrels = read_qrels(qrels_path)
    queries = {qid: text for qid, text in read_queries(folder / "queries.jsonl").items() if qid in qrels}
    if not queries:
        raise CorpusError(f"{folder}: no query in queries.jsonl has judgments in {qrels_path}")
    return documents, queries, {qid: qrels[qid] for qid in queries}
