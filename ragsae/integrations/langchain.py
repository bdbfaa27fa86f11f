"""LangChain retriever over a ragsae index (needs `langchain-core`: pip install 'ragsae[langchain]')."""

from __future__ import annotations

from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as error:
    raise ImportError("ragsae.langchain needs langchain-core: pip install 'ragsae[langchain]'") from error


class SaeRetriever(BaseRetriever):
    """Retrieves passages from a ragsae `Index` by SAE-code scoring.

    Each `Document` carries the passage text and, as metadata, its passage and document ids, score,
    rank and the latents that contributed most to its score.
    """

    index: Any
    """The `ragsae.Index` to search."""
    k: int = 4
    """Passages returned per query."""
    mode: str | None = None
    """Search mode ('sparse', 'faiss', 'fused'); None uses the index's own."""

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [
            Document(
                page_content=hit.text,
                metadata={
                    "passage_id": hit.passage_id,
                    "doc_id": hit.doc_id,
                    "score": hit.score,
                    "rank": hit.rank,
                    "latents": [[j, w] for j, w in hit.latents],
                    "latent_labels": list(hit.labels),
                },
            )
            for hit in self.index.search(query, self.k, self.mode)
        ]


def make_retriever(index: Any, k: int = 4, mode: str | None = None) -> SaeRetriever:
    """A `SaeRetriever` over `index` (shorthand for `SaeRetriever(index=index, k=k, mode=mode)`)."""
    return SaeRetriever(index=index, k=k, mode=mode)
