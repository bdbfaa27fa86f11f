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
