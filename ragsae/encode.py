"""Texts to pooled sparse codes (capture, SAE encoding per token, pooling per text), and the one way
an SAE is trained on a corpus's passages, so that it is trained on the activations it will encode."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .capture import ActivationCache, TokenActivations, capture, capture_cached
from .config import CaptureConfig, SaeConfig
from .errors import SaeLoadError
from .lm import LoadedLlm
from .sae import SparseAutoencoder, TrainReport, evaluate_sae, train_sae
from .sae.fidelity import heldout_rows, loss_recovered, spliced_losses
from .text import STOPWORD_LISTS, fingerprint

logger = logging.getLogger(__name__)


@dataclass
class PooledCodes:
    """One sparse code per text: `codes` is CSR (n_texts, num_latents); `lengths` are token counts."""

    codes: sp.csr_matrix
    lengths: np.ndarray


def selection_dtype(llm: LoadedLlm) -> torch.dtype:
    """Precision at which the SAE chooses its latents: the LLM's own (bfloat16 where that runs
    natively: `resolve_dtype` in lm/loading.py), whose activations carry no more than that; values stay float32."""
    return llm.dtype if llm.dtype in (torch.bfloat16, torch.float16) else torch.float32


@torch.no_grad()
def encode_tokens(
    sae: SparseAutoencoder, values: np.ndarray, batch_size: int = 8192, select_dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, np.ndarray]:
    """SAE codes of (n_tokens, d_model) activations as (values, indices) arrays of shape (n_tokens, k);
    `select_dtype` as in `SparseAutoencoder.encode`."""
    device = next(sae.parameters()).device
    out_v = np.empty((values.shape[0], sae.config.k), dtype=np.float32)
    out_i = np.empty((values.shape[0], sae.config.k), dtype=np.int32)
    for start in range(0, values.shape[0], batch_size):
        batch = torch.from_numpy(np.asarray(values[start : start + batch_size], dtype=np.float32)).to(device)
        codes = sae.encode(batch, select_dtype)
        out_v[start : start + len(batch)] = codes.values.cpu().numpy()
        out_i[start : start + len(batch)] = codes.indices.cpu().numpy()
    return out_v, out_i


def pool(values: np.ndarray, indices: np.ndarray, offsets: np.ndarray, num_latents: int, pooling: str) -> sp.csr_matrix:
    """Pool token codes (n_tokens, k) into one CSR row per text.

    'max' keeps each latent's largest activation, 'sum' adds them, 'log' is log1p(sum)
    (saturating, as in SPLADE), 'count' counts the tokens on which the latent fired.
    """
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets) * indices.shape[1])
    cols = indices.reshape(-1).astype(np.int64)
    data = values.reshape(-1)
    keep = data > 0
    rows, cols, data = rows[keep], cols[keep], data[keep]
    shape = (len(offsets) - 1, num_latents)
    if pooling == "max":
        order = np.lexsort((cols, rows))
        rows, cols, data = rows[order], cols[order], data[order]
        starts = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])])
        if len(data):
            data = np.maximum.reduceat(data, starts)
        rows, cols = rows[starts], cols[starts]
        matrix = sp.csr_matrix((data, (rows, cols)), shape=shape, dtype=np.float32)
    else:
        ones = np.ones_like(data) if pooling == "count" else data
        matrix = sp.csr_matrix((ones, (rows, cols)), shape=shape, dtype=np.float32)  # duplicates add up
        if pooling == "log":
            matrix.data = np.log1p(matrix.data)
    matrix.sort_indices()
    return matrix


def passage_activations(
    llm: LoadedLlm,
    texts: list[str],
    capture: CaptureConfig,
    cache: ActivationCache | None = None,
    progress: bool = False,
    refresh: bool = False,
) -> TokenActivations:
    """Activations of passages at the capture layer: the passage prefix is fed to the LLM but left out.

    The one capture of passages, for building an index and for training its SAE alike; batch-invariant
    (`capture`), so that a passage's codes do not depend on the passages captured with it."""
    return capture_cached(
        llm,
        texts,
        [capture.layer],
        fingerprint(texts),
        cache,
        capture.window,
        capture.batch_size,
        capture.passage_prefix,
        progress,
        refresh=refresh,
        batch_invariant=True,
    )[capture.layer]


def fit_sae(
    llm: LoadedLlm,
    texts: list[str],
    acts: TokenActivations,
    capture: CaptureConfig,
    config: SaeConfig,
    progress: bool = False,
    start_from: SparseAutoencoder | None = None,
) -> tuple[SparseAutoencoder, TrainReport]:
    """Train an SAE on passage activations (from `passage_activations` of `texts`), or continue training
    `start_from`, and record in its metadata what it was trained on, so that a later build can refuse
    activations unlike them, and its fidelity on the passages held out of training
    (`SaeConfig.heldout_passages`)."""
    held = heldout_rows(len(texts), config.heldout_passages, config.seed)
    training = acts.values
    if len(held):
        keep = np.ones(len(acts.values), dtype=bool)
        for row in held:
            keep[acts.offsets[row] : acts.offsets[row + 1]] = False
        training = acts.values[keep]
    sae, report = train_sae(training, config, llm.device, progress, start_from)
    sae.metadata.update(
        llm_id=llm.model_id,
        llm_hash=llm.model_hash,
        llm_dtype=llm.dtype_name,
        layer=capture.layer,
        window=capture.window,
        passage_prefix=capture.passage_prefix,
        train_fingerprint=fingerprint(texts),
        train_passages=len(texts) - len(held),
    )
    if len(held):
        sae.metadata["fidelity"] = heldout_fidelity(llm, sae, texts, acts, held, capture)
    return sae, report


