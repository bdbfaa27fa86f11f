"""`from ragsae.langchain import SaeRetriever`: the LangChain retriever (`integrations/langchain.py`)."""

from .integrations.langchain import SaeRetriever, make_retriever

__all__ = ["SaeRetriever", "make_retriever"]
