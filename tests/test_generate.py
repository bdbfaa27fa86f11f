import copy

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import TOY_DOCS, load_benchmark_script

from ragsae import abstention, generate
from ragsae.config import ScoringConfig
from ragsae.errors import QueryError
from ragsae.generate import ABSTENTION, RAG, build_prompt, parse_citations
from ragsae.index import Hit, Index
from ragsae.retrieval import Retriever
from ragsae.retrieval.retriever import SearchSegment
from ragsae.retrieval.scoring import CorpusStatistics

abstain = load_benchmark_script("abstain")


def test_prompt_numbers_and_delimits_passages(tokenizer):
    hits = [Hit("a", "a", 1.0, 1, "first passage"), Hit("b", "b", 0.5, 2, "second passage")]
    prompt = build_prompt("what?", hits, tokenizer)
    assert "[1] (source: a)\nfirst passage\n[end of 1]" in prompt
    assert "[2] (source: b)" in prompt and prompt.index("[1]") < prompt.index("[2]")
    assert "Question: what?" in prompt and prompt.rstrip().endswith("assistant")


def test_parse_citations():
    assert parse_citations("See [2] and [1], again [2]; not [7] or [0].", 3) == [2, 1]
    assert parse_citations("no citations", 3) == []


# The tiny model has random weights, so its support says nothing about a question: tests of generation
# turn abstention off (min_relative_support=0); those of abstention are below.
def test_ask_runs_end_to_end_on_tiny_model(tiny_build_config, tiny_llm):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    answer = RAG(index, k=2, max_new_tokens=8, min_relative_support=0).ask("How do I read a CSV file?")
    assert len(answer.hits) == 2 and answer.prompt.count("[end of") == 2
    assert isinstance(answer.text, str)
    assert "Sources:" in answer.format()


def test_answer_leads_with_a_citation_of_an_existing_passage(tiny_build_config, tiny_llm):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    answer = RAG(index, k=3, max_new_tokens=4, min_relative_support=0).ask("Which module reads ZIP archives?")
    assert answer.text.startswith("According to passage [")
    assert len(answer.citations) >= 1 and answer.citations[0] in (1, 2, 3)
    plain = RAG(index, k=3, max_new_tokens=4, lead_with_citation=False, min_relative_support=0).ask(
        "Which module reads ZIP archives?"
    )
    assert not plain.text.startswith("According to passage [")


def test_rag_abstains_below_min_support_without_generating(tiny_build_config, tiny_llm, monkeypatch):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)

    def no_generation(*_args, **_kwargs):
        raise AssertionError("an abstaining RAG must not generate")

    monkeypatch.setattr(RAG, "_generate", no_generation)
    monkeypatch.setattr(RAG, "_citation_lead", no_generation)
    # Support is a cosine, never above 1: this threshold is out of every question's reach.
    answer = RAG(index, k=2, min_support=1.5, min_relative_support=0).ask("Which module reads ZIP archives?")
    assert not answer.answered and answer.citations == [] and answer.sources() == []
    assert answer.text == ABSTENTION and answer.prompt == ""
    assert len(answer.hits) == 2 and answer.support is not None and 0 <= answer.support <= 1
    shown = answer.format()
    assert "Closest passages, none cited:" in shown and "Sources:" not in shown and "*[" not in shown


def test_rag_with_abstention_off_answers_as_before(tiny_build_config, tiny_llm, monkeypatch):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)

    def no_support(*_args, **_kwargs):
        raise AssertionError("with abstention off, RAG must not compute support or a background")

    with monkeypatch.context() as patched:
        patched.setattr(generate, "support_of", no_support)
        patched.setattr(abstention, "measure_background", no_support)
        off = RAG(index, k=3, max_new_tokens=4, min_support=0, min_relative_support=0)
        answer = off.ask("Which module reads ZIP archives?")
    assert answer.answered and answer.support is None and answer.relative_support is None
    assert answer.text.startswith("According to passage [") and answer.citations[0] in (1, 2, 3)
    assert "Sources:" in answer.format()
    # A threshold every matching question clears: support is computed, recorded, and the answer generated.
    supported = RAG(index, k=3, max_new_tokens=4, min_support=1e-9, min_relative_support=0).ask(
        "Which module reads ZIP archives?"
    )
    assert supported.answered and supported.support is not None and supported.support > 0
    assert supported.text == answer.text
    assert supported.support == RAG(index).support("Which module reads ZIP archives?")


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
@pytest.mark.parametrize("name", ["min_support", "min_relative_support"])
def test_abstention_thresholds_must_be_non_negative_numbers(bad, name):
    with pytest.raises(QueryError, match=name):
        RAG(None, **{name: bad})  # type: ignore[arg-type]


