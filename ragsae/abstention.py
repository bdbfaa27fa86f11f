"""Whether retrieval supports an answer: a question's support (how well the index's best passage matches
it) and the index's background support (the mean support of questions made of random words).

Raw support is on a different scale in every index: its SAE, the size of its corpus and how broad it is
all move it (benchmarks/README.md, "Saying the passages do not answer"). Divided by the background, it
says how much better a passage matches the question than one matches nonsense in the same index, so
that one threshold can serve indexes of different scales (it did on the four measured there).
"""

from __future__ import annotations

import logging
import random
import re
import threading
from typing import Any

import numpy as np
import scipy.sparse as sp

from .index import Index

logger = logging.getLogger(__name__)

BACKGROUND_QUESTIONS = 64
"""Random-word questions whose mean support is an index's background."""
BACKGROUND_WORDS = 8
"""Words in each: about a question's length."""
BACKGROUND_SEED = 0
MIN_VOCABULARY_WORDS = 1000
"""Fewer whole-word tokens than this and the tokenizer gives no background (`vocabulary_words`)."""
WORD = re.compile(r"[a-z]{4,10}")
WORD_START = ("\u0120", "\u2581")
"""How byte-level BPE ('Ġ') and SentencePiece ('▁') vocabularies mark a token that starts a word."""


def vocabulary_words(tokenizer: Any) -> list[str]:
    """The lowercase words of 4 to 10 letters that are one word-starting token of the tokenizer's
    vocabulary, sorted. They come with the model, not the corpus: words of no index's subject in
    particular (words of the corpus would make the background a question on its subject)."""
    words = {token[1:] for token in tokenizer.get_vocab() if token[:1] in WORD_START and WORD.fullmatch(token[1:])}
    return sorted(words)


def background_questions(tokenizer: Any) -> list[str] | None:
    """`BACKGROUND_QUESTIONS` seeded questions of `BACKGROUND_WORDS` random vocabulary words, or None when
    the vocabulary has fewer than `MIN_VOCABULARY_WORDS` such words."""
    words = vocabulary_words(tokenizer)
    if len(words) < MIN_VOCABULARY_WORDS:
        return None
    rng = random.Random(BACKGROUND_SEED)
    return [" ".join(rng.sample(words, BACKGROUND_WORDS)) for _ in range(BACKGROUND_QUESTIONS)]


def support_of(index: Index, codes: sp.csr_matrix) -> np.ndarray:
    """`Retriever.support` of each question's pooled codes (rows of (n, num_latents)) in `index` and the
    passage they score highest: (n,), 0 where none matches.

    Pseudo-relevance feedback is left out: its latents come from the passages found, so they match
    those passages whether or not the question is on their subject."""
    retriever = index.retriever
    weights = retriever.scaled(codes)
    _, ids = retriever.sparse.search(weights, 1)
    return np.asarray(retriever.support(weights, ids[:, 0]), dtype=np.float64)


def measure_background(index: Index) -> float | None:
    """`index`'s background support: the mean support of `background_questions`; None when its tokenizer
    gives none or nothing in the index matches them (an empty index)."""
    questions = background_questions(index.llm.tokenizer)
    if questions is None:
        logger.warning("%s: the tokenizer has too few whole-word tokens for a support background", index.path)
        return None
    background = float(np.mean(support_of(index, index.encode_queries(questions))))
    logger.info("support background of %s: %.4f", index.path or "the index", background)
    return background if background > 0 else None


class SupportBackgrounds:
    """Each index's background support (`measure_background`), measured on first use and again after the
    index changes (its `generation`). Safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._measured: dict[int, tuple[Index, int, float | None]] = {}

    def __call__(self, index: Index) -> float | None:
        with self._lock:
            known = self._measured.get(id(index))
            generation = index.generation  # before measuring: a change meanwhile is measured next time
            if known is not None and known[0] is index and known[1] == generation:
                return known[2]
            background = measure_background(index)
            self._measured[id(index)] = (index, generation, background)
            return background
