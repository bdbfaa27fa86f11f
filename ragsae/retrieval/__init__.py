"""Retrieval stage: latent weighting, exact sparse scoring, feedback, fusion, and the backends that store
passage vectors behind one interface."""

from .backends import Backend, CsrBackend, FaissBackend
from .feedback import feedback_queries
from .fusion import reciprocal_rank_fusion
from .retriever import Retriever
from .scoring import (
    bm25_document_weights,
    decoder_vectors,
    inverted_index,
    latent_idf,
    prune_rows,
    row_norms,
    sparse_search,
    top_k,
)

__all__ = [
    "Backend",
    "CsrBackend",
    "FaissBackend",
    "Retriever",
    "bm25_document_weights",
    "decoder_vectors",
    "feedback_queries",
    "inverted_index",
    "latent_idf",
    "prune_rows",
    "reciprocal_rank_fusion",
    "row_norms",
    "sparse_search",
    "top_k",
]
