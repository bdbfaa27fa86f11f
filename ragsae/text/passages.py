"""Documents to passages: windows of a tokenizer's tokens, with character offsets into the document."""

from __future__ import annotations

from typing import Any

from .corpus import Document, Passage


def split_passages(documents: list[Document], tokenizer: Any, window: int, overlap: int) -> list[Passage]:
    """Split documents into windows of at most `window` tokens sharing `overlap` tokens.

    Offsets are character offsets into `Document.full_text`; a one-window document keeps its id.
    """
    passages: list[Passage] = []
    step = window - overlap
    for doc in documents:
        text = doc.full_text
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(spans) <= window:
            passages.append(Passage(doc.doc_id, doc.doc_id, text, 0, len(text), doc.title))
            continue
        for part, start in enumerate(range(0, len(spans) - overlap, step)):
            chunk = spans[start : start + window]
            lo, hi = chunk[0][0], chunk[-1][1]
            passages.append(Passage(f"{doc.doc_id}#{part}", doc.doc_id, text[lo:hi], lo, hi, doc.title))
    return passages
