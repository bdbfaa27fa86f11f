"""The build pipeline: corpus -> (sanitised) passages -> activations -> (SAE trained) -> pooled codes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..capture import ActivationCache, TokenActivations, check_layer
from ..config import BuildConfig, CaptureConfig, RayBuild
from ..encode import CodeEncoder, PooledCodes, check_sae_matches, fit_sae, passage_activations
from ..errors import ConfigError, TrainingError
from ..latents import DescribeSettings, LatentCatalog, catalog_of
from ..lm import LoadedLlm, load_llm
from ..lm.loading import check_declared_layer
from ..sae import SparseAutoencoder, TrainReport, load_sae
from ..text import Audit, Document, Passage, SanitizedText, Sanitizer, load_documents, split_passages
from .distributed import encode_on_ray, pool_and_count, sample_passages

logger = logging.getLogger(__name__)


@dataclass
class BuiltCodes:
    """What a build produces before it becomes an `Index`."""

    encoder: CodeEncoder
    passages: list[Passage]
    """What the index stores of each passage (`SanitizeConfig.store_text`)."""
    pooled: PooledCodes
    config: BuildConfig
    """The build config, with the SAE config of the SAE actually used."""
    sae_report: TrainReport | None
    audit: Audit | None = None
    """What sanitisation replaced; None when it is off."""
    catalog: LatentCatalog | None = None
    """The SAE's latents described on these passages; None when not asked for."""


@dataclass
class PreparedPassages:
    """Documents split for indexing: what the LLM reads and what the index stores of each passage."""

    read: list[Passage]
    """Passages of the sanitised documents (the originals when sanitisation is off): captured and encoded."""
    stored: list[Passage]
    """The same passages as the index keeps them: 'redacted' as read; 'full' the original text (offsets
    into the original document); 'none' no text and no title, the original offsets only."""
    audit: Audit | None
    """Replacements per entity type over these documents; None when sanitisation is off."""

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.read]


def prepare_passages(
    documents: list[Document],
    tokenizer: Any,
    capture: CaptureConfig,
    sanitizer: Sanitizer | None,
    store_text: str,
) -> PreparedPassages:
    """Sanitise whole documents (before splitting, so that no value is cut in two), split them, and
    make the records the index stores (`store_text`: 'full', 'redacted' or 'none', resolved)."""
    sanitized: dict[str, SanitizedText] | None = None
    audit: Audit | None = None
    clean = documents
    if sanitizer is not None and sanitizer.enabled:
        pairs = [sanitizer.sanitize_document(doc) for doc in documents]
        clean, sanitized = [doc for doc, _ in pairs], {doc.doc_id: full for doc, (_, full) in zip(documents, pairs)}
        audit = Audit.of(full for _, full in pairs)
    read = split_passages(clean, tokenizer, capture.window, capture.overlap)
    if store_text == "redacted" or (sanitized is None and store_text == "full"):
        return PreparedPassages(read, read, audit)
    originals = {doc.doc_id: doc for doc in documents}
    stored = [
        _stored(p, originals[p.doc_id], sanitized[p.doc_id] if sanitized is not None else None, store_text)
        for p in read
    ]
    return PreparedPassages(read, stored, audit)


def _stored(passage: Passage, original: Document, sanitized: SanitizedText | None, store_text: str) -> Passage:
    """A passage of a sanitised document as stored: its span of the original document ('full'; a
    placeholder cut by the window's edge is taken whole), or that span's offsets alone ('none')."""
    start, end = passage.char_start, passage.char_end
    if sanitized is not None:
        start, end = sanitized.original_span(start, end)
    if store_text == "none":
        return Passage(passage.passage_id, passage.doc_id, "", start, end, "")
    return Passage(passage.passage_id, passage.doc_id, original.full_text[start:end], start, end, original.title)


def check_enough_tokens(llm: LoadedLlm, passages: list[Passage], config: BuildConfig) -> None:
    """TrainingError before any capture when the passages hold fewer tokens than one SAE training batch."""
    with llm.lock:
        counts = [len(ids) for ids in llm.tokenizer([p.text for p in passages], add_special_tokens=False)["input_ids"]]
    tokens = sum(min(count, config.capture.window) for count in counts)
    if tokens < config.sae.batch_size:
        raise TrainingError(
            f"the corpus holds {tokens} tokens, fewer than one SAE training batch of {config.sae.batch_size} "
            "training tokens (SaeConfig.batch_size, --sae-batch-size): add text, lower the batch size, or pass "
            "a trained SAE (--sae)"
        )


