"""Corpora in, documents out: JSONL (BEIR layout included), folders of text files, iterables.

Every document that leaves a reader is checked, so that bad input fails here, naming the file and
line (JSONL), the file (folder) or the item (iterable), instead of building an index that cannot be
written or loaded: ids are non-empty and hold no line break (`docids.txt` keeps one id per line),
and no field holds an unpaired surrogate (those cannot be written as UTF-8).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from ..errors import CorpusError

ID_FIELDS = ("_id", "id", "doc_id", "docid")
TEXT_SUFFIXES = (".txt", ".md")
# Everything `str.splitlines` splits on; the index reads `docids.txt` back with it, so an id holding
# one of these would come back as two ids (or an empty one) and the index would never load.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK = re.compile(f"[{re.escape(LINE_BREAKS)}]")


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


def _show(path: str | PathLike[str]) -> str:
    """A path as an error message can print it on one line: as is, or as a repr when it holds a line
    break, a control character or an unpaired surrogate (a file name that is not UTF-8)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _kind(value: Any) -> str:
    """A value's type as an error message names it (JSON's `null` for None)."""
    return "null" if value is None else type(value).__name__


def _check_encodable(value: str, where: str, label: str, doc_id: str) -> None:
    """Refuse a string that holds an unpaired surrogate: UTF-8 (index files, the tokenizer) cannot hold it.

    Python strings and JSON `\\ud800` escapes can both carry one; strict UTF-8 encoding fails on
    nothing else, so its error locates the surrogate.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(value[error.start])
        raise CorpusError(
            f"{where}: {label} of document {doc_id!r} holds an unpaired surrogate "
            f"(U+{code:04X} at character {error.start}), which is not encodable as UTF-8"
        ) from None


def _checked(doc: Document, where: str, id_label: str, text_label: str = "field 'text'") -> Document:
    """`doc` if it can go into an index, else a CorpusError naming `where` and the field.

    Args:
        doc: a document from a reader or an iterable.
        where: `FILE:LINE`, `FILE` or `item N`, the start of each message.
        id_label: where the id came from (`field '_id'`, `file name`), for the messages.
        text_label: where the text came from (`field 'contents'` for such records).
    """
    for field in ("doc_id", "text", "title"):
        value = getattr(doc, field)
        if not isinstance(value, str):
            raise CorpusError(f"{where}: Document field {field!r} must be a string, got {_kind(value)}")
    if not doc.doc_id:
        raise CorpusError(f"{where}: empty document id ({id_label})")
    line_break = _LINE_BREAK.search(doc.doc_id)
    if line_break:
        raise CorpusError(
            f"{where}: document id {doc.doc_id!r} ({id_label}) holds a line break {line_break.group()!r}, "
            "which the index's docids.txt (one id per line) cannot hold"
        )
    _check_encodable(doc.doc_id, where, id_label, doc.doc_id)
    _check_encodable(doc.text, where, text_label, doc.doc_id)
    _check_encodable(doc.title, where, "field 'title'", doc.doc_id)
    return doc


def _record_to_document(record: Any, where: str) -> Document:
    """A JSON object (or dict) with an id, `text` (or `contents`) and optional `title` as a checked Document."""
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {_kind(record)}")
    id_field = next((f for f in ID_FIELDS if f in record), None)
    if id_field is None:
        raise CorpusError(f"{where}: missing id field (one of {', '.join(ID_FIELDS)})")
    raw_id = record[id_field]
    # Numbers keep working as their str(); null, true/false, lists and objects are mistakes, not ids.
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, numbers.Real)):
        raise CorpusError(f"{where}: id field {id_field!r} must be a string or a number, got {_kind(raw_id)}")
    doc_id = str(raw_id)
    text = record.get("text", record.get("contents"))
    if not isinstance(text, str):
        raise CorpusError(f"{where}: missing or non-string field 'text' (document {doc_id!r}, got {_kind(text)})")
    title = record.get("title")
    if title is None:
        title = ""
    elif not isinstance(title, str):
        raise CorpusError(f"{where}: field 'title' must be a string or null (document {doc_id!r}, got {_kind(title)})")
    text_field = "text" if "text" in record else "contents"
    return _checked(Document(doc_id, text, title), where, f"field {id_field!r}", f"field {text_field!r}")


def _parse_json(line: str, where: str) -> Any:
    """One JSONL line parsed, or a CorpusError naming `where`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
    except ValueError as error:  # e.g. an integer past Python's digit limit
        raise CorpusError(f"{where}: malformed JSON ({error})") from None
    except RecursionError:
        raise CorpusError(f"{where}: malformed JSON (nested too deeply)") from None


