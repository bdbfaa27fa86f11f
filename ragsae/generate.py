"""Retrieval-augmented answers: numbered passages in the prompt, the same LLM writes a cited answer,
unless retrieval finds nothing that supports one, or routing finds no index that covers the question."""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Any

import scipy.sparse as sp
import torch

from .abstention import SupportBackgrounds, support_of
from .config import DEFAULT_MIN_RELATIVE_SUPPORT
from .errors import ConfigError, QueryError
from .index import Hit, Index
from .routing import Collections, check_route

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages given. "
    "Cite the passages you use by their number in square brackets, like [1] or [2]. "
    "If the passages do not contain the answer, say so."
)
CITATION = re.compile(r"\[(\d+)\]")
ABSTENTION = "The indexed passages do not answer this question."
NOT_COVERED = "No index covers this question, so nothing was retrieved and nothing is cited."


@dataclass
class Answer:
    """A generated answer with the passages it was given and the ones it cited."""

    question: str
    text: str
    hits: list[Hit]
    citations: list[int] = field(default_factory=list)
    """1-based passage numbers cited in `text` that exist in `hits`."""
    prompt: str = ""
    answered: bool = True
    """False when retrieval judged that no passage answers the question (`RAG.min_relative_support`,
    `RAG.min_support`): then `text` says so, nothing was generated and nothing is cited."""
    support: float | None = None
    """The question's support (`RAG.support`; the best of the indexes searched); None when abstention
    is off."""
    relative_support: float | None = None
    """Its support divided by the index's background support (`ragsae.abstention`; the best of the
    indexes searched); None when abstention is off or the index has no background."""
    retrieved: bool = True
    """False when routing found no index whose signature the question matches above `RAG.threshold`:
    then nothing was searched, `hits` is empty, `text` says that no index covers the question."""
    routing: dict[str, float] | None = None
    """Each index's routing score for the question (`Collections`); None when the RAG does not route."""

    def sources(self) -> list[Hit]:
        return [self.hits[n - 1] for n in self.citations]

    def to_dict(self) -> dict[str, Any]:
        """The answer as JSON (`ragsae ask --json`), its hits as `ragsae search --json` prints them."""
        return {
            "question": self.question,
            "answer": self.text,
            "answered": self.answered,
            "retrieved": self.retrieved,
            "routing": self.routing,
            "support": self.support,
            "relative_support": self.relative_support,
            "citations": self.citations,
            "hits": [asdict(hit) for hit in self.hits],
        }

    def format(self) -> str:
        """Answer followed by its numbered sources, for terminals."""
        lines = [self.text.strip(), ""]
        if self.routing is not None:
            lines.append("Routing: " + ", ".join(f"{name} {score:.3f}" for name, score in self.routing.items()))
        if not self.retrieved:
            return "\n".join(lines).rstrip()
        lines.append("Sources:" if self.answered else "Closest passages, none cited:")
        for number, hit in enumerate(self.hits, 1):
            mark = "*" if number in self.citations else " "
            snippet = " ".join(hit.text.split())[:100]
            tag = getattr(hit, "index", "")  # the index a routed hit came from
            source = f"{tag}:{hit.doc_id}" if tag else hit.doc_id
            lines.append(f"{mark}[{number}] {source} (score {hit.score:.3f}): {snippet}...")
        return "\n".join(lines)


def format_passages(hits: list[Hit], tokenizer: Any, max_passage_tokens: int) -> str:
    """Passages as numbered, delimited blocks, each cut to `max_passage_tokens`."""
    blocks = []
    for number, hit in enumerate(hits, 1):
        ids = tokenizer(hit.text, add_special_tokens=False)["input_ids"][:max_passage_tokens]
        body = tokenizer.decode(ids).strip()
        blocks.append(f"[{number}] (source: {hit.doc_id})\n{body}\n[end of {number}]")
    return "\n\n".join(blocks)


def build_prompt(question: str, hits: list[Hit], tokenizer: Any, max_passage_tokens: int = 200) -> str:
    """Chat-formatted prompt (when the tokenizer has a template) holding passages and question."""
    user = (
        f"Passages:\n\n{format_passages(hits, tokenizer, max_passage_tokens)}\n\nQuestion: {question}\n"
        "Answer briefly and cite passage numbers like [1]."
    )
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT}\n\n{user}\nAnswer:"


