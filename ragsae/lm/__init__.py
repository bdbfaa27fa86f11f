"""LM stage: loading the causal LM (bundled GGUF, local folder or hub id), the cache of de-quantised GGUF
models that spares later loads the de-quantisation, and the fast Llama trunk."""

from .loading import DEFAULT_GGUF_FILE, DEFAULT_MODEL_ID, LoadedLlm, default_gguf_folder, load_llm

__all__ = ["DEFAULT_GGUF_FILE", "DEFAULT_MODEL_ID", "LoadedLlm", "default_gguf_folder", "load_llm"]
