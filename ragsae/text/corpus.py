"""Corpora in, documents out: JSONL (BEIR layout included), folders of text files, iterables."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorpusError

ID_FIELDS = ("_id", "id", "doc_id", "docid")
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    """One source document."""

    doc_id: str
    text: str
    title: str = ""

    @property
    def full_text(self) -> str:
        """Title and body, as BEIR evaluations join them (the title stays even where the body repeats it)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Passage:
    """A token window of a document, with where it came from."""

    passage_id: str
    doc_id: str
    text: str
    char_start: int
    char_end: int
    title: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "passage_id": self.passage_id,
            "doc_id": self.doc_id,
            "text": self.text,
            "char_start": self.char_start,
            "char_end": self.char_end,
            "title": self.title,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Passage:
        return cls(**{k: data[k] for k in ("passage_id", "doc_id", "text", "char_start", "char_end", "title")})


def _record_to_document(record: Any, where: str) -> Document:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    doc_id = next((record[f] for f in ID_FIELDS if f in record), None)
    if doc_id is None:
        raise CorpusError(f"{where}: missing id field (one of {', '.join(ID_FIELDS)})")
    text = record.get("text", record.get("contents"))
    if not isinstance(text, str):
        raise CorpusError(f"{where}: missing or non-string field 'text' (document {doc_id!r})")
    title = record.get("title") or ""
    if not isinstance(title, str):
        raise CorpusError(f"{where}: field 'title' must be a string (document {doc_id!r})")
    return Document(str(doc_id), text, title)


def read_jsonl(path: str | Path) -> Iterator[Document]:
    """Documents of a JSONL file: one object per line with an id, `text` and optional `title`."""
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CorpusError(f"{path}:{line_no}: malformed JSON ({error.msg} at column {error.colno})") from None
            yield _record_to_document(record, f"{path}:{line_no}")


def read_folder(path: str | Path) -> Iterator[Document]:
    """Every .txt / .md file under a folder; the id is the path relative to it."""
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        yield Document(file.relative_to(root).as_posix(), text)


def iter_documents(source: str | Path | Iterable[Any]) -> Iterator[Document]:
    """Documents from a JSONL file, a BEIR folder (corpus.jsonl), a folder of text files or an iterable.

    Iterables may hold `Document`s, dicts (as JSONL records) or plain strings (ids are positions).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            yield from read_jsonl(path)
        elif (path / "corpus.jsonl").is_file():
            yield from read_jsonl(path / "corpus.jsonl")
        elif path.is_dir():
            yield from read_folder(path)
        else:
            raise CorpusError(f"{path}: no such file or folder")
        return
    for position, item in enumerate(source):
        if isinstance(item, Document):
            yield item
        elif isinstance(item, str):
            yield Document(str(position), item)
        else:
            yield _record_to_document(item, f"item {position}")


def load_documents(source: str | Path | Iterable[Any], skip_empty: bool = False) -> list[Document]:
    """All documents of `source`, checked: unique ids, no empty text (unless skipped), not empty."""
    documents: list[Document] = []
    seen: set[str] = set()
    for doc in iter_documents(source):
        if not doc.full_text.strip():
            if skip_empty:
                continue
            raise CorpusError(f"document {doc.doc_id!r} is empty (pass skip_empty=True to drop empty documents)")
        if doc.doc_id in seen:
            raise CorpusError(f"document id {doc.doc_id!r} appears twice")
        seen.add(doc.doc_id)
        documents.append(doc)
    if not documents:
        raise CorpusError(f"corpus {source if isinstance(source, (str, Path)) else '(iterable)'} has no documents")
    return documents


def fingerprint(texts: Iterable[str]) -> str:
    """Order-sensitive SHA-256 of a sequence of texts (for caches and SAE metadata)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()
