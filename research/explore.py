"""Exploration studies on one BEIR collection: scoring variants, pseudo-relevance feedback, query
prefixes, passage stopwords, multi-layer codes and contrastive SAE fine-tuning.

python research/explore.py DATASET_DIR STUDY [--cache-dir benchmarks/.cache] [--output-dir benchmarks/results]

Every study starts from the default `BuildConfig`, exactly as `ragsae bench` builds it: passages split
by the LLM's tokenizer, passage activations from `timed_capture` and the SAE from `cached_sae` (both
shared with the bench cache, so a study after a bench run captures and trains nothing), queries read
with the default prefix and English query stopwords, exact sparse scoring (BM25 over latents) to depth
100, a document scored by its best passage, ir-measures nDCG@10 / R@100 / RR@10. Passage and query
codes are pooled once per SAE and re-scored for each row.

Studies (STUDY):

feedback
    Pseudo-relevance feedback over latents (`retrieve.feedback_queries`): no feedback, every
    combination of first-search passages, feedback weight and feedback latents kept with the
    passages weighted equally, then the passages weighted by 1 / rank (weight 1.0, 100 latents).
scoring
    Query weights (pooled activation, binary, sqrt, log1p), BM25 k1 and b, and query expansion
    through decoder directions: each query latent adds its `m` nearest latents (decoder cosine above
    a threshold) with weight alpha * cosine * its own weight.
prefix
    Text fed before each query and left out of its codes: none, several instructions, the
    tokenizer's chat-template user turn, and that turn followed by "Question: ".
passage-prefix
    Text fed before each passage and left out of its codes: none, "Passage: ", "Document: "
    (passages captured again for each; all coded by the default build's SAE).
passage-stopwords
    English function words left out of the passage codes too (fed to the LLM, dropped before SAE
    pooling, as queries already are); reports latents per passage.
multilayer
    The default layer alone, another layer alone (`--other-layer`, SAE trained `--other-epochs`),
    and both: BM25 scores of the two code sets added with weight 0.5 or 1.0 on the other layer.
contrastive
    Inverse-cloze fine-tuning of the SAE on the corpus alone (no queries, no judgments). Each
    passage gives a pseudo-query, a random span of 4 to 12 words read alone with the query prefix
    and stopwords; the span's tokens are removed from the passage. Batches of 128 passages come
    from spherical k-means clusters of their decoder-space vectors (hard in-batch negatives).
    Loss = FVU of the passage tokens + lambda * InfoNCE over BM25-weighted in-batch scores, with a
    learned scale initialised to 1 / std of the first batch's scores; Adam, decoder rows kept at
    unit norm. `--settings LAMBDA:LR:EPOCHS[:easy]`; `easy` is the first variant tried (span kept
    in the passage, random batches, scale initialised to 1). Fine-tuned SAEs are not cached.
shared-sae
    SAEs trained on other text than the collection's own passages (`--with DATASET_DIR ...`): each
    other collection's own default SAE, and one SAE (default config) trained on the passages of
    this collection and the others together; all scored on this collection. Columns: FVU and dead
    fraction on this collection's passages.
promptreps
    A lexical channel from the LLM itself (PromptReps, Zhuang et al. 2024): each passage in the chat
    template's user turn 'Passage: "TEXT"' + "Use one word to represent the passage in a retrieval task.
    Make sure your word is in lowercase.", the assistant turn opened with 'The word is "'; its vector is
    log1p(relu(next-token logits)) on the vocabulary ids of its own words, stopwords left out (queries
    likewise, with 'Query: '). Passage vectors are cached under CACHE_DIR/promptreps. Rows: the SAE codes,
    the lexical vectors alone (dot product), the two runs fused over the union of their top 100 (scores
    divided by the query's best, the lexical run weighted 0.25, 0.5 or 1.0) and reciprocal-rank fusion
    (k = 60). Columns: lexical forward time per passage, non-zeros per passage vector.

These are explorations, not the benchmark: they try directions before any of them becomes a library
option. The results kept (quoted, with their command) feed `benchmarks/README.md`. Each run writes
OUTPUT_DIR/<collection>-explore-<study>.json (rows, machine, git commit, command line, seconds) and
a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import hashlib
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ragsae.bench import MEASURES, cached_sae, evaluate, load_beir, timed_capture, to_document_run
from ragsae.capture import (
    ActivationCache,
    TokenActivations,
    activations_id,
    capture_cached,
    content_mask,
    tokenize,
)
from ragsae.config import BuildConfig, ScoringConfig, to_dict
from ragsae.encode import CodeEncoder, PooledCodes
from ragsae.lm import LoadedLlm, load_llm
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.retrieval import (
    Retriever,
    bm25_document_weights,
    decoder_vectors,
    feedback_queries,
    inverted_index,
    latent_idf,
    row_norms,
    sparse_search,
    top_k,
)
from ragsae.sae import SparseAutoencoder, evaluate_sae, optimiser_step
from ragsae.storage import atomic_output, write_json_atomic, write_text_atomic
from ragsae.text import STOPWORD_LISTS, Passage, fingerprint, split_passages

DEPTH = 100
"""Passages retrieved per query (R@100 needs 100)."""
STUDIES = (
    "scoring",
    "feedback",
    "prefix",
    "passage-prefix",
    "passage-stopwords",
    "multilayer",
    "contrastive",
    "shared-sae",
    "echo",
    "promptreps",
)

QUERY_WEIGHTINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "binary": np.ones_like,
    "sqrt": np.sqrt,
    "log1p": np.log1p,
}
K1_VALUES = (0.6, 0.9, 1.5, 2.0)
B_VALUES = (0.4, 0.6, 0.9)
FEEDBACK_PASSAGES = (3, 5, 10, 20)
FEEDBACK_WEIGHTS = (0.3, 0.6, 1.0, 1.5)
FEEDBACK_LATENTS = (50, 100, 200)
"""The pseudo-relevance feedback grid: first-search passages, feedback weight, feedback latents kept."""
EXPANSIONS = ((5, 0.5, 0.3), (5, 0.3, 0.4), (10, 0.3, 0.3), (3, 1.0, 0.5))
"""Query expansion settings: (neighbours per latent, alpha, minimum decoder cosine)."""
PLAIN_PREFIXES = (
    "",
    "Question: ",
    "Query: ",
    "Search query: ",
    "Find a passage that answers this question: ",
    "A user asks: ",
)
PASSAGE_PREFIXES = ("", "Passage: ", "Document: ")
"""Passage prefixes compared (read by the LLM, left out of the codes)."""
FUSION_WEIGHTS = (0.5, 1.0)
"""Weights of the other layer's BM25 scores added to the default layer's."""

DEFAULT_SETTINGS = ("1.0:3e-4:2", "3.0:1e-3:3")
CONTRASTIVE_BATCH = 128
"""Passages per fine-tuning batch (in-batch negatives)."""
SPAN_WORDS = (4, 12)
"""Pseudo-query length range in words."""
FVU_ROWS = 100_000
"""Activation rows (the first ones) on which a fine-tuned SAE's FVU and dead fraction are measured."""