def parse_citations(text: str, n_passages: int) -> list[int]:
    """Distinct valid passage numbers cited as [n], in order of first mention."""
    seen: list[int] = []
    for match in CITATION.finditer(text):
        number = int(match.group(1))
        if 1 <= number <= n_passages and number not in seen:
            seen.append(number)
    return seen


CITATION_LEAD = "According to passage ["
DEFAULT_MIN_SUPPORT = 0.0
"""`RAG.min_support` unless given: off. Support's scale depends on the index's SAE and corpus, so a
threshold measured on one index does not carry to every other (`benchmarks/abstain.py`)."""


class RAG:
    """Retrieve from an `Index` (or the `Collections` a question is routed to), then let the index's LLM
    answer with citations.

    The LLM reads the passages as the index stores them (`SanitizeConfig.store_text`: the sanitised
    text with 'redacted', the original text with 'full') and the question as the index encodes it
    (sanitised unless `SanitizeConfig.queries` is off). An index that stores no text ('none') cannot
    be answered from: `ask` and `stream` raise a ConfigError; search it and resolve the hits instead.

    Args:
        k: passages put in the prompt.
        max_new_tokens: answer length cap.
        max_passage_tokens: each passage is cut to this many tokens in the prompt.
        lead_with_citation: start the answer with "According to passage [" and let the model
            choose the number among the passages given (decoding restricted to 1..k), then go on
            freely. Small models rarely cite unprompted; this makes every answer name a source the
            model itself judged most useful.
        min_relative_support: answer only when the question's support is at least this many times
            the index's background support (the mean support of questions of random words,
            `ragsae.abstention`); below it nothing is generated and the answer says the passages do
            not answer. The lead above makes the model cite a passage whether or not any is relevant,
            so an unanswerable question would otherwise come back with an invented quote and a
            citation. The default (1.0) answered every judged question of the benchmark collections
            on its own index and refused 20-33% of the other collection's (`benchmarks/abstain.py`):
            it refuses what is plainly off the index's subject, not every question it cannot answer.
            Raise it to refuse more, at the cost of some answerable questions; 0 turns it off. The
            background is measured on the first question and again after the index changes (one
            LLM pass).
        min_support: answer only when the question's raw `support` reaches this as well: a threshold
            chosen on questions about your own index, as `benchmarks/abstain.py` does for the
            benchmark collections (support's scale depends on the index's SAE and corpus). 0 (the
            default) turns it off.
        route, route_n, threshold: with `Collections`, which indexes a question is searched in
            (`Collections.search`'s `route`, `n`, `threshold`); when no index's routing score reaches
            `threshold`, nothing is retrieved or generated and the answer says that no index covers the
            question (`Answer.retrieved`). With one `Index`, a `threshold` above 0 routes over that index
            alone: retrieve-or-not by its signature.
    """

    def __init__(
        self,
        index: Index | Collections,
        k: int = 3,
        max_new_tokens: int = 96,
        max_passage_tokens: int = 200,
        lead_with_citation: bool = True,
        min_support: float = DEFAULT_MIN_SUPPORT,
        min_relative_support: float = DEFAULT_MIN_RELATIVE_SUPPORT,
        route: str = "best",
        route_n: int = 2,
        threshold: float = 0.0,
    ):
        if k < 1:
            raise QueryError(f"k must be >= 1, got {k}")
        if not min_support >= 0:  # NaN too
            raise QueryError(f"min_support must be >= 0, got {min_support}")
        if not min_relative_support >= 0:
            raise QueryError(f"min_relative_support must be >= 0, got {min_relative_support}")
        check_route(route, route_n, threshold)
        self.collections: Collections | None = None
        """Where questions are routed; None: every question is searched in `index`."""
        if isinstance(index, Collections):
            self.collections, index = index, index.indexes[0]  # they share one LLM, which answers
        elif threshold > 0:
            self.collections = Collections([index])
        self.route, self.route_n, self.threshold = route, route_n, threshold
        self.index = index
        self.k = k
        self.max_new_tokens = max_new_tokens
        self.max_passage_tokens = max_passage_tokens
        self.lead_with_citation = lead_with_citation
        self.min_support = min_support
        self.min_relative_support = min_relative_support
        self.backgrounds = SupportBackgrounds()
        """Each index's background support, measured on first use (`ragsae.abstention`)."""

    @torch.inference_mode()
    def ask(self, question: str) -> Answer:
        """Answer `question` from the top-k passages, citing them as [1], [2], ..."""
        hits, measured, settled = self._screen(question)
        if settled is not None:
            return settled
        prompt, lead = self._prompt(question, hits)
        text = lead + self._generate(prompt + lead)
        citations = parse_citations(text, len(hits))
        return Answer(question, text.strip(), hits, citations, prompt, **measured)

    @torch.inference_mode()
    def stream(self, question: str) -> Generator[str | Answer, None, None]:
        """Answer `question` as `ask` does, token by token: yields pieces of the answer's text as they
        are generated (the citation lead first), then the finished `Answer`, equal to what `ask` returns.

        The pieces join to the answer's text before `Answer.text` strips it. Generation runs in a
        helper thread; closing the generator early stops it after the current token."""
        hits, measured, settled = self._screen(question)
        if settled is not None:
            yield settled.text
            yield settled
            return
        prompt, lead = self._prompt(question, hits)
        if lead:
            yield lead
        pieces = [lead]
        generated = self._generate_pieces(prompt + lead)
        try:
            for piece in generated:
                pieces.append(piece)
                yield piece
        finally:
            generated.close()  # if this generator is closed early, stop generating now
        text = "".join(pieces)
        citations = parse_citations(text, len(hits))
        yield Answer(question, text.strip(), hits, citations, prompt, **measured)

    def _screen(self, question: str) -> tuple[list[Hit], dict[str, Any], Answer | None]:
        """The question's hits, what was measured of it (`Answer`'s support, relative_support and routing),
        and its answer when nothing is to be generated: routing found no index that covers it, or
        retrieval does not support an answer."""
        hits, searched, routing = self._retrieve(question)
        if routing is not None and not searched:
            return [], {}, Answer(question, NOT_COVERED, [], [], answered=False, retrieved=False, routing=routing)
        support, relative = self._supports(searched)
        measured: dict[str, Any] = {"support": support, "relative_support": relative, "routing": routing}
        if self._abstains(support, relative):
            return hits, measured, Answer(question, ABSTENTION, hits, [], answered=False, **measured)
        return hits, measured, None

    def _retrieve(self, question: str) -> tuple[list[Hit], list[tuple[Index, sp.csr_matrix]], dict[str, float] | None]:
        """The question's top-k hits, each index searched with the question's codes there (none when
        routing found no index that covers the question), and its routing scores when the RAG routes."""
        if not isinstance(question, str) or not question.strip():
            raise QueryError(f"question must be a non-empty string, got {question!r}")
        indexes = self.collections.indexes if self.collections is not None else [self.index]
        if not all(index.stores_text for index in indexes):
            raise ConfigError(
                "store_text='none': this index keeps no passage text for the LLM to read, so RAG cannot answer "
                "from it; search it instead and resolve each hit's passage id and offsets (Index.passage) "
                "against your documents"
            )
        if self.collections is None:
            codes = self.index.encode_queries([question])
            hits = self.index.batch_search({"0": question}, self.k, codes=codes)["0"]
            return hits, [(self.index, codes)], None
        routed = self.collections.search(question, self.k, self.route, self.route_n, self.threshold)
        searched = [(self.collections[name], routed.codes[name]) for name in routed.chosen]
        return list(routed.hits), searched, routed.routing

    def _supports(self, searched: list[tuple[Index, sp.csr_matrix]]) -> tuple[float | None, float | None]:
        """The best support among the indexes searched and the best relative support (support over the
        index's background); None when abstention is off, and relative None where no index has a
        background."""
        if not (self.min_support > 0 or self.min_relative_support > 0):
            return None, None
        supports = [(float(support_of(index, codes)[0]), index) for index, codes in searched]
        relatives = []
        if self.min_relative_support > 0:
            for support, index in supports:
                background = self.backgrounds(index)
                if background is not None:
                    relatives.append(support / background)
        return max(s for s, _ in supports), max(relatives) if relatives else None

    def _abstains(self, support: float | None, relative: float | None) -> bool:
        below_support = support is not None and support < self.min_support
        below_relative = relative is not None and relative < self.min_relative_support
        return below_support or below_relative

    def _prompt(self, question: str, hits: list[Hit]) -> tuple[str, str]:
        """The prompt for `question` over `hits`, and the citation lead the answer starts with."""
        # The LLM reads the question as the index encodes it (sanitised when the index sanitises queries),
        # and the passages as the index stores them (store_text).
        prompt = build_prompt(
            self.index.sanitize_query(question), hits, self.index.llm.tokenizer, self.max_passage_tokens
        )
        lead = self._citation_lead(prompt, len(hits)) if self.lead_with_citation and hits else ""
        return prompt, lead

    def support(self, question: str) -> float:
        """How well the index's best passage for `question` matches it: `Retriever.support` of the
        question's pooled codes and the passage they score highest (0 when none matches).

        Pseudo-relevance feedback is left out: its latents come from the passages found, so they
        match those passages whether or not the question is on their subject."""
        return float(support_of(self.index, self.index.encode_queries([question]))[0])

    def relative_support(self, question: str) -> float | None:
        """`support` divided by the index's background support (`ragsae.abstention`); None when the
        index has no background."""
        background = self.backgrounds(self.index)
        return None if background is None else self.support(question) / background

    def _citation_lead(self, prompt: str, n_passages: int) -> str:
        """'According to passage [n]' with n the passage number the model scores highest."""
        llm = self.index.llm
        tok = llm.tokenizer
        numbers = [
            n for n in range(1, min(n_passages, 9) + 1) if len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1
        ]
        if not numbers:
            return ""
        ids = tok(prompt + CITATION_LEAD, return_tensors="pt", add_special_tokens=False)["input_ids"].to(llm.device)
        logits = llm.model(input_ids=ids).logits[0, -1]
        candidates = [tok(str(n), add_special_tokens=False)["input_ids"][0] for n in numbers]
        best = numbers[int(torch.argmax(logits[candidates]))]
        return f"{CITATION_LEAD}{best}]"

    def _generate_args(self, prompt: str) -> tuple[dict[str, Any], int]:
        """`model.generate` arguments for greedy decoding after `prompt`, and the prompt's length in tokens."""
        llm = self.index.llm
        inputs = llm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(llm.device)
        args = dict(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            repetition_penalty=1.1,
            pad_token_id=llm.tokenizer.pad_token_id,
        )
        return args, int(inputs["input_ids"].shape[1])

    def _generate(self, prompt: str) -> str:
        llm = self.index.llm
        args, n_prompt = self._generate_args(prompt)
        output = llm.model.generate(**args)
        return llm.tokenizer.decode(output[0, n_prompt:], skip_special_tokens=True)

    def _generate_pieces(self, prompt: str) -> Generator[str, None, None]:
        """What `_generate(prompt)` returns, in pieces as the tokens come: the text decoded so far, up to
        its last whitespace (a word or a multi-byte character may still change), then the rest."""
        llm = self.index.llm
        args, _ = self._generate_args(prompt)
        tokens: queue.Queue[torch.Tensor | BaseException | None] = queue.Queue()
        stop = threading.Event()

        streamer, stopping = _stream_hooks(tokens, stop)

        def run() -> None:
            try:
                with torch.inference_mode():
                    llm.model.generate(**args, streamer=streamer, stopping_criteria=stopping)
                tokens.put(None)
            except BaseException as error:  # handed to the consumer, which raises it
                tokens.put(error)

        worker = threading.Thread(target=run, name="ragsae-generate", daemon=True)
        worker.start()
        ids: list[int] = []
        sent = ""
        try:
            while (item := tokens.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                ids.extend(item.reshape(-1).tolist())
                text = llm.tokenizer.decode(ids, skip_special_tokens=True)
                stable = text[: max(text.rfind(" "), text.rfind("\n")) + 1]
                if len(stable) > len(sent) and stable.startswith(sent):
                    yield stable[len(sent) :]
                    sent = stable
            text = llm.tokenizer.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent):
                yield text[len(sent) :]
        finally:
            stop.set()
            worker.join()


def _stream_hooks(tokens: queue.Queue, stop: threading.Event) -> tuple[Any, Any]:
    """A streamer that hands each generation step's new token ids to `tokens`, and a stopping criterion
    that ends generation once `stop` is set (transformers is imported here, as the LLM loader does, so
    that importing ragsae stays light)."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class QueueStreamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:  # the first call hands over the prompt
                tokens.put(value.detach().cpu())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return QueueStreamer(), StoppingCriteriaList([Stopped()])