def encode_corpus(
    corpus: str | Path | Iterable[Any],
    config: BuildConfig,
    sae: SparseAutoencoder | str | Path | None = None,
    llm: LoadedLlm | None = None,
    skip_empty: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    sanitizer: Sanitizer | None = None,
    describe: bool = True,
    ray: RayBuild | None = None,
) -> BuiltCodes:
    """Split a corpus into passages, capture them, train an SAE on them unless one is given (an
    `SparseAutoencoder` or its folder), and pool every passage's codes.

    With a `sanitizer` (`config.sanitize.mode` not 'off'), documents are sanitised before they are
    split, so the LLM, the SAE and the codes only see placeholders; the passages returned are what
    `config.sanitize.store_text` keeps. The corpus and a given SAE folder are read before the LLM
    loads, so that bad input fails fast. With `ray`, shards are captured and encoded by Ray workers
    (`distributed`), after the SAE is trained here on a sample when none is given.
    """
    if ray is not None and cache_dir:
        raise ConfigError("cache_dir: a distributed build caches no activations (the workers capture their shards)")
    if ray is not None and sae is None and ray.sae_sample_tokens < config.sae.batch_size:
        raise ConfigError(
            f"sae_sample_tokens {ray.sae_sample_tokens} is below one SAE training batch ({config.sae.batch_size})"
        )
    documents = load_documents(corpus, skip_empty=skip_empty)
    given = sae if isinstance(sae, SparseAutoencoder) else (load_sae(sae) if sae is not None else None)
    if llm is None:
        check_declared_layer(config.llm, config.capture.layer)
        llm = load_llm(config.llm, progress)
    check_layer(llm, config.capture.layer)
    if given is not None:
        check_sae_matches(given, llm, config.capture, str(sae) if not isinstance(sae, SparseAutoencoder) else "(given)")
        config = replace(config, sae=given.config)
    prepared = prepare_passages(documents, llm.tokenizer, config.capture, sanitizer, config.sanitize.stored_text)
    logger.info("%d documents -> %d passages", len(documents), len(prepared.read))
    if prepared.audit is not None:
        logger.info("sanitised %d of %d documents: %s", prepared.audit.changed, len(documents), prepared.audit.counts)
    if given is None:
        check_enough_tokens(llm, prepared.read, config)
    if ray is not None:
        return encode_on_workers(llm, config, prepared, given, describe, ray, progress)
    cache = ActivationCache(cache_dir) if cache_dir else None
    texts = prepared.texts
    acts = passage_activations(llm, texts, config.capture, cache, progress)
    report = None
    if given is None:
        given, report = fit_sae(llm, texts, acts, config.capture, config.sae, progress)
    encoder = CodeEncoder(llm, given.to(llm.device).eval(), config.capture, config.scoring.pooling, cache)
    pooled, catalog = pool_and_describe(encoder, prepared.read, acts, describe, progress)
    return BuiltCodes(encoder, prepared.stored, pooled, config, report, prepared.audit, catalog)


def encode_on_workers(
    llm: LoadedLlm,
    config: BuildConfig,
    prepared: PreparedPassages,
    sae: SparseAutoencoder | None,
    describe: bool,
    ray: RayBuild,
    progress: bool,
) -> BuiltCodes:
    """`encode_corpus`'s capture and encoding on Ray workers; the SAE, when not given, is trained here
    first on a sample of the passages (`RayBuild.sae_sample_tokens`) and then frozen."""
    report = None
    if sae is None:
        rows = sample_passages(llm, prepared.read, config.capture, ray.sae_sample_tokens, config.sae.seed)
        texts = [prepared.read[row].text for row in rows]
        acts = passage_activations(llm, texts, config.capture, None, progress)
        sae, report = fit_sae(llm, texts, acts, config.capture, config.sae, progress)
        logger.info("SAE trained on %d of %d passages (%d tokens)", len(rows), len(prepared.read), len(acts.values))
    sae = sae.cpu().eval()
    settings = DescribeSettings()
    pooled, stats = encode_on_ray(
        llm,
        config.llm,
        prepared.read,
        config.capture,
        config.scoring.pooling,
        sae,
        describe,
        settings.top_contexts,
        ray,
        progress,
    )
    encoder = CodeEncoder(llm, sae.to(llm.device), config.capture, config.scoring.pooling)
    catalog = None if stats is None else catalog_of(stats, llm, encoder.sae, prepared.read, config.capture, settings)
    return BuiltCodes(encoder, prepared.stored, pooled, config, report, prepared.audit, catalog)


def pool_and_describe(
    encoder: CodeEncoder, passages: list[Passage], acts: TokenActivations, describe: bool, progress: bool
) -> tuple[PooledCodes, LatentCatalog | None]:
    """Pooled codes of captured passages and, with `describe`, the catalog of the SAE's latents on them
    (gathered from the same token codes: no second SAE pass). `passages` are what the LLM read."""
    settings = DescribeSettings()
    texts, doc_ids = [p.text for p in passages], [p.doc_id for p in passages]
    pooled, stats = pool_and_count(encoder, texts, doc_ids, acts, describe, settings.top_contexts, progress)
    if stats is None:
        return pooled, None
    return pooled, catalog_of(stats, encoder.llm, encoder.sae, passages, encoder.capture, settings)