def read_jsonl(path: str | Path) -> Iterator[Document]:
    """Documents of a JSONL file: one object per line with an id, `text` and optional `title`.

    Reads line by line (files may be large). Lines end at `\\n` only, as JSONL defines them, and each
    is decoded on its own so a bad byte sequence names its line; a UTF-8 byte order mark is skipped.
    """
    path = Path(path)
    shown = _show(path)
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise CorpusError(f"{shown}: cannot read ({error.strerror or error})") from None
    with handle:
        for line_no, raw in enumerate(handle, 1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            where = f"{shown}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(
                    f"{where}: not UTF-8 text ({error.reason} at byte {error.start} of the line)"
                ) from None
            if not line.strip():
                continue
            yield _record_to_document(_parse_json(line, where), where)


def read_folder(path: str | Path) -> Iterator[Document]:
    """Every .txt / .md file under a folder; the id is the path relative to it.

    A UTF-8 byte order mark at the start of a file is dropped, as it is no part of the text.
    """
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        where = _show(file)
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise CorpusError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise CorpusError(f"{where}: cannot read ({error.strerror or error})") from None
        yield _checked(Document(file.relative_to(root).as_posix(), text), where, "file name")


def iter_documents(source: str | Path | Iterable[Any]) -> Iterator[Document]:
    """Documents from a JSONL file, a BEIR folder (corpus.jsonl), a folder of text files or an iterable.

    Iterables may hold `Document`s, dicts (as JSONL records) or plain strings (ids are positions).
    Every document is checked as the module docstring says; errors name the item's position.
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
            raise CorpusError(f"{_show(path)}: no such file or folder")
        return
    if isinstance(source, Mapping):
        # Iterating a mapping gives its keys: they would silently become the documents' texts.
        raise CorpusError("corpus: expected a path or an iterable of documents, got a mapping (pass a list of records)")
    for position, item in enumerate(source):
        where = f"item {position}"
        if isinstance(item, Document):
            yield _checked(item, where, "field 'doc_id'")
        elif isinstance(item, str):
            yield _checked(Document(str(position), item), where, "position")
        elif isinstance(item, dict):
            yield _record_to_document(item, where)
        else:
            raise CorpusError(f"{where}: expected a Document, a dict or a string, got {_kind(item)}")


def load_documents(source: str | Path | Iterable[Any], skip_empty: bool = False) -> list[Document]:
    """All documents of `source`, checked: unique ids, no empty text (unless skipped), not empty.

    On top of the per-document checks of `iter_documents` (ids fit one line of `docids.txt`, text is
    UTF-8 encodable), so that bad input fails here rather than as a broken index.
    """
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
        raise CorpusError(
            f"corpus {_show(source) if isinstance(source, (str, Path)) else '(iterable)'} has no documents"
        )
    return documents


def fingerprint(texts: Iterable[str]) -> str:
    """Order-sensitive SHA-256 of a sequence of texts (for caches and SAE metadata).

    Total on every `str`: unpaired surrogates are hashed as their code points (`surrogatepass`, which
    changes nothing for valid text) rather than crashing a cache lookup.
    """
    if isinstance(texts, str):
        # A bare string iterates as characters: a different fingerprint, silently.
        raise TypeError("fingerprint() takes an iterable of texts, not one str")
    digest = hashlib.sha256()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"fingerprint() takes texts (str), got {type(text).__name__}")
        digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return digest.hexdigest()
