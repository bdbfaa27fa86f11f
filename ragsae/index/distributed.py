"""Distributed encoding on Ray: shards of a corpus's passages captured and SAE-encoded in parallel by
worker actors, each holding the LLM and the SAE, and reduced on the driver in corpus order.

The driver reads, sanitises and splits the corpus, trains the SAE first when none is given (on a seeded
sample of whole passages, `RayBuild.sae_sample_tokens`), then freezes it and sends it to the workers.
Each shard is whole documents, so the reduction (codes stacked in order, latent statistics merged by
`LatentStatistics.merge`) gives what a single process gives for the same SAE: capture is batch-invariant
and the SAE's encoding works row by row, so a passage's codes do not depend on the shard it came in.

On a cluster: `ray start --head` on one node, `ray start --address HEAD:6379` on the others, each with
ragsae and the same model installed (the workers refuse to run when their model or compute dtype
differs from the driver's); then `ragsae build CORPUS -o INDEX --ray --ray-address auto` on the head.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..capture import TokenActivations
from ..config import CaptureConfig, LlmConfig, RayBuild, SaeConfig, from_dict, to_dict
from ..encode import CodeEncoder, PooledCodes, passage_activations
from ..errors import ModelError
from ..latents import LatentStatistics, passage_tokens
from ..lm import LoadedLlm, load_llm
from ..sae import SparseAutoencoder, create_sae
from ..text import Passage

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """The ray module, with an install hint where it is missing."""
    try:
        import ray
    except ImportError as error:
        raise ImportError("distributed builds need Ray: pip install 'ragsae[ray]'") from error
    return ray


# --- what the driver does before the workers start -----------------------------------------------
def sample_passages(
    llm: LoadedLlm, passages: list[Passage], capture: CaptureConfig, tokens: int, seed: int
) -> list[int]:
    """Rows of a seeded random sample of whole passages holding at least `tokens` captured tokens (all
    rows when the corpus holds fewer), in corpus order."""
    with llm.lock:
        ids = llm.tokenizer([p.text for p in passages], add_special_tokens=False)["input_ids"]
    counts = np.minimum([len(x) for x in ids], capture.window)
    order = np.random.default_rng(seed).permutation(len(passages))
    enough = int(np.searchsorted(np.cumsum(counts[order]), tokens)) + 1
    return sorted(int(row) for row in order[:enough])


def document_shards(passages: list[Passage], size: int) -> list[tuple[int, int]]:
    """(first, end) passage rows of consecutive shards of about `size` passages, each cut at a
    document boundary, so that no document spans two shards."""
    shards, first = [], 0
    for row in range(1, len(passages) + 1):
        if row == len(passages) or (row - first >= size and passages[row].doc_id != passages[row - 1].doc_id):
            shards.append((first, row))
            first = row
    return shards


SaeParts = tuple[dict[str, Any], int, dict[str, np.ndarray], dict[str, Any]]
"""An SAE as plain data for the workers: (config as a dict, d_model, weights as arrays, metadata)."""


def sae_parts(sae: SparseAutoencoder) -> SaeParts:
    weights = {name: t.detach().cpu().numpy() for name, t in sae.state_dict().items()}
    return to_dict(sae.config), sae.d_model, weights, dict(sae.metadata)


def sae_from_parts(parts: SaeParts) -> SparseAutoencoder:
    config, d_model, weights, metadata = parts
    sae = create_sae(from_dict(SaeConfig, config), d_model)
    sae.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()})
    sae.metadata.update(metadata)
    return sae.eval()


# --- the shard work, the same in a worker and in a single process -------------------------------
def pool_and_count(
    encoder: CodeEncoder,
    texts: list[str],
    doc_ids: list[str],
    acts: TokenActivations,
    describe: bool,
    top_contexts: int,
    progress: bool = False,
) -> tuple[PooledCodes, LatentStatistics | None]:
    """Pooled codes of captured passages and, with `describe`, the latent statistics of their token
    codes, gathered from the same SAE pass."""
    if not describe:
        return encoder.pool_activations(acts, progress=progress), None
    tokens = passage_tokens(encoder.llm, texts, encoder.capture)
    stats = LatentStatistics(encoder.sae.num_latents, tokens, doc_ids, top_contexts)
    return encoder.pool_activations(acts, progress=progress, observe=stats.add), stats


class ShardEncoder:
    """A worker: loads the LLM and the SAE once, then captures and encodes the shards it is sent."""

    def __init__(self, llm: LlmConfig, capture: CaptureConfig, pooling: str, sae: SaeParts, threads: int):
        torch.set_num_threads(threads)
        loaded = load_llm(llm)
        self.encoder = CodeEncoder(loaded, sae_from_parts(sae).to(loaded.device), capture, pooling)

    def identity(self) -> tuple[str, str]:
        """(host and process, the activations' identity: model hash and compute dtype)."""
        return f"{os.uname().nodename}:{os.getpid()}", self.encoder.llm.activation_key

    def encode(
        self, texts: list[str], doc_ids: list[str], describe: bool, top_contexts: int
    ) -> tuple[sp.csr_matrix, np.ndarray, LatentStatistics | None]:
        acts = passage_activations(self.encoder.llm, texts, self.encoder.capture)
        pooled, stats = pool_and_count(self.encoder, texts, doc_ids, acts, describe, top_contexts)
        return pooled.codes, pooled.lengths, stats


# --- the driver -------------------------------------------------------------------------------
WORKERS_READY = "%d Ray workers ready (LLM and SAE loaded) in %.1f s"
SHARDS_ENCODED = "%d passages in %d shards captured, encoded and reduced in %.1f s (%.1f s reducing on the driver)"
"""Log messages whose arguments `benchmarks/distributed.py` reads its stage times from."""


def encode_on_ray(
    llm: LoadedLlm,
    llm_config: LlmConfig,
    passages: list[Passage],
    capture: CaptureConfig,
    pooling: str,
    sae: SparseAutoencoder,
    describe: bool,
    top_contexts: int,
    options: RayBuild,
    progress: bool = False,
) -> tuple[PooledCodes, LatentStatistics | None]:
    """Pooled codes of `passages` (what the LLM reads) and, with `describe`, their latent statistics,
    encoded by `options.workers` Ray actors. `llm` is the driver's copy (tokenizer, identity)."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        if options.address is None:
            ray.init(num_cpus=options.workers * options.cpus_per_worker, include_dashboard=False)
        else:
            ray.init(address=options.address)
    actors: list[Any] = []
    try:
        began = time.perf_counter()
        worker = ray.remote(num_cpus=options.cpus_per_worker)(ShardEncoder)
        frozen = ray.put(sae_parts(sae))
        actors += [
            worker.remote(llm_config, capture, pooling, frozen, options.cpus_per_worker) for _ in range(options.workers)
        ]
        for where, key in ray.get([actor.identity.remote() for actor in actors]):
            if key != llm.activation_key:
                raise ModelError(
                    f"Ray worker {where} loaded {llm_config.model} as {key}, the driver as {llm.activation_key}: "
                    "install the same model on every node and pin LlmConfig.dtype"
                )
        ready = time.perf_counter()
        logger.info(WORKERS_READY, len(actors), ready - began)
        shards = document_shards(passages, options.shard_passages)
        stats = None
        if describe:
            tokens = passage_tokens(llm, [p.text for p in passages], capture)
            stats = LatentStatistics(sae.num_latents, tokens, [p.doc_id for p in passages], top_contexts)
        codes, lengths, reducing = [], [], 0.0
        results = shard_results(actors, shards, passages, describe, top_contexts)
        for (first, _), (shard_codes, shard_lengths, part) in tqdm(
            zip(shards, results), total=len(shards), desc="encode on Ray", disable=not progress
        ):
            received = time.perf_counter()
            codes.append(shard_codes)
            lengths.append(shard_lengths)
            if stats is not None:
                stats.merge(part, first)
            reducing += time.perf_counter() - received
        logger.info(SHARDS_ENCODED, len(passages), len(shards), time.perf_counter() - ready, reducing)
    finally:
        for actor in actors:  # their CPUs go back to a cluster that outlives the build
            ray.kill(actor)
        if started:
            ray.shutdown()
    stacked = sp.vstack(codes, format="csr") if codes else sp.csr_matrix((0, sae.num_latents), dtype=np.float32)
    return PooledCodes(stacked, np.concatenate([np.zeros(0), *lengths]).astype(np.float32)), stats


def shard_results(
    actors: list[Any],
    shards: list[tuple[int, int]],
    passages: list[Passage],
    describe: bool,
    top_contexts: int,
) -> Iterator[tuple[sp.csr_matrix, np.ndarray, LatentStatistics | None]]:
    """Shard results in shard order; each actor is given the next shard as soon as it finishes one, so
    a slow worker takes fewer shards instead of holding the others back."""
    from ray.util import ActorPool

    def submit(actor: Any, shard: tuple[int, int]) -> Any:
        chunk = passages[shard[0] : shard[1]]
        return actor.encode.remote([p.text for p in chunk], [p.doc_id for p in chunk], describe, top_contexts)

    yield from ActorPool(actors).map(submit, shards)