def heldout_fidelity(
    llm: LoadedLlm,
    sae: SparseAutoencoder,
    texts: list[str],
    acts: TokenActivations,
    held: np.ndarray,
    capture: CaptureConfig,
) -> dict[str, Any]:
    """FVU, L0 and the LM's loss with the SAE spliced in, on the held-out passages `held` (rows of `texts`)."""
    rows = np.concatenate([np.arange(acts.offsets[r], acts.offsets[r + 1]) for r in held])
    quality = evaluate_sae(sae, np.asarray(acts.values[rows], dtype=np.float32), llm.device)
    losses = spliced_losses(llm, sae.to(llm.device), [texts[r] for r in held], capture)
    sae.cpu()
    return {
        "passages": len(held),
        "tokens": int(len(rows)),
        "fvu": quality["fvu"],
        "mean_l0": quality["mean_l0"],
        "loss_clean": losses["clean"],
        "loss_sae": losses["sae"],
        "loss_zero": losses["zero"],
        "loss_recovered": loss_recovered(losses),
    }


def check_sae_matches(sae: SparseAutoencoder, llm: LoadedLlm, capture: CaptureConfig, source: str) -> None:
    """SaeLoadError for an SAE trained on another LLM, layer, width, passage window or passage prefix
    than `capture` feeds it (checked where its metadata records them)."""
    if sae.d_model != llm.d_model:
        raise SaeLoadError(f"SAE {source}: d_model {sae.d_model} but {llm.model_id} has hidden size {llm.d_model}")
    meta = sae.metadata
    if meta.get("llm_hash") not in (None, llm.model_hash):
        raise SaeLoadError(
            f"SAE {source} was trained on {meta.get('llm_id')} (hash {str(meta.get('llm_hash'))[:12]}), "
            f"not on {llm.model_id} (hash {llm.model_hash[:12]})"
        )
    for key, used in (("layer", capture.layer), ("window", capture.window), ("passage_prefix", capture.passage_prefix)):
        if key in meta and meta[key] != used:
            raise SaeLoadError(f"SAE {source} was trained on {key} {meta[key]!r}, the index uses {key} {used!r}")


class CodeEncoder:
    """LLM + SAE + pooling: the one path by which documents and queries become codes."""

    def __init__(
        self,
        llm: LoadedLlm,
        sae: SparseAutoencoder,
        capture: CaptureConfig,
        pooling: str,
        cache: ActivationCache | None = None,
    ):
        self.llm = llm
        self.sae = sae
        self.capture = capture
        self.pooling = pooling
        self.cache = cache

    def pool_activations(
        self,
        acts: TokenActivations,
        progress: bool = False,
        observe: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    ) -> PooledCodes:
        """Pooled codes of captured passages; `observe(first_token_row, values, indices)` sees every
        slice of token codes on the way (the latent statistics of `latents/` are gathered so, without
        a second SAE pass)."""
        chunks = []
        # Encode in slices of texts so memory stays bounded on large corpora.
        bounds = list(range(0, len(acts), 2048)) + [len(acts)]
        for lo, hi in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="encode SAE", disable=not progress):
            a, b = acts.offsets[lo], acts.offsets[hi]
            values, indices = encode_tokens(self.sae, acts.values[a:b], select_dtype=selection_dtype(self.llm))
            if observe is not None:
                observe(int(a), values, indices)
            chunks.append(pool(values, indices, acts.offsets[lo : hi + 1] - a, self.sae.num_latents, self.pooling))
        codes = chunks[0] if len(chunks) == 1 else sp.vstack(chunks, format="csr")
        return PooledCodes(codes, acts.lengths().astype(np.float32))

    def warn_if_cut(self, queries: list[str]) -> None:
        """Log a warning for each query longer than the capture window: only its first `window` tokens
        are read (passages are split to fit; a query is not)."""
        with self.llm.lock:
            counts = [len(ids) for ids in self.llm.tokenizer(queries, add_special_tokens=False)["input_ids"]]
        for query, count in zip(queries, counts):
            if count > self.capture.window:
                logger.warning(
                    "query of %d tokens cut to the first %d (CaptureConfig.window): %r...",
                    count,
                    self.capture.window,
                    query[:60],
                )

    def encode_documents(self, texts: list[str], progress: bool = False) -> PooledCodes:
        """Pooled codes of passages."""
        acts = passage_activations(self.llm, texts, self.capture, self.cache, progress)
        return self.pool_activations(acts, progress)

    def capture_queries(self, texts: list[str], progress: bool = False) -> TokenActivations:
        """Activations of queries at the capture layer, as `encode_queries` encodes them: the prefix and
        stopwords are fed to the LLM but left out. Any encoder over the same LLM and query capture can pool
        them (`pool_activations`), so several indexes encode a query from one pass (`routing.Collections`)."""
        cfg = self.capture
        self.warn_if_cut(texts)
        stopwords = STOPWORD_LISTS[cfg.query_stopwords]
        acts = capture(self.llm, texts, [cfg.layer], cfg.window, cfg.batch_size, cfg.query_prefix, progress, stopwords)
        return acts[cfg.layer]

    def encode_queries(self, texts: list[str], progress: bool = False) -> PooledCodes:
        """Pooled codes of queries: the prefix and stopwords are fed to the LLM but left out of the codes.
        Never cached: queries are few and each is new."""
        return self.pool_activations(self.capture_queries(texts, progress), progress)
