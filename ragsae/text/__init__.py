"""Text stage: corpora read into documents, personal data and secrets replaced, documents split into
passages, stopword lists."""

from .corpus import Document, Passage, fingerprint, iter_documents, load_documents, read_folder, read_jsonl
from .passages import split_passages
from .sanitize import Audit, Replacement, SanitizedText, Sanitizer, resolve_salt, salt_fingerprint
from .stopwords import STOPWORD_LISTS

__all__ = [
    "STOPWORD_LISTS",
    "Audit",
    "Document",
    "Passage",
    "Replacement",
    "SanitizedText",
    "Sanitizer",
    "fingerprint",
    "iter_documents",
    "load_documents",
    "read_folder",
    "read_jsonl",
    "resolve_salt",
    "salt_fingerprint",
    "split_passages",
]