def test_vocabulary_words_are_whole_word_tokens_and_make_seeded_questions(tokenizer):
    words = abstention.vocabulary_words(tokenizer)
    assert len(words) >= abstention.MIN_VOCABULARY_WORDS and words == sorted(set(words))
    for word in words[:: len(words) // 50]:
        assert abstention.WORD.fullmatch(word)
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1
    questions = abstention.background_questions(tokenizer)
    assert questions is not None and len(questions) == abstention.BACKGROUND_QUESTIONS
    assert questions == abstention.background_questions(tokenizer)  # seeded: the same every time
    assert all(len(q.split()) == abstention.BACKGROUND_WORDS and set(q.split()) <= set(words) for q in questions)


class FewWordsTokenizer:
    """A vocabulary with one whole word of 4-10 letters ('▁word'): too few for a background."""

    def get_vocab(self):
        return {"word": 0, "\u0120the": 1, "\u0120supercalifragilistic": 2, "\u2581word": 3, "\u0120Word": 4}


def test_a_tokenizer_with_too_few_whole_words_gives_no_background():
    assert abstention.vocabulary_words(FewWordsTokenizer()) == ["word"]
    assert abstention.background_questions(FewWordsTokenizer()) is None


def test_relative_support_is_support_over_the_mean_support_of_random_word_questions(
    tiny_build_config, tiny_llm, monkeypatch
):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    questions = abstention.background_questions(tiny_llm.tokenizer)
    background = float(np.mean(abstention.support_of(index, index.encode_queries(questions))))
    question = "Which module reads ZIP archives?"
    rag = RAG(index, k=2, max_new_tokens=2, min_relative_support=1e-9)
    assert background > 0 and rag.backgrounds(index) == pytest.approx(background)
    relative = rag.relative_support(question)
    assert relative == pytest.approx(rag.support(question) / background)
    answer = rag.ask(question)
    assert answer.answered and answer.relative_support == pytest.approx(relative)
    assert answer.support == pytest.approx(rag.support(question))

    def no_generation(*_args, **_kwargs):
        raise AssertionError("an abstaining RAG must not generate")

    monkeypatch.setattr(RAG, "_generate", no_generation)
    monkeypatch.setattr(RAG, "_citation_lead", no_generation)
    above = RAG(index, k=2, min_relative_support=relative * 1.001).ask(question)  # just out of reach
    assert not above.answered and above.text == ABSTENTION and above.citations == []
    assert above.relative_support == pytest.approx(relative) and len(above.hits) == 2
    streamed = list(RAG(index, k=2, min_relative_support=relative * 1.001).stream(question))
    assert streamed[0] == ABSTENTION and not streamed[-1].answered


def test_background_is_measured_once_per_state_of_the_index(tiny_build_config, tiny_llm, monkeypatch):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    measured = []
    measure = abstention.measure_background

    def counted(measured_index):
        measured.append(measured_index.generation)
        return measure(measured_index)

    monkeypatch.setattr(abstention, "measure_background", counted)
    rag = RAG(index, k=2, max_new_tokens=1, min_relative_support=1e-9)
    question = "Which module reads ZIP archives?"
    first = rag.ask(question).relative_support
    assert rag.ask(question).relative_support == first
    assert copy.copy(rag).ask(question).relative_support == first  # the service's per-request copies share it
    assert measured == [index.generation]
    index.add([{"_id": "late", "text": "The kitchen timer rings when the bread is baked and the oven is hot."}])
    rag.ask(question)
    assert measured == [index.generation - 1, index.generation]


def test_support_is_the_cosine_of_the_idf_weighted_query_with_the_passage_weights():
    codes = sp.csr_matrix(np.array([[1.0, 0, 1, 0], [0, 1, 0, 0]], dtype=np.float32))
    w_dec = np.zeros((4, 8), np.float32)
    retriever = Retriever(w_dec, ScoringConfig(), CorpusStatistics.of(codes, np.ones(2, np.float32)))
    # Hand-made IDF and passage weights in place of BM25's, so that the expected values are exact.
    retriever.reference_idf = np.array([2.0, 1.0, 0.5, 1.0], dtype=np.float32)
    hand_made = sp.csr_matrix(np.array([[3.0, 0, 4, 0], [0, 1, 0, 0]], dtype=np.float32))
    retriever.add_segment(SearchSegment(hand_made, w_dec))
    queries = sp.csr_matrix(np.array([[1.0, 0, 0, 0], [0, 0, 6, 4], [1, 0, 2, 2], [1, 0, 0, 0]], dtype=np.float32))
    got = retriever.support(queries, [0, 0, 1, -1])
    # Times idf: [2,0,0,0].[3,0,4,0] = 6 over 2*5; [0,0,3,4].[3,0,4,0] = 12 over 5*5; no shared latent; no passage.
    np.testing.assert_allclose(got, [0.6, 0.48, 0.0, 0.0], rtol=1e-6)


def test_abstain_benchmark_auc_and_threshold_on_toy_signals():
    assert abstain.roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert abstain.roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert abstain.roc_auc(np.array([2.0, 0.0]), np.array([1.0])) == 0.5
    assert abstain.roc_auc(np.array([1.0]), np.array([1.0])) == 0.5  # a tie counts one half
    assert abstain.choose_threshold(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 2.5
    assert abstain.balanced_accuracy(np.array([3.0, 4.0]), np.array([1.0, 2.0]), 2.5) == 1.0
    # Overlapping: 1.5 keeps every positive and refuses one negative of two (0.75); 4.5 gives 0.667.
    positive, negative = np.array([2.0, 3.0, 5.0]), np.array([1.0, 4.0])
    assert abstain.choose_threshold(positive, negative) == 1.5
    assert abstain.balanced_accuracy(positive, negative, 1.5) == 0.75
    rows = abstain.compare(
        {"answerable": {"s": positive}, "unanswerable": {"s": negative}},
        {"answerable": {"s": np.array([3.0])}, "unanswerable": {"s": np.array([0.0, 2.0])}},
    )
    assert rows["s"]["threshold"] == 1.5 and rows["s"]["balanced_accuracy_second"] == 0.75


def test_abstain_benchmark_signals_by_hand():
    query = sp.csr_matrix(np.array([[1.0, 0, 2, 2]]))
    best = sp.csr_matrix(np.array([[3.0, 0, 4, 0]]))
    got = abstain.signals(query, best)
    # dot 11, |q| 3, |d| 5; the passage has the latents holding 1 + 2 of the query's 5.
    np.testing.assert_allclose(
        [got["cosine"][0], got["score/norm"][0], got["mass"][0], got["score"][0]], [11 / 15, 11 / 3, 0.6, 11]
    )


def test_abstain_benchmark_signals_match_the_library_support(tiny_build_config, tiny_llm):
    index = Index.build(TOY_DOCS, None, tiny_build_config, llm=tiny_llm)
    questions = ["How do I read a CSV file?", "Which module reads ZIP archives?"]
    found = abstain.query_signals(index, questions)
    assert set(found) == {f"{v} {m}" for v in abstain.VARIANTS for m in abstain.MEASURES}
    assert all(values.shape == (2,) for values in found.values())
    np.testing.assert_allclose(found[abstain.SUPPORT], [RAG(index).support(q) for q in questions], rtol=1e-6)
