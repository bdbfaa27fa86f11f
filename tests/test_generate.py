from conftest import TOY_DOCS

from ragsae.generate import RAG, build_prompt, parse_citations
from ragsae.index import Hit, Index


def test_prompt_numbers_and_delimits_passages(tokenizer):
    hits = [Hit("a", "a", 1.0, 1, "first passage"), Hit("b", "b", 0.5, 2, "second passage")]
    prompt = build_prompt("what?", hits, tokenizer)
    assert "[1] (source: a)\nfirst passage\n[end of 1]" in prompt
    assert "[2] (source: b)" in prompt and prompt.index("[1]") < prompt.index("[2]")
    assert "Question: what?" in prompt and prompt.rstrip().endswith("assistant")


def test_parse_citations():
    assert parse_citations("See [2] and [1], again [2]; not [7] or [0].", 3) == [2, 1]
    assert parse_citations("no citations", 3) == []


def test_ask_runs_end_to_end_on_tiny_model(tiny_build_config, tiny_llm):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    answer = RAG(index, k=2, max_new_tokens=8).ask("How do I read a CSV file?")
    assert len(answer.hits) == 2 and answer.prompt.count("[end of") == 2
    assert isinstance(answer.text, str)
    assert "Sources:" in answer.format()


def test_answer_leads_with_a_citation_of_an_existing_passage(tiny_build_config, tiny_llm):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    answer = RAG(index, k=3, max_new_tokens=4).ask("Which module reads ZIP archives?")
    assert answer.text.startswith("According to passage [")
    assert len(answer.citations) >= 1 and answer.citations[0] in (1, 2, 3)
    plain = RAG(index, k=3, max_new_tokens=4, lead_with_citation=False).ask("Which module reads ZIP archives?")
    assert not plain.text.startswith("According to passage [")
