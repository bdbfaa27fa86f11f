"""ragsae: retrieval-augmented generation over sparse autoencoder codes of an LLM's activations."""

__version__ = "0.1.0"

from .config import BuildConfig, CaptureConfig, LlmConfig, SaeConfig, ScoringConfig  # noqa: E402
from .corpus import CorpusError, Document, Passage, load_documents  # noqa: E402
from .generate import RAG, Answer  # noqa: E402
from .index import Index, IndexFolderError  # noqa: E402
from .llm import load_llm  # noqa: E402
from .retrieve import Hit  # noqa: E402
from .sae import SaeLoadError, SparseAutoencoder, TopK, train_sae  # noqa: E402

__all__ = [
    "Answer",
    "BuildConfig",
    "CaptureConfig",
    "CorpusError",
    "Document",
    "Hit",
    "Index",
    "IndexFolderError",
    "LlmConfig",
    "Passage",
    "RAG",
    "SaeConfig",
    "SaeLoadError",
    "ScoringConfig",
    "SparseAutoencoder",
    "TopK",
    "__version__",
    "load_documents",
    "load_llm",
    "train_sae",
]
