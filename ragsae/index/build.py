"""The build pipeline: corpus -> passages -> activations -> (SAE trained) -> pooled codes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..capture import ActivationCache, check_layer
from ..config import BuildConfig
from ..encode import CodeEncoder, PooledCodes, check_sae_matches, fit_sae, passage_activations
from ..errors import TrainingError
from ..lm import LoadedLlm, load_llm
from ..lm.loading import check_declared_layer
from ..sae import SparseAutoencoder, TrainReport, load_sae
from ..text import Passage, load_documents, split_passages

logger = logging.getLogger(__name__)


@dataclass
class BuiltCodes:
    """What a build produces before it becomes an `Index`."""

    encoder: CodeEncoder
    passages: list[Passage]
    pooled: PooledCodes
    config: BuildConfig
    """The build config, with the SAE config of the SAE actually used."""
    sae_report: TrainReport | None


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
) -> BuiltCodes:
    """Split a corpus into passages, capture them, train an SAE on them unless one is given (an
    `SparseAutoencoder` or its folder), and pool every passage's codes.

    The corpus and a given SAE folder are read before the LLM loads, so that bad input fails fast.
    """
    documents = load_documents(corpus, skip_empty=skip_empty)
    given = sae if isinstance(sae, SparseAutoencoder) else (load_sae(sae) if sae is not None else None)
    if llm is None:
        check_declared_layer(config.llm, config.capture.layer)
        llm = load_llm(config.llm, progress)
    check_layer(llm, config.capture.layer)
    if given is not None:
        check_sae_matches(given, llm, config.capture, str(sae) if not isinstance(sae, SparseAutoencoder) else "(given)")
        config = replace(config, sae=given.config)
    passages = split_passages(documents, llm.tokenizer, config.capture.window, config.capture.overlap)
    logger.info("%d documents -> %d passages", len(documents), len(passages))
    if given is None:
        check_enough_tokens(llm, passages, config)
    cache = ActivationCache(cache_dir) if cache_dir else None
    texts = [p.text for p in passages]
    acts = passage_activations(llm, texts, config.capture, cache, progress)
    report = None
    if given is None:
        given, report = fit_sae(llm, texts, acts, config.capture, config.sae, progress)
    encoder = CodeEncoder(llm, given.to(llm.device).eval(), config.capture, config.scoring.pooling, cache)
    pooled = encoder.pool_activations(acts, progress=progress)
    return BuiltCodes(encoder, passages, pooled, config, report)
