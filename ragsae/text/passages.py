"""Documents to passages: windows of a tokenizer's tokens, with character offsets into the document."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, CorpusError
from .corpus import Document, Passage


def split_passages(documents: list[Document], tokenizer: Any, window: int, overlap: int) -> list[Passage]:
    """Split documents into windows of at most `window` tokens sharing `overlap` tokens.

    Offsets are character offsets into `Document.full_text`; a one-window document keeps its id, and
    a longer one's passages are `ID#0`, `ID#1`, ...

    Passage ids are unique, or this raises a CorpusError naming both documents: a document id that
    is `ID#` plus digits beside a long document `ID` would give two passages one id (and hits that
    point at the wrong document). Such a collision is refused rather than renamed, because passage
    ids must stay predictable from document ids (`ID` or `ID#N`) for whoever reads hits, runs and
    `docids.txt`; renaming one document's passages behind the user's back would break that.

    Raises:
        ConfigError: `window` below 1 or `overlap` outside [0, window); a step of zero or less would
            fail or silently drop every long document.
        CorpusError: two documents with one id, or a passage id that is another document's id.
    """
    if window < 1 or not 0 <= overlap < window:
        raise ConfigError(
            f"passages need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}"
        )
    doc_ids: set[str] = set()
    for doc in documents:
        if doc.doc_id in doc_ids:
            raise CorpusError(f"document id {doc.doc_id!r} appears twice, so its passage ids would too")
        doc_ids.add(doc.doc_id)
    # A short document's passage id is its own id, so a clash between passages of two documents is
    # always a generated `ID#N` equal to another document's id: generated ids cannot clash with each
    # other, as `ID` is everything before the last '#' of `ID#N` and document ids are unique.
    passages: list[Passage] = []
    step = window - overlap
    for doc in documents:
        text = doc.full_text
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(spans) <= window:
            passages.append(Passage(doc.doc_id, doc.doc_id, text, 0, len(text), doc.title))
            continue
        for part, start in enumerate(range(0, len(spans) - overlap, step)):
            passage_id = f"{doc.doc_id}#{part}"
            if passage_id in doc_ids:
                raise CorpusError(
                    f"passage {passage_id!r} of document {doc.doc_id!r} has the id of document {passage_id!r}: "
                    "ids with '#' followed by digits collide with passage numbering; rename one of the two documents"
                )
            chunk = spans[start : start + window]
            lo, hi = chunk[0][0], chunk[-1][1]
            passages.append(Passage(passage_id, doc.doc_id, text[lo:hi], lo, hi, doc.title))
    return passages