PROMPTREPS_USER = (
    '{label}: "{text}"\nUse one word to represent the {kind} in a retrieval task. Make sure your word is in lowercase.'
)
"""PromptReps' user turn (Zhuang et al. 2024), `label` "Passage" or "Query", `kind` "passage" or "query"."""
PROMPTREPS_ANSWER = 'The word is "'
"""The assistant turn's opening, after the chat template's generation prompt: the next token starts the word."""
PROMPTREPS_RULE = "1"
"""Bumped when the vocabulary kept per text changes (`text_vocabularies`); part of the cache key."""
PROMPTREPS_WEIGHTS = (0.25, 0.5, 1.0)
"""Weights of the lexical run's max-normalised scores added to the SAE run's."""
RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al. 2009)."""


# --- collection and default setup --------------------------------------------------------------
@dataclass
class Collection:
    """A BEIR collection split into passages, the LLM that reads it and the bench cache root."""

    name: str
    llm: LoadedLlm
    documents: int
    passages: list[Passage]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    cache_root: Path
    texts: list[str] = field(init=False)
    doc_ids: list[str] = field(init=False)
    qids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.texts = [p.text for p in self.passages]
        self.doc_ids = [p.doc_id for p in self.passages]
        self.qids = list(self.queries)

    @property
    def query_texts(self) -> list[str]:
        return [self.queries[q] for q in self.qids]


@dataclass
class Setup:
    """One build configuration on a collection: passage and query activations and the SAE."""

    collection: Collection
    build: BuildConfig
    acts: TokenActivations
    sae: SparseAutoencoder
    query_acts: TokenActivations


def load_collection(
    dataset: str, split: str, build: BuildConfig, cache_root: Path, llm: LoadedLlm | None = None
) -> Collection:
    """Documents, judged queries and qrels of `dataset`, split into passages as `ragsae bench` does,
    read by `llm` (loaded from `build` if not given)."""
    documents, queries, qrels = load_beir(dataset, split)
    llm = llm or load_llm(build.llm, progress=True)
    passages = split_passages(documents, llm.tokenizer, build.capture.window, build.capture.overlap)
    return Collection(Path(dataset).resolve().name, llm, len(documents), passages, queries, qrels, cache_root)


def code_encoder(
    collection: Collection, build: BuildConfig, sae: SparseAutoencoder, pooling: str | None = None
) -> CodeEncoder:
    """The library's encoder for this build, reading and writing the bench activation cache."""
    cache = ActivationCache(collection.cache_root / "activations")
    return CodeEncoder(collection.llm, sae, build.capture, pooling or build.scoring.pooling, cache)


def activations(
    collection: Collection,
    build: BuildConfig,
    texts: list[str],
    prefix: str,
    progress: bool = False,
    stopwords: frozenset[str] = frozenset(),
) -> TokenActivations:
    """Activations of `texts` read with `prefix` at the build's layer (prefix and stopwords fed, not
    kept), through the bench activation cache."""
    cfg, cache = build.capture, ActivationCache(collection.cache_root / "activations")
    layer = cfg.layer
    return capture_cached(
        collection.llm,
        texts,
        [layer],
        fingerprint(texts),
        cache,
        cfg.window,
        cfg.batch_size,
        prefix,
        progress,
        stopwords,
    )[layer]


def read_queries(collection: Collection, build: BuildConfig, prefix: str) -> TokenActivations:
    """Query activations with `prefix` fed before each query; prefix and query stopwords not kept."""
    stopwords = STOPWORD_LISTS[build.capture.query_stopwords]
    return activations(collection, build, collection.query_texts, prefix, False, stopwords)


def make_setup(collection: Collection, build: BuildConfig) -> Setup:
    """Passage activations (`timed_capture`, no timing needed), the cached SAE and the query activations."""
    llm, cfg = collection.llm, build.capture
    cache = ActivationCache(collection.cache_root / "activations")
    acts, _ = timed_capture(llm, collection.texts, cfg, cache, True, need_timing=False)
    sae = cached_sae(llm, collection.texts, acts, cfg, build.sae, collection.cache_root, True)
    sae = sae.to(llm.device).eval()
    return Setup(collection, build, acts, sae, read_queries(collection, build, cfg.query_prefix))


# --- scoring helpers ----------------------------------------------------------------------------
def pool(
    setup: Setup, acts: TokenActivations, sae: SparseAutoencoder | None = None, progress: bool = False
) -> PooledCodes:
    """Pooled codes of `acts` under `sae` (default: the setup's) with the configured pooling."""
    encoder = code_encoder(setup.collection, setup.build, sae or setup.sae)
    return encoder.pool_activations(acts, progress=progress)


