"""Text stage: corpora read into documents, documents split into passages, stopword lists."""

from .corpus import Document, Passage, fingerprint, iter_documents, load_documents, read_folder, read_jsonl
from .passages import split_passages
from .stopwords import STOPWORD_LISTS

__all__ = [
    "STOPWORD_LISTS",
    "Document",
    "Passage",
    "fingerprint",
    "iter_documents",
    "load_documents",
    "read_folder",
    "read_jsonl",
    "split_passages",
]
