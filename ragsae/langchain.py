"""LangChain retriever over a ragsae index (needs `langchain-core`)."""

from __future__ import annotations

from typing import Any


def _base_retriever() -> type:
    try:
        from langchain_core.retrievers import BaseRetriever
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("SaeRetriever needs langchain-core: pip install 'ragsae[langchain]'") from error
    return BaseRetriever


def make_retriever(index: Any, k: int = 4, mode: str | None = None) -> Any:
    """A `langchain_core` retriever returning `Document`s with score, ids, rank and latents as metadata."""
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document

    base = _base_retriever()

    class SaeRetriever(base):  # type: ignore[misc, valid-type]
        """Retrieves passages from a ragsae `Index` by SAE-code scoring."""

        index: Any
        k: int = 4
        mode: str | None = None

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
                    },
                )
                for hit in self.index.search(query, self.k, self.mode)
            ]

    return SaeRetriever(index=index, k=k, mode=mode)