def run_metrics(collection: Collection, scores: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """Aggregate MEASURES of passage hits (nq, depth), a document scoring its best passage."""
    return evaluate(to_document_run(scores, ids, collection.qids, collection.doc_ids), collection.qrels)["aggregate"]


def sparse_run(
    setup: Setup, docs: PooledCodes, queries: PooledCodes, sae: SparseAutoencoder | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The library's sparse scoring (`Retriever`, configured BM25) of pooled codes: passage hits
    (scores, ids), each (nq, DEPTH)."""
    w_dec = (sae or setup.sae).W_dec.detach().cpu().numpy()
    retriever = Retriever.over(docs.codes, docs.lengths, w_dec, setup.build.scoring)
    return retriever.search(queries.codes, DEPTH, "sparse")


def sparse_metrics(
    setup: Setup, docs: PooledCodes, queries: PooledCodes, sae: SparseAutoencoder | None = None
) -> dict[str, float]:
    """The library's sparse scoring (`Retriever`, configured BM25) of pooled codes, evaluated."""
    return run_metrics(setup.collection, *sparse_run(setup, docs, queries, sae))


def bm25_scores(docs: PooledCodes, query_weights: sp.csr_matrix, k1: float, b: float) -> np.ndarray:
    """Dense (nq, n_passages) scores of query latent weights against BM25-weighted passage codes."""
    idf = latent_idf(docs.codes)
    weights = bm25_document_weights(docs.codes, docs.lengths, idf, k1, b, float(docs.lengths.mean()))
    return (query_weights @ inverted_index(weights)).toarray()


def per_row(codes: sp.csr_matrix) -> float:
    """Mean stored latents per row."""
    return float(codes.nnz / codes.shape[0])


def result_row(
    setting: str, metrics: dict[str, float], columns: dict[str, Any] | None = None, **details: Any
) -> dict[str, Any]:
    """One result: its label, the measures, study-specific table `columns` and JSON-only `details`."""
    return {"setting": setting, "metrics": metrics, "columns": columns or {}, **details}


# --- study: scoring ------------------------------------------------------------------------------
def reweighted(query_codes: sp.csr_matrix, weight: Callable[[np.ndarray], np.ndarray]) -> sp.csr_matrix:
    """Query codes with `weight` applied to each stored value."""
    out = query_codes.copy()
    out.data = weight(out.data)
    return out


def decoder_neighbours(w_dec: np.ndarray, m: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each latent's `m` nearest other latents by decoder cosine: ids and cosines, each (num_latents, m).

    Computed a block of rows at a time so the full (num_latents, num_latents) matrix never exists.
    """
    unit = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    ids = np.empty((len(unit), m), dtype=np.int64)
    cosines = np.empty((len(unit), m), dtype=unit.dtype)
    for lo in range(0, len(unit), block):
        sim = unit[lo : lo + block] @ unit.T
        sim[np.arange(len(sim)), np.arange(lo, lo + len(sim))] = 0  # a latent is not its own neighbour
        part = np.argpartition(-sim, m, axis=1)[:, :m]
        ids[lo : lo + len(sim)] = part
        cosines[lo : lo + len(sim)] = np.take_along_axis(sim, part, axis=1)
    return ids, cosines


def expand_queries(
    query_weights: sp.csr_matrix, ids: np.ndarray, cosines: np.ndarray, alpha: float, threshold: float
) -> sp.csr_matrix:
    """Add to each query latent's weight v its neighbours j with cosine c > threshold, at alpha * c * v."""
    q = query_weights.tocoo()
    neighbours, sims = ids[q.col], cosines[q.col]
    keep = sims > threshold
    rows = np.repeat(q.row, ids.shape[1]).reshape(neighbours.shape)[keep]
    values = (alpha * sims * q.data[:, None])[keep]
    added = sp.csr_matrix((values, (rows, neighbours[keep])), shape=q.shape)
    return (q.tocsr() + added).tocsr()


def study_scoring(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Baseline, query weightings, k1, b and decoder-direction query expansion on codes pooled once."""
    docs, queries = pool(setup, setup.acts, progress=True), pool(setup, setup.query_acts)
    scoring = setup.build.scoring
    q = queries.codes.astype(np.float32)

    def scored(label: str, weights: sp.csr_matrix, k1: float = scoring.k1, b: float = scoring.b, **details: Any):
        metrics = run_metrics(setup.collection, *top_k(bm25_scores(docs, weights, k1, b), DEPTH))
        return result_row(label, metrics, {"latents/query": per_row(weights)}, k1=k1, b=b, **details)

    base = sparse_metrics(setup, docs, queries)
    rows = [result_row("baseline", base, {"latents/query": per_row(q)}, k1=scoring.k1, b=scoring.b)]
    for name, weight in QUERY_WEIGHTINGS.items():
        rows.append(scored(f"query weights {name}", reweighted(q, weight), query_weights=name))
    rows += [scored(f"k1={k1}", q, k1=k1) for k1 in K1_VALUES]
    rows += [scored(f"b={b}", q, b=b) for b in B_VALUES]
    w_dec = setup.sae.W_dec.detach().cpu().numpy()
    neighbours: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for m, alpha, threshold in tqdm(EXPANSIONS, desc="query expansion"):
        if m not in neighbours:
            neighbours[m] = decoder_neighbours(w_dec, m)
        expanded = expand_queries(q, *neighbours[m], alpha, threshold)
        label = f"expansion m={m} alpha={alpha} cos>{threshold}"
        rows.append(scored(label, expanded, expansion={"neighbours": m, "alpha": alpha, "threshold": threshold}))
    return rows


# --- study: feedback ---------------------------------------------------------------------------
def study_feedback(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """No feedback, the FEEDBACK_* grid with uniform weighting, then rank weighting at weight 1.0 and
    100 latents, all through the library's feedback and sparse search."""
    docs, queries = pool(setup, setup.acts, progress=True), pool(setup, setup.query_acts)
    default = setup.build.scoring
    scoring = dataclasses.replace(default, feedback_passages=0)
    w_dec = setup.sae.W_dec.detach().cpu().numpy()
    retriever = Retriever.over(docs.codes, docs.lengths, w_dec, scoring)
    store = retriever.view.segments[0].sparse  # one segment: its CSR weights and postings
    q = retriever.query_weights(queries.codes)
    metrics = run_metrics(setup.collection, *sparse_search(q, store.postings, DEPTH))
    rows = [result_row("baseline: no feedback", metrics, {"latents/query": per_row(q)}, feedback_passages=0)]
    grid = [("uniform", p, w, n) for p in FEEDBACK_PASSAGES for w in FEEDBACK_WEIGHTS for n in FEEDBACK_LATENTS]
    grid += [("rank", p, 1.0, 100) for p in FEEDBACK_PASSAGES]
    firsts = {p: sparse_search(q, store.postings, p)[1] for p in FEEDBACK_PASSAGES}
    for weighting, passages, weight, latents in grid:
        expanded = feedback_queries(
            q,
            firsts[passages],
            store.weights,
            row_norms(store.weights),
            weight,
            latents,
            weighting,
        )
        metrics = run_metrics(setup.collection, *sparse_search(expanded, store.postings, DEPTH))
        label = f"{weighting}: passages={passages} weight={weight} latents={latents}"
        setting = (weighting, passages, weight, latents)
        chosen = (default.feedback_weighting, default.feedback_passages, default.feedback_weight)
        if setting == (*chosen, default.feedback_latents):
            label += " (default)"
        details = {
            "feedback_weighting": weighting,
            "feedback_passages": passages,
            "feedback_weight": weight,
            "feedback_latents": latents,
        }
        rows.append(result_row(label, metrics, {"latents/query": per_row(expanded)}, **details))
    return rows


# --- study: prefix -------------------------------------------------------------------------------
def chat_user_prefix(tokenizer: Any) -> str:
    """What the tokenizer's chat template puts before a user message's content."""
    marker = "XQX"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text.split(marker)[0]


def query_prefixes(tokenizer: Any) -> list[tuple[str, str]]:
    """(label, prefix) pairs of the prefix study."""
    chat = chat_user_prefix(tokenizer)
    plain = [(repr(p) if p else "no prefix", p) for p in PLAIN_PREFIXES]
    return [*plain, ("chat-template user turn", chat), ("chat-template user turn + 'Question: '", chat + "Question: ")]


def study_prefix(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per query prefix; passage codes pooled once."""
    docs = pool(setup, setup.acts, progress=True)
    rows = []
    for label, prefix in tqdm(query_prefixes(setup.collection.llm.tokenizer), desc="prefixes"):
        queries = pool(setup, read_queries(setup.collection, setup.build, prefix))
        if prefix == setup.build.capture.query_prefix:
            label += " (default)"
        metrics = sparse_metrics(setup, docs, queries)
        rows.append(result_row(label, metrics, {"latents/query": per_row(queries.codes)}, prefix=prefix))
    return rows


# --- study: passage prefix ----------------------------------------------------------------------
def study_passage_prefix(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per passage prefix: passages captured again with it, coded by the setup's SAE."""
    queries = pool(setup, setup.query_acts)
    rows = []
    for prefix in tqdm(PASSAGE_PREFIXES, desc="passage prefixes"):
        docs = pool(setup, activations(setup.collection, setup.build, setup.collection.texts, prefix, True))
        label = repr(prefix) if prefix else "no passage prefix"
        if prefix == setup.build.capture.passage_prefix:
            label += " (default)"
        rows.append(result_row(label, sparse_metrics(setup, docs, queries), prefix=prefix))
    return rows


# --- study: passage stopwords -------------------------------------------------------------------
def passage_token_spans(setup: Setup) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each passage with the character spans of its captured tokens (the capture's own tokenisation,
    passage prefix fed and left out, spans shifted back onto the passage's own text)."""
    texts, cfg = setup.collection.texts, setup.build.capture
    ids, skip, fed = tokenize(setup.collection.llm, texts, cfg.window, cfg.passage_prefix)
    n_bos = len(ids[0]) - len(fed[0][1])
    shift = len(fed[0][0]) - len(texts[0])  # characters the prefix adds
    spans = [
        (text, [(max(0, a - shift), max(0, b - shift)) for a, b in offsets[skip - n_bos :]])
        for text, (_, offsets) in zip(texts, fed)
    ]
    if not np.array_equal([len(offsets) for _, offsets in spans], setup.acts.lengths()):
        raise RuntimeError("passage tokenisation does not match the cached activations")
    return spans


def without_stopwords(setup: Setup, stopwords: frozenset[str]) -> TokenActivations:
    """Passage activations with the tokens of `stopwords` dropped (`content_mask`, as for queries)."""
    masks = [content_mask(text, offsets, stopwords) for text, offsets in passage_token_spans(setup)]
    keep = np.concatenate(masks)
    offsets = np.concatenate([[0], np.cumsum([int(m.sum()) for m in masks])]).astype(np.int64)
    return TokenActivations(np.asarray(setup.acts.values)[keep], offsets)


def study_passage_stopwords(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Baseline against English function words left out of the passage codes too."""
    queries = pool(setup, setup.query_acts)
    rows = []
    for label, acts in (
        ("baseline", setup.acts),
        ("passage stopwords left out", without_stopwords(setup, STOPWORD_LISTS["english"])),
    ):
        docs = pool(setup, acts, progress=True)
        columns = {"latents/passage": per_row(docs.codes), "tokens/passage": float(docs.lengths.mean())}
        rows.append(result_row(label, sparse_metrics(setup, docs, queries), columns))
    return rows


# --- study: multilayer --------------------------------------------------------------------------
def other_layer_build(build: BuildConfig, layer: int, epochs: int) -> BuildConfig:
    """`build` capturing `layer`, its SAE trained for `epochs`."""
    return dataclasses.replace(
        build,
        capture=dataclasses.replace(build.capture, layer=layer),
        sae=dataclasses.replace(build.sae, epochs=epochs),
    )


def study_multilayer(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Default layer alone, the other layer alone, and their BM25 scores added (weighted)."""
    other = make_setup(setup.collection, other_layer_build(setup.build, args.other_layer, args.other_epochs))
    rows, scores, sizes = [], [], []
    for s in (setup, other):
        docs, queries = pool(s, s.acts, progress=True), pool(s, s.query_acts)
        layer, epochs = s.build.capture.layer, s.build.sae.epochs
        columns = {"latents/passage": per_row(docs.codes)}
        rows.append(result_row(f"layer {layer} alone ({epochs}-epoch SAE)", sparse_metrics(s, docs, queries), columns))
        scores.append(bm25_scores(docs, queries.codes, s.build.scoring.k1, s.build.scoring.b))
        sizes.append(per_row(docs.codes))
    layers = f"layers {setup.build.capture.layer} + {other.build.capture.layer}"
    for weight in FUSION_WEIGHTS:
        metrics = run_metrics(setup.collection, *top_k(scores[0] + weight * scores[1], DEPTH))
        label = f"{layers} (weight {weight} on layer {other.build.capture.layer})"
        rows.append(result_row(label, metrics, {"latents/passage": sum(sizes)}, weight=weight))
    return rows


# --- study: contrastive fine-tuning -------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneSetting:
    """One contrastive fine-tuning run: `--settings LAMBDA:LR:EPOCHS[:easy]`."""

    lam: float
    """Weight of the InfoNCE loss against the FVU."""
    lr: float
    """Adam learning rate (constant)."""
    epochs: int
    """Passes over the passages."""
    easy: bool = False
    """Span kept in its passage, random batches, scale initialised to 1 (the first variant tried)."""

    @classmethod
    def parse(cls, text: str) -> FinetuneSetting:
        parts = text.split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "easy"):
            raise ValueError(f"setting {text!r}: expected LAMBDA:LR:EPOCHS or LAMBDA:LR:EPOCHS:easy")
        try:
            setting = cls(float(parts[0]), float(parts[1]), int(parts[2]), len(parts) == 4)
        except ValueError:
            raise ValueError(f"setting {text!r}: LAMBDA and LR must be numbers, EPOCHS an integer") from None
        if setting.lam < 0 or setting.lr <= 0 or setting.epochs < 1:
            raise ValueError(f"setting {text!r}: need LAMBDA >= 0, LR > 0, EPOCHS >= 1")
        return setting

    @property
    def label(self) -> str:
        variant = "span kept, random batches" if self.easy else "span removed, clustered batches"
        return f"lambda={self.lam:g} lr={self.lr:g} epochs={self.epochs} ({variant})"


@dataclass
class TrainingData:
    """What fine-tuning reads: passages, one pseudo-query per passage, and statistics of the frozen SAE."""

    passages: TokenActivations
    pseudo_queries: TokenActivations
    keep: list[np.ndarray] | None
    """Per passage, the tokens kept (the pseudo-query's span removed); None keeps all."""
    idf: torch.Tensor
    avg_length: float
    cluster_vectors: np.ndarray | None
    """Decoder-space vectors of the passages (clustered into batches); None for random batches."""


def random_spans(texts: list[str], rng: np.random.Generator, lo: int, hi: int) -> list[str]:
    """A random run of lo..hi whitespace-separated words of each text (the whole text if shorter)."""
    spans = []
    for text in texts:
        words = text.split()
        n = int(rng.integers(lo, hi + 1))
        if len(words) <= n:
            spans.append(" ".join(words))
            continue
        start = int(rng.integers(0, len(words) - n + 1))
        spans.append(" ".join(words[start : start + n]))
    return spans


def inverse_cloze_spans(setup: Setup, rng: np.random.Generator, lo: int, hi: int) -> tuple[list[str], list[np.ndarray]]:
    """Per passage a span of lo..hi words (a third of the passage at most) and the mask of tokens outside it."""
    spans, keep = [], []
    for text, offsets in passage_token_spans(setup):
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        n = int(rng.integers(lo, hi + 1))
        if len(words) < 2 * n:
            n = max(1, len(words) // 3)
        start = int(rng.integers(0, len(words) - n + 1))
        a, e = words[start][0], words[start + n - 1][1]
        spans.append(text[a:e])
        mask = np.array([not (s >= a and t <= e) for s, t in offsets])
        keep.append(mask if mask.any() else np.ones_like(mask))
    return spans, keep


def training_data(setup: Setup, setting: FinetuneSetting, rng: np.random.Generator) -> TrainingData:
    """Pseudo-queries (captured with the query prefix and stopwords), masks, IDF and cluster vectors."""
    collection, cfg = setup.collection, setup.build.capture
    if setting.easy:
        spans, keep = random_spans(collection.texts, rng, *SPAN_WORDS), None
    else:
        spans, keep = inverse_cloze_spans(setup, rng, *SPAN_WORDS)
    encoder = code_encoder(collection, setup.build, setup.sae, "sum")
    pseudo = activations(collection, setup.build, spans, cfg.query_prefix, True, STOPWORD_LISTS[cfg.query_stopwords])
    codes = encoder.pool_activations(setup.acts)
    idf = latent_idf(codes.codes)
    vectors = None
    if not setting.easy:
        w_dec = setup.sae.W_dec.detach().cpu().numpy()
        vectors = decoder_vectors(codes.codes.multiply(idf[None]).tocsr(), w_dec)
    device = next(setup.sae.parameters()).device
    return TrainingData(
        setup.acts, pseudo, keep, torch.from_numpy(idf).to(device), float(codes.lengths.mean()), vectors
    )


def cluster_batches(vectors: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Passages ordered by spherical k-means cluster (random within one), cut into full batches."""
    import faiss

    kmeans = faiss.Kmeans(
        vectors.shape[1], max(1, len(vectors) // size), niter=10, seed=int(rng.integers(1_000_000)), spherical=True
    )
    kmeans.train(vectors)
    _, labels = kmeans.index.search(vectors, 1)
    order = np.lexsort((rng.random(len(vectors)), labels[:, 0]))
    return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]


def random_batches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation of n passages cut into full batches (the remainder is left out)."""
    order = rng.permutation(n)
    return [order[i : i + size] for i in range(0, n - size + 1, size)]


def epoch_batches(data: TrainingData, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches: shuffled k-means clusters, or random ones without cluster vectors."""
    if data.cluster_vectors is None:
        return random_batches(len(data.passages), size, rng)
    batches = cluster_batches(data.cluster_vectors, size, rng)
    rng.shuffle(batches)
    return batches


def token_rows(
    acts: TokenActivations, items: np.ndarray, keep: list[np.ndarray] | None
) -> tuple[torch.Tensor, np.ndarray]:
    """float32 token activations of texts `items` (masked by `keep`) and their offsets."""
    rows = [np.arange(acts.offsets[i], acts.offsets[i + 1]) for i in items]
    if keep is not None:
        rows = [r[keep[i]] for r, i in zip(rows, items)]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return torch.from_numpy(np.asarray(acts.values[np.concatenate(rows)], dtype=np.float32)), offsets


def pooled_sum(sae: SparseAutoencoder, x: torch.Tensor, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sum-pooled codes (n_texts, num_latents) of tokens `x` and the tokens' FVU."""
    out = sae(x)  # top-k chosen without autograd, the chosen values recomputed with it
    n, latents = len(offsets) - 1, sae.num_latents
    counts = torch.from_numpy(np.diff(offsets)).to(x.device)
    text_of_token = torch.repeat_interleave(torch.arange(n, device=x.device), counts)
    flat = torch.zeros(n * latents, device=x.device)
    flat = flat.index_add(0, (text_of_token[:, None] * latents + out.indices).reshape(-1), out.values.reshape(-1))
    return flat.view(n, latents), out.fvu


def bm25_weights_torch(
    tf: torch.Tensor, lengths: torch.Tensor, idf: torch.Tensor, k1: float, b: float, avg_length: float
) -> torch.Tensor:
    """Differentiable `bm25_document_weights` of dense pooled codes (n, num_latents)."""
    norm = k1 * (1 - b + b * lengths / avg_length)
    return idf * tf * (k1 + 1) / (tf + norm[:, None])


def batch_scores(
    sae: SparseAutoencoder, data: TrainingData, items: np.ndarray, scoring: ScoringConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw in-batch scores (pseudo-queries x passages) and the FVU of the batch's passage tokens."""
    device = data.idf.device
    xd, doc_offsets = token_rows(data.passages, items, data.keep)
    xq, query_offsets = token_rows(data.pseudo_queries, items, None)
    docs, fvu = pooled_sum(sae, xd.to(device), doc_offsets)
    queries, _ = pooled_sum(sae, xq.to(device), query_offsets)
    lengths = torch.from_numpy(np.diff(doc_offsets).astype(np.float32)).to(device)
    weights = bm25_weights_torch(docs, lengths, data.idf, scoring.k1, scoring.b, data.avg_length)
    return queries @ weights.T, fvu


def finetune(
    setup: Setup, setting: FinetuneSetting, seed: int, batch_size: int = CONTRASTIVE_BATCH
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """A fine-tuned copy of the setup's SAE and its training record (deterministic on CPU for a seed)."""
    if setup.sae.config.architecture != "topk":
        raise ValueError("contrastive fine-tuning needs a topk SAE")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    data = training_data(setup, setting, rng)
    prepared = time.perf_counter()
    sae = copy.deepcopy(setup.sae).train()
    log_scale = torch.nn.Parameter(torch.zeros((), device=data.idf.device))
    optimiser = torch.optim.Adam([*sae.parameters(), log_scale], lr=setting.lr)
    history: list[dict[str, float]] = []
    steps = setting.epochs * (len(data.passages) // batch_size)
    with tqdm(total=steps, desc=f"fine-tune {setting.label}") as bar:
        for epoch in range(setting.epochs):
            for step, items in enumerate(epoch_batches(data, batch_size, rng)):
                raw, fvu = batch_scores(sae, data, items, setup.build.scoring)
                if epoch == 0 and step == 0 and not setting.easy:  # start with unit-spread logits
                    with torch.no_grad():
                        log_scale.fill_(-torch.log(raw.std(1).mean()).item())
                scores = raw * log_scale.exp()
                labels = torch.arange(len(items), device=scores.device)
                ce = F.cross_entropy(scores, labels)
                optimiser_step(sae, optimiser, fvu + setting.lam * ce, sae.config.grad_clip)
                acc = (scores.argmax(1) == labels).float().mean().item()
                history.append({"epoch": epoch, "ce": ce.item(), "fvu": fvu.item(), "acc": acc})
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(ce=f"{ce.item():.3f}", fvu=f"{fvu.item():.3f}", acc=f"{acc:.2f}")
    record = training_record(history, setting.epochs)
    record.update(
        prepare_seconds=prepared - started,
        train_seconds=time.perf_counter() - prepared,
        final_scale=log_scale.exp().item(),
    )
    return sae.eval(), record


def training_record(history: list[dict[str, float]], epochs: int) -> dict[str, Any]:
    """Per-epoch means of CE, FVU and in-batch accuracy; the last epoch's mean CE and accuracy."""
    per_epoch = [
        {key: float(np.mean([h[key] for h in history if h["epoch"] == e])) for key in ("ce", "fvu", "acc")}
        for e in range(epochs)
    ]
    return {"epochs": per_epoch, "final_ce": per_epoch[-1]["ce"], "final_acc": per_epoch[-1]["acc"]}


def sae_row(
    setup: Setup,
    label: str,
    sae: SparseAutoencoder,
    sample: np.ndarray,
    extra_columns: dict[str, Any] | None = None,
    **details: Any,
) -> dict[str, Any]:
    """Retrieval with `sae`'s codes of the setup's passages and queries, and its FVU and dead
    fraction on `sample` (activations of the collection's passages)."""
    docs, queries = pool(setup, setup.acts, sae, progress=True), pool(setup, setup.query_acts, sae)
    stats = evaluate_sae(sae, sample, setup.collection.llm.device)
    columns = {"FVU": stats["fvu"], "dead": stats["dead_fraction"], "latents/passage": per_row(docs.codes)}
    metrics = sparse_metrics(setup, docs, queries, sae)
    return result_row(label, metrics, {**columns, **(extra_columns or {})}, sae_stats=stats, **details)


def contrastive_row(
    setup: Setup,
    label: str,
    sae: SparseAutoencoder,
    sample: np.ndarray,
    record: dict[str, Any] | None = None,
    **details: Any,
) -> dict[str, Any]:
    """`sae_row` with the fine-tuning record's columns."""
    record = record or {}
    columns = {
        "train s": record.get("train_seconds"),
        "CE (last epoch)": record.get("final_ce"),
        "acc (last epoch)": record.get("final_acc"),
    }
    return sae_row(setup, label, sae, sample, columns, training=record or None, **details)


def study_contrastive(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cached SAE, then one fine-tuned copy per `--settings` entry."""
    sample = np.asarray(setup.acts.values[:FVU_ROWS], dtype=np.float32)
    rows = [contrastive_row(setup, "baseline", setup.sae, sample)]
    for setting in args.parsed_settings:
        sae, record = finetune(setup, setting, setup.build.sae.seed)
        rows.append(contrastive_row(setup, setting.label, sae, sample, record, finetune=dataclasses.asdict(setting)))
    return rows


# --- study: SAEs trained on other text --------------------------------------------------------
def study_shared_sae(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The collection's own SAE; each `--with` collection's own SAE (its default build, trained on its
    passages only); and one SAE trained on the passages of all of them together (default config,
    cached like any bench SAE). Always scored on this collection's passages and queries."""
    build, llm, cfg = setup.build, setup.collection.llm, setup.build.capture
    cache = ActivationCache(setup.collection.cache_root / "activations")
    sample = np.asarray(setup.acts.values[:FVU_ROWS], dtype=np.float32)

    def key(texts: list[str]) -> str:
        return activations_id(llm, cfg.layer, cfg.window, cfg.passage_prefix, fingerprint(texts))

    parts = {key(setup.collection.texts): (setup.collection.name, setup.collection.texts, setup.acts)}
    rows = [sae_row(setup, f"own SAE ({setup.collection.name} passages)", setup.sae, sample)]
    for dataset in args.with_datasets:
        other = load_collection(dataset, args.split, build, setup.collection.cache_root, llm)
        acts, _ = timed_capture(llm, other.texts, cfg, cache, True, need_timing=False)
        sae = cached_sae(llm, other.texts, acts, cfg, build.sae, setup.collection.cache_root, True).eval()
        rows.append(sae_row(setup, f"{other.name}'s SAE ({other.name} passages)", sae, sample))
        parts[key(other.texts)] = (other.name, other.texts, acts)
    keys = sorted(parts)  # one order, so that every collection of the union reads the same cached SAE
    values = np.concatenate([np.asarray(parts[k][2].values) for k in keys])
    texts = [text for k in keys for text in parts[k][1]]
    lengths = np.concatenate([parts[k][2].lengths() for k in keys])
    union = TokenActivations(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    sae = cached_sae(llm, texts, union, cfg, build.sae, setup.collection.cache_root, True).eval()
    names = " + ".join(parts[k][0] for k in keys)
    rows.append(sae_row(setup, f"shared SAE ({names} passages, {len(values)} tokens)", sae, sample))
    return rows


# --- output ---------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """Table cell text: 4 decimals below 10, 1 above, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    """setting, MEASURES, then every study-specific column in first-seen order."""
    extra = list(dict.fromkeys(key for row in rows for key in row["columns"]))
    head = ["setting", *MEASURES, *extra]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["setting"].replace("|", "\\|")]
        cells += [format_value(row["metrics"][m]) for m in MEASURES]
        cells += [format_value(row["columns"].get(key)) for key in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- study: echo ------------------------------------------------------------------------------
def echoed(
    setup: Setup, texts: list[str], prefix: str, stopwords: frozenset[str], plain: TokenActivations
) -> tuple[TokenActivations, int, list[str]]:
    """Activations of each text's second reading when it is fed twice, "PREFIX TEXT\nPREFIX TEXT": every
    kept token has seen the whole text once (echo embeddings, Springer et al. 2024). The second copy is
    tokenised as the plain reading is, so its rows are the last ones of each echoed text, as many as
    `plain` (the text read once) has; returns them and how many texts' tokens differed from the plain
    reading's (0 expected), and the doubled texts."""
    collection, cfg = setup.collection, setup.build.capture
    lead = prefix.rstrip()
    doubled = [f"{text}\n{lead} {text}" if lead else f"{text}\n{text}" for text in texts]
    window = 2 * cfg.window + 16  # both copies, never cut: passages are split to `window` tokens
    acts = capture_cached(
        collection.llm,
        doubled,
        [cfg.layer],
        fingerprint(doubled),
        ActivationCache(collection.cache_root / "activations"),
        window,
        cfg.batch_size,
        prefix,
        True,
        stopwords,
    )[cfg.layer]
    once, skip, _ = tokenize(collection.llm, texts, cfg.window, prefix)
    twice, _, _ = tokenize(collection.llm, doubled, window, prefix)
    differ = sum(a[len(a) - (len(b) - skip) :] != b[skip:] for a, b in zip(twice, once))
    keep = np.zeros(len(acts.values), dtype=bool)
    for i, count in enumerate(plain.lengths()):
        keep[acts.offsets[i + 1] - count : acts.offsets[i + 1]] = True
    return TokenActivations(np.asarray(acts.values)[keep], plain.offsets), int(differ), doubled


def study_echo(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The default build against passages read twice and coded from their second reading (an SAE
    trained on those activations, default config), with queries read once and read twice."""
    collection, build = setup.collection, setup.build
    cfg = build.capture
    plain_queries = pool(setup, setup.query_acts)
    rows = [result_row("read once (default)", sparse_metrics(setup, pool(setup, setup.acts), plain_queries))]
    passages, differ, doubled = echoed(setup, collection.texts, cfg.passage_prefix, frozenset(), setup.acts)
    # Keyed by the doubled texts, so that it never stands in for the default build's SAE.
    sae = cached_sae(collection.llm, doubled, passages, cfg, build.sae, collection.cache_root, True).eval()
    stopwords = STOPWORD_LISTS[cfg.query_stopwords]
    queries, differ_q, _ = echoed(setup, collection.query_texts, cfg.query_prefix, stopwords, setup.query_acts)
    quality = evaluate_sae(sae, np.asarray(passages.values[:FVU_ROWS], dtype=np.float32), collection.llm.device)
    docs = pool(setup, passages, sae)
    for label, query_acts in (("passages echoed, queries once", setup.query_acts), ("both echoed", queries)):
        rows.append(
            result_row(
                label,
                sparse_metrics(setup, docs, pool(setup, query_acts, sae), sae),
                {"FVU": round(quality["fvu"], 4)},
                token_mismatches={"passages": differ, "queries": differ_q},
            )
        )
    return rows


# --- study: promptreps --------------------------------------------------------------------------
def promptreps_prompts(tokenizer: Any, texts: list[str], kind: str) -> list[str]:
    """Each text in PromptReps' user turn through the tokenizer's chat template, with the generation
    prompt and the assistant's opening `PROMPTREPS_ANSWER` (`kind`: "passage" or "query")."""
    prompts = []
    for text in texts:
        user = PROMPTREPS_USER.format(label=kind.capitalize(), text=text, kind=kind)
        turn = [{"role": "user", "content": user}]
        chat = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        prompts.append(chat + PROMPTREPS_ANSWER)
    return prompts


def text_vocabularies(tokenizer: Any, texts: list[str], stopwords: frozenset[str]) -> list[np.ndarray]:
    """Per text, the sorted vocabulary ids its lexical vector keeps: for each word of the lowercased text
    (a run of letters and digits with a letter in it) that is not a stopword, every token of the word
    tokenised alone (its form right after the opening quote, which the prompt asks for in lowercase) and
    the first token of " " + word (its form inside running text). PromptReps keeps the text's own
    lowercased words, English stopwords and punctuation left out, the same way."""
    words = [
        {w for w in re.findall(r"\w*[^\W\d_]\w*", text.lower()) if w not in stopwords}  # at least one letter
        for text in texts
    ]
    unique = sorted(set().union(*words))
    plain = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    spaced = tokenizer([" " + w for w in unique], add_special_tokens=False)["input_ids"] if unique else []
    ids = {w: {*p, *s[:1]} for w, p, s in zip(unique, plain, spaced)}
    return [np.array(sorted(set().union(*(ids[w] for w in ws))), dtype=np.int64) for ws in words]


def promptreps_vectors(
    llm: LoadedLlm, texts: list[str], kind: str, stopwords: frozenset[str], batch_size: int, progress: bool = False
) -> tuple[sp.csr_matrix, float]:
    """PromptReps lexical vectors (n_texts, vocab) as CSR, and the seconds the forward passes took.

    One full forward per prompt (`promptreps_prompts`), the LM head applied at the last position only
    (`logits_to_keep=1`): log1p(relu(next-token logits)), kept on the text's `text_vocabularies`. Prompts
    are batched by length and padded on the left, with position ids counted from each prompt's first
    token, so that the last position is every prompt's own and its logits match an unpadded pass.
    """
    tokenizer, model = llm.tokenizer, llm.model
    with llm.lock:  # a fast tokenizer is shared state
        prompt_ids = tokenizer(promptreps_prompts(tokenizer, texts, kind), add_special_tokens=False)["input_ids"]
        vocab = text_vocabularies(tokenizer, texts, stopwords)
    width = int(model.config.vocab_size)
    order = np.argsort([len(ids) for ids in prompt_ids], kind="stable")
    rows: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(texts)
    started = time.perf_counter()
    with torch.inference_mode():
        for lo in tqdm(range(0, len(order), batch_size), desc=f"PromptReps {kind}s", disable=not progress):
            batch = order[lo : lo + batch_size]
            longest = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), longest), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                input_ids[row, longest - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
                mask[row, longest - len(prompt_ids[i]) :] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            out = model(
                input_ids=input_ids.to(llm.device),
                attention_mask=mask.to(llm.device),
                position_ids=positions.to(llm.device),
                logits_to_keep=1,
            )
            weights = torch.log1p(torch.relu(out.logits[:, -1].float())).cpu().numpy()
            for row, i in enumerate(batch):
                rows[i] = weights[row, vocab[i]]
    seconds = time.perf_counter() - started
    lengths = np.array([len(v) for v in vocab], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.empty(0, dtype=np.int64), *vocab])
    data = np.concatenate([np.empty(0, dtype=np.float32), *rows]).astype(np.float32)
    vectors = sp.csr_matrix((data, indices, indptr), shape=(len(texts), width))
    vectors.eliminate_zeros()  # relu zeros
    return vectors, seconds


def promptreps_passages(setup: Setup, stopwords: frozenset[str], progress: bool = True) -> tuple[sp.csr_matrix, float]:
    """The passages' PromptReps vectors and the seconds their forward took, cached under
    CACHE_DIR/promptreps keyed by the model's weights and dtype, the prompt, the kept vocabulary's rule and
    stopwords, and the passages (the seconds are those of the run that filled the cache)."""
    collection, llm = setup.collection, setup.collection.llm
    parts = [llm.activation_key, PROMPTREPS_USER, PROMPTREPS_ANSWER, PROMPTREPS_RULE]
    identity = "|".join([*parts, fingerprint(sorted(stopwords)), fingerprint(collection.texts)])
    path = collection.cache_root / "promptreps" / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as saved:
            shape = tuple(int(n) for n in saved["shape"])
            vectors = sp.csr_matrix((saved["data"], saved["indices"], saved["indptr"]), shape=shape)
            return vectors, float(saved["seconds"])
    batch_size = setup.build.capture.batch_size
    vectors, seconds = promptreps_vectors(llm, collection.texts, "passage", stopwords, batch_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as handle:
        arrays = {"data": vectors.data, "indices": vectors.indices, "indptr": vectors.indptr}
        np.savez(handle, **arrays, shape=np.array(vectors.shape), seconds=np.array(seconds))
    return vectors, seconds


def fuse_runs(
    runs: list[tuple[np.ndarray, np.ndarray]], weights: list[float], depth: int, rrf_k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Passage hits (scores, ids), each (nq, k) padded with -1, fused per query over the union of the
    runs' passages; a passage missing from a run gets 0 from it. Each run adds weight * score / the
    query's best score in that run (0 when that is not positive), or with `rrf_k` weight / (rrf_k + rank),
    rank counted from 1 (reciprocal-rank fusion). Returns the best `depth` as (scores, ids), each
    (nq, depth), padded with -inf / -1."""
    nq = len(runs[0][0])
    fused_scores = np.full((nq, depth), -np.inf)
    fused_ids = np.full((nq, depth), -1, dtype=np.int64)
    for q in range(nq):
        total: dict[int, float] = {}
        for (scores, ids), weight in zip(runs, weights):
            hit = (ids[q] >= 0) & np.isfinite(scores[q])
            if rrf_k is not None:
                values = weight / (rrf_k + 1.0 + np.flatnonzero(hit))
            else:
                best = scores[q][hit].max(initial=0.0)
                values = weight * scores[q][hit] / best if best > 0 else np.zeros(int(hit.sum()))
            for pid, value in zip(ids[q][hit].tolist(), values.tolist()):
                total[pid] = total.get(pid, 0.0) + value
        best_first = sorted(total.items(), key=lambda item: -item[1])[:depth]
        fused_ids[q, : len(best_first)] = [pid for pid, _ in best_first]
        fused_scores[q, : len(best_first)] = [value for _, value in best_first]
    return fused_scores, fused_ids


def study_promptreps(setup: Setup, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The SAE codes, PromptReps lexical vectors from the LLM alone (dot product), the two fused by
    max-normalised scores (weight on the lexical run) and by reciprocal rank."""
    collection, build = setup.collection, setup.build
    stopwords = STOPWORD_LISTS[build.capture.query_stopwords]
    docs = pool(setup, setup.acts, progress=True)
    sae = sparse_run(setup, docs, pool(setup, setup.query_acts))
    passages, passage_seconds = promptreps_passages(setup, stopwords)
    queries, query_seconds = promptreps_vectors(
        collection.llm, collection.query_texts, "query", stopwords, build.capture.batch_size
    )
    lexical = sparse_search(queries, inverted_index(passages), DEPTH)
    columns = {
        "lexical forward ms/passage": 1e3 * passage_seconds / passages.shape[0],
        "non-zeros/passage": per_row(passages),
    }
    details = {
        "lexical_seconds": {"passages": passage_seconds, "queries": query_seconds},
        "lexical_nonzeros_per_query": per_row(queries),
        "lexical_device": str(collection.llm.device),
        "lexical_dtype": collection.llm.dtype_name,
    }
    rows = [
        result_row("SAE codes (default)", run_metrics(collection, *sae), {"non-zeros/passage": per_row(docs.codes)}),
        result_row("PromptReps lexical alone", run_metrics(collection, *lexical), columns, **details),
    ]
    for weight in PROMPTREPS_WEIGHTS:
        fused = fuse_runs([sae, lexical], [1.0, weight], DEPTH)
        rows.append(result_row(f"fused w={weight}", run_metrics(collection, *fused), lexical_weight=weight))
    rrf = fuse_runs([sae, lexical], [1.0, 1.0], DEPTH, rrf_k=RRF_K)
    rows.append(result_row(f"RRF (k={RRF_K})", run_metrics(collection, *rrf), rrf_k=RRF_K))
    return rows


STUDY_FUNCTIONS: dict[str, Callable[[Setup, argparse.Namespace], list[dict[str, Any]]]] = {
    "scoring": study_scoring,
    "feedback": study_feedback,
    "prefix": study_prefix,
    "passage-prefix": study_passage_prefix,
    "passage-stopwords": study_passage_stopwords,
    "multilayer": study_multilayer,
    "contrastive": study_contrastive,
    "shared-sae": study_shared_sae,
    "echo": study_echo,
    "promptreps": study_promptreps,
}
STUDY_OPTIONS = {
    "multilayer": ("other_layer", "other_epochs"),
    "contrastive": ("settings",),
    "shared-sae": ("with_datasets",),
}


def run_study(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Run `args.study` on `args.dataset`; write its JSON and Markdown; return the JSON and the table."""
    started, commit = time.perf_counter(), git_commit()
    build = BuildConfig()
    torch.manual_seed(build.sae.seed)
    collection = load_collection(args.dataset, args.split, build, Path(args.cache_dir))
    setup = make_setup(collection, build)
    rows = STUDY_FUNCTIONS[args.study](setup, args)
    options = {name: getattr(args, name) for name in STUDY_OPTIONS.get(args.study, ())}
    result = study_record(collection, args.study, args.split, str(args.dataset), build, commit, options)
    result.update(seconds=time.perf_counter() - started, rows=rows)
    title = (
        f"{collection.name}: {args.study} ({collection.documents} documents, {len(collection.queries)} judged queries)"
    )
    table = markdown_table(rows, title)
    write_study(Path(args.output_dir), study_stem(collection.name, args.study), result, table)
    return result, table


def study_record(
    collection: Any, study: str, split: str, dataset: str, build: BuildConfig, commit: str | None, options: dict
) -> dict[str, Any]:
    """What every study's JSON starts with: the collection, the command, commit, machine and build."""
    return {
        "collection": collection.name,
        "study": study,
        "dataset": dataset,
        "split": split,
        "documents": collection.documents,
        "passages": len(collection.passages),
        "queries": len(collection.queries),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": commit,
        "machine": machine(),
        "versions": library_versions(),
        "build": to_dict(build),
        "options": options,
    }


def study_stem(collection: str, study: str) -> str:
    """The name (without suffix) of a study's result files."""
    return f"{collection}-explore-{study}"


def print_study(result: dict[str, Any], table: str, out: str, study: str) -> None:
    """A study's table, then where `write_study` put its files."""
    print(table)
    print(f"wrote {out}/{study_stem(result['collection'], study)}.json and .md ({result['seconds']:.0f} s)")


def write_study(out: Path, stem: str, result: dict[str, Any], table: str) -> None:
    """OUT/STEM.json and OUT/STEM.md (the table and the command)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", result)
    write_text_atomic(out / f"{stem}.md", table + f"\nCommand: `{result['command']}`\n")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Exploration studies over ragsae's default build on a BEIR collection (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dataset", help="BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
    parser.add_argument("study", choices=STUDIES, help="which study to run")
    parser.add_argument("--split", default="test", help="qrels split")
    parser.add_argument("--cache-dir", default="benchmarks/.cache", help="activation and SAE cache (shared with bench)")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON and Markdown go")
    parser.add_argument("--other-layer", type=int, default=6, help="multilayer: the layer added to the default one")
    parser.add_argument("--other-epochs", type=int, default=1, help="multilayer: SAE epochs for --other-layer")
    parser.add_argument(
        "--with",
        dest="with_datasets",
        nargs="+",
        default=[],
        metavar="DATASET_DIR",
        help="shared-sae: other BEIR collections whose passages the shared SAE also trains on",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=list(DEFAULT_SETTINGS),
        metavar="LAMBDA:LR:EPOCHS[:easy]",
        help="contrastive: one fine-tuning run each; ':easy' keeps the span in the passage and batches at random",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        args.parsed_settings = [FinetuneSetting.parse(s) for s in args.settings]
    except ValueError as error:
        parser.error(str(error))
    if args.other_epochs < 1:
        parser.error("--other-epochs must be >= 1")
    if args.study == "shared-sae" and not args.with_datasets:
        parser.error("shared-sae needs --with DATASET_DIR [...]")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print_study(*run_study(args), args.output_dir, args.study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
