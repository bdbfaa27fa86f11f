"""Capture stage: texts through the LLM up to a layer, residual-stream activations per token out."""

from .cache import ActivationCache, activations_id, capture_cached
from .forward import TokenActivations, capture, check_layer, content_mask, tokenize

__all__ = [
    "ActivationCache",
    "TokenActivations",
    "activations_id",
    "capture",
    "capture_cached",
    "check_layer",
    "content_mask",
    "tokenize",
]
