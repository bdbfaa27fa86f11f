import pytest
from conftest import TOY_DOCS

from ragsae.index import Index
from ragsae.langchain import make_retriever

pytest.importorskip("langchain_core")


def test_retriever_returns_documents_with_metadata(tiny_build_config, tiny_llm):
    from langchain_core.documents import Document

    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    retriever = make_retriever(index, k=3)
    docs = retriever.invoke("regular expression patterns")
    assert len(docs) == 3 and all(isinstance(d, Document) for d in docs)
    expected = index.search("regular expression patterns", 3)
    assert [d.metadata["passage_id"] for d in docs] == [h.passage_id for h in expected]
    assert docs[0].metadata["rank"] == 1 and docs[0].metadata["score"] == pytest.approx(expected[0].score)
    assert docs[0].metadata["latents"] and docs[0].page_content == expected[0].text
    assert len(docs[0].metadata["latent_labels"]) == len(docs[0].metadata["latents"])  # labelled by the catalog


def test_install_hint_shows_without_langchain_core(monkeypatch):
    import importlib
    import sys

    for name in ("ragsae.langchain", "ragsae.integrations.langchain"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in [m for m in sys.modules if m.split(".")[0] == "langchain_core"] + ["langchain_core"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'ragsae\[langchain\]'"):
        importlib.import_module("ragsae.langchain")


def test_retriever_class_is_importable_and_typed(tiny_build_config, tiny_llm):
    from langchain_core.retrievers import BaseRetriever

    from ragsae.langchain import SaeRetriever

    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    retriever = SaeRetriever(index=index, k=2, mode="sparse")
    assert isinstance(retriever, BaseRetriever) and issubclass(SaeRetriever, BaseRetriever)
    assert [d.metadata["rank"] for d in retriever.invoke("archives on disk")] == [1, 2]
