"""Texts to pooled sparse codes: capture, SAE encoding per token, pooling per passage."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from .capture import ActivationCache, TokenActivations, capture_cached
from .config import CaptureConfig
from .corpus import fingerprint
from .llm import LoadedLlm
from .sae import SparseAutoencoder
from .stopwords import STOPWORD_LISTS

logger = logging.getLogger(__name__)


@dataclass
class PooledCodes:
    """One sparse code per text: `codes` is CSR (n_texts, num_latents); `lengths` are token counts."""

    codes: sp.csr_matrix
    lengths: np.ndarray


def selection_dtype(llm: LoadedLlm) -> torch.dtype:
    """Precision at which the SAE chooses its latents: the LLM's own (bfloat16 where that runs
    natively: `resolve_dtype` in llm.py), whose activations carry no more than that; values stay float32."""
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

    def activations(
        self, texts: list[str], prefix: str = "", progress: bool = False, stopwords: frozenset[str] = frozenset()
    ) -> TokenActivations:
        cfg = self.capture
        return capture_cached(
            self.llm,
            texts,
            [cfg.layer],
            fingerprint(texts),
            self.cache,
            cfg.window,
            cfg.batch_size,
            prefix,
            progress,
            stopwords,
        )[cfg.layer]

    def pool_activations(self, acts: TokenActivations, progress: bool = False) -> PooledCodes:
        chunks = []
        # Encode in slices of texts so memory stays bounded on large corpora.
        bounds = list(range(0, len(acts), 2048)) + [len(acts)]
        for lo, hi in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="encode SAE", disable=not progress):
            a, b = acts.offsets[lo], acts.offsets[hi]
            values, indices = encode_tokens(self.sae, acts.values[a:b], select_dtype=selection_dtype(self.llm))
            chunks.append(pool(values, indices, acts.offsets[lo : hi + 1] - a, self.sae.num_latents, self.pooling))
        codes = chunks[0] if len(chunks) == 1 else sp.vstack(chunks, format="csr")
        return PooledCodes(codes, acts.lengths().astype(np.float32))

    def passage_activations(self, texts: list[str], progress: bool = False) -> TokenActivations:
        """Activations of passages: the passage prefix is fed to the LLM but left out."""
        return self.activations(texts, self.capture.passage_prefix, progress)

    def encode_documents(self, texts: list[str], progress: bool = False) -> PooledCodes:
        """Pooled codes of passages."""
        return self.pool_activations(self.passage_activations(texts, progress), progress)

    def encode_queries(self, texts: list[str], progress: bool = False) -> PooledCodes:
        """Pooled codes of queries: the prefix and stopwords are fed to the LLM but left out of the codes."""
        cfg = self.capture
        acts = self.activations(texts, cfg.query_prefix, progress, STOPWORD_LISTS[cfg.query_stopwords])
        return self.pool_activations(acts, progress)
