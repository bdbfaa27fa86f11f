"""ragsae: retrieval-augmented generation over sparse autoencoder codes of an LLM's activations."""

from ._version import __version__
from .config import BuildConfig, CaptureConfig, LlmConfig, RayBuild, SaeConfig, ScoringConfig
from .errors import (
    ConfigError,
    CorpusError,
    IndexFolderError,
    ModelError,
    QueryError,
    RagsaeError,
    SaeLoadError,
    TrainingError,
)
from .generate import RAG, Answer
from .index import Hit, Index
from .lm import load_llm
from .routing import Collections, Profile
from .sae import SparseAutoencoder, TopK, create_sae, load_sae, train_sae
from .text import Document, Passage, load_documents

__all__ = [
    "RAG",
    "Answer",
    "BuildConfig",
    "CaptureConfig",
    "Collections",
    "ConfigError",
    "CorpusError",
    "Document",
    "Hit",
    "Index",
    "IndexFolderError",
    "LlmConfig",
    "ModelError",
    "Passage",
    "Profile",
    "QueryError",
    "RagsaeError",
    "RayBuild",
    "SaeConfig",
    "SaeLoadError",
    "ScoringConfig",
    "SparseAutoencoder",
    "TopK",
    "TrainingError",
    "__version__",
    "create_sae",
    "load_documents",
    "load_llm",
    "load_sae",
    "train_sae",
]
