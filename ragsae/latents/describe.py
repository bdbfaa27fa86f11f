"""Per-latent statistics of a corpus, computed once at build time: how often each latent fires, where it
fires most (token contexts), which tokens it is characteristic of, which vocabulary its decoder
direction promotes (logit lens), its nearest latents by decoder direction, and a short label.

Everything streams over slices of passages, so memory grows with the number of distinct
(latent, token) pairs and the number of latents, never with the corpus's tokens times latents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..capture import TokenActivations, tokenize
from ..config import CaptureConfig
from ..encode import encode_tokens, selection_dtype
from ..lm import LoadedLlm
from ..sae import SparseAutoencoder
from ..text import Passage
from .catalog import CharacteristicToken, LatentCard, LatentCatalog, LatentContext, clean_token

logger = logging.getLogger(__name__)

HISTOGRAM_EDGES = tuple(float(2.0 ** (e / 2)) for e in range(-8, 17))
"""Edges of the activation histogram (half-octave steps from 2^-4 to 2^8); values outside go in the
end bins. SAE activations are in the SAE's normalised input space, where E||x||^2 = d_model."""

TOKEN_SCORES = ("lift", "kl")
"""How a latent's characteristic tokens are ranked (`characteristic_scores`)."""


@dataclass
class PassageTokens:
    """Token ids and character spans of passages as captured (BOS and passage prefix left out): the
    tokens of passage i are rows offsets[i]:offsets[i+1], spans are character offsets into its text."""

    ids: np.ndarray
    """(n_tokens,) int64 token ids."""
    starts: np.ndarray
    """(n_tokens,) int64 start of each token in its passage's text."""
    ends: np.ndarray
    """(n_tokens,) int64 end of each token in its passage's text."""
    offsets: np.ndarray
    """(n_passages + 1,) int64 row offsets, as `TokenActivations.offsets`."""


def passage_tokens(llm: LoadedLlm, texts: list[str], capture: CaptureConfig) -> PassageTokens:
    """The tokens `encode.passage_activations` captures for `texts`, with their spans in each text."""
    ids, skip, spans = tokenize(llm, texts, capture.window, capture.passage_prefix)
    n_bos = len(ids[0]) - len(spans[0][1])
    prefix = capture.passage_prefix.rstrip()
    shift = len(prefix) + 1 if prefix else 0  # `tokenize` feeds f"{prefix} {text}"
    lengths = np.array([len(x) - skip for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_ids = np.fromiter((t for x in ids for t in x[skip:]), dtype=np.int64, count=int(offsets[-1]))
    pairs = np.array([s for _, offs in spans for s in offs[skip - n_bos :]], dtype=np.int64).reshape(-1, 2)
    limit = np.repeat(np.array([len(t) for t in texts], dtype=np.int64), lengths)
    starts = np.clip(pairs[:, 0] - shift, 0, limit)
    ends = np.clip(pairs[:, 1] - shift, starts, limit)
    return PassageTokens(flat_ids, starts, ends, offsets)


def make_label(tokens: Sequence[str], size: int = 3) -> str:
    """A label from a latent's characteristic tokens (best first): the first `size` distinct cleaned
    tokens (case-insensitive), joined by ' · '; whitespace-only tokens only when there is nothing else."""
    seen: list[str] = []
    for token in [t for t in tokens if t.strip()] or list(tokens):
        cleaned = clean_token(token)
        if cleaned.casefold() not in {s.casefold() for s in seen}:
            seen.append(cleaned)
        if len(seen) == size:
            break
    return " · ".join(seen)


def top_per_group(latents: np.ndarray, values: np.ndarray, groups: np.ndarray, n_groups: int, keep: int) -> np.ndarray:
    """Positions of the `keep` largest `values` per latent, at most one per group (its largest), ordered
    by latent then by value, largest first."""
    order = np.lexsort((-values, latents))
    key = latents[order].astype(np.int64) * n_groups + groups[order]
    _, first = np.unique(key, return_index=True)  # first occurrence = the group's largest value
    picked = order[np.sort(first)]
    return picked[rank_within(latents[picked]) < keep]


def characteristic_scores(
    fires: np.ndarray, counts: np.ndarray, latent_fires: np.ndarray, n_tokens: int, smoothing: float, kind: str
) -> np.ndarray:
    """How characteristic each (latent, token) pair is, from `fires` (occurrences of the token on which
    the latent fires), `counts` (occurrences of the token in the corpus) and `latent_fires` (tokens of
    the corpus, `n_tokens` in all, on which the latent fires), all per pair.

    'lift' is the log of P(fires | token) / P(fires), with P(fires | token) smoothed towards the
    latent's base rate by `smoothing` pseudo-occurrences, so that a token seen twice and fired on twice
    does not outrank one fired on in 900 of its 1,000 occurrences: pointwise mutual information with
    a prior. 'kl' weighs that lift by the token's share of the latent's firings (its term in
    KL(P(token | fires) || P(token))), which favours the tokens that account for much of where the
    latent fires over rare tokens it always fires on.
    """
    if kind not in TOKEN_SCORES:
        raise ValueError(f"token score must be one of {TOKEN_SCORES}, got {kind!r}")
    rate = latent_fires / max(n_tokens, 1)
    lift = np.log((fires + smoothing * rate) / (counts + smoothing) / rate)
    return lift if kind == "lift" else lift * fires / np.maximum(latent_fires, 1)


class LatentStatistics:
    """Running per-latent statistics of a corpus's token codes, fed in slices in row order (`add`):
    firing counts per token and per passage, activation sums and histograms, (latent, token) counts and
    each latent's strongest activations (at most one per document).

    `describe_latents` encodes the activations and feeds them here; a caller that encodes them anyway
    (to pool them) can feed the same codes and skip a second SAE pass.
    """

    def __init__(self, num_latents: int, tokens: PassageTokens, doc_ids: Sequence[str], top_contexts: int = 10):
        self.num_latents, self.keep = num_latents, top_contexts
        self.tokens = tokens
        self.vocab = int(tokens.ids.max(initial=0)) + 1
        self.passage_of_row = np.repeat(np.arange(len(tokens.offsets) - 1, dtype=np.int64), np.diff(tokens.offsets))
        """(n_tokens,) passage row of every token row of the corpus."""
        numbers: dict[str, int] = {}
        self.doc_index = np.array([numbers.setdefault(d, len(numbers)) for d in doc_ids], dtype=np.int64)
        """(n_passages,) document number of every passage, for one context per document."""
        self.n_docs = max(len(numbers), 1)
        self.token_fires = np.zeros(num_latents, dtype=np.int64)
        self.passage_fires = np.zeros(num_latents, dtype=np.int64)
        self.last_passage = np.full(num_latents, -1, dtype=np.int64)
        self.activation_sum = np.zeros(num_latents, dtype=np.float64)
        self.histogram = np.zeros((num_latents, len(HISTOGRAM_EDGES) + 1), dtype=np.int64)
        self.pairs = sp.csr_matrix((num_latents, self.vocab), dtype=np.int64)
        """(num_latents, vocab) tokens of each kind on which each latent fires."""
        empty = np.zeros(0, dtype=np.int64)
        self.top: tuple[np.ndarray, np.ndarray, np.ndarray] = (empty, np.zeros(0, dtype=np.float32), empty)
        """(latent, activation, token row) of the strongest activations, by latent then activation."""
        self.rows_seen = 0

    def add(self, first_row: int, values: np.ndarray, indices: np.ndarray) -> None:
        """SAE codes `values`, `indices` (n, k) of the corpus's token rows first_row:first_row+n."""
        if first_row != self.rows_seen:
            raise ValueError(f"token rows must come in order: expected row {self.rows_seen}, got {first_row}")
        self.rows_seen += values.shape[0]
        fired = values > 0
        rows = np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)[fired] + first_row
        lat = indices[fired].astype(np.int64)
        val = values[fired].astype(np.float32)
        m = self.num_latents
        self.token_fires += np.bincount(lat, minlength=m)
        self.activation_sum += np.bincount(lat, weights=val, minlength=m)
        pairs = np.unique(self.passage_of_row[rows] * m + lat)
        passage, latent = pairs // m, pairs % m
        # A passage split between two slices is counted once: rows come in order, so only the slice's
        # first passage can have been seen before, and it is then each latent's last counted passage.
        new = passage != self.last_passage[latent]
        self.passage_fires += np.bincount(latent[new], minlength=m)
        np.maximum.at(self.last_passage, latent, passage)
        bins = np.searchsorted(np.asarray(HISTOGRAM_EDGES, dtype=np.float32), val, side="right")
        width = self.histogram.shape[1]
        self.histogram += np.bincount(lat * width + bins, minlength=m * width).reshape(m, width)
        ones = np.ones(len(lat), dtype=np.int64)
        self.pairs = self.pairs + sp.csr_matrix((ones, (lat, self.tokens.ids[rows])), shape=self.pairs.shape)
        # Only activations above a latent's current k-th best can enter its top list.
        top_lat, top_val, top_row = self.top
        floor = np.zeros(m, dtype=np.float32)
        full = np.flatnonzero(np.bincount(top_lat, minlength=m) >= self.keep)
        if len(full):
            last = np.searchsorted(top_lat, full, side="right") - 1  # the smallest of each full latent
            floor[full] = top_val[last]
        enter = val > floor[lat]
        cand_lat = np.concatenate([top_lat, lat[enter]])
        cand_val = np.concatenate([top_val, val[enter]])
        cand_row = np.concatenate([top_row, rows[enter]])
        groups = self.doc_index[self.passage_of_row[cand_row]]
        picked = top_per_group(cand_lat, cand_val, groups, self.n_docs, self.keep)
        self.top = (cand_lat[picked], cand_val[picked], cand_row[picked])

    def merge(self, part: LatentStatistics, first_passage: int) -> None:
        """Add the statistics of passages first_passage:first_passage+len(part) gathered separately (a
        shard encoded by another process), in order like `add`. The shard must hold whole documents, so
        that "one context per document" holds across shards; the result is what `add` over the same
        codes gives."""
        first_row = int(self.tokens.offsets[first_passage])
        if first_row != self.rows_seen:
            raise ValueError(f"token rows must come in order: expected row {self.rows_seen}, got {first_row}")
        if part.num_latents != self.num_latents or part.keep != self.keep:
            raise ValueError("statistics of another SAE width or number of contexts")
        self.rows_seen += part.rows_seen
        self.token_fires += part.token_fires
        self.passage_fires += part.passage_fires
        seen = part.last_passage >= 0
        self.last_passage[seen] = part.last_passage[seen] + first_passage
        self.activation_sum += part.activation_sum
        self.histogram += part.histogram
        pairs = part.pairs.tocsr()
        self.pairs = self.pairs + sp.csr_matrix((pairs.data, pairs.indices, pairs.indptr), shape=self.pairs.shape)
        top_lat, top_val, top_row = self.top
        cand_lat = np.concatenate([top_lat, part.top[0]])
        cand_val = np.concatenate([top_val, part.top[1]])
        cand_row = np.concatenate([top_row, part.top[2] + first_row])
        groups = self.doc_index[self.passage_of_row[cand_row]]
        picked = top_per_group(cand_lat, cand_val, groups, self.n_docs, self.keep)
        self.top = (cand_lat[picked], cand_val[picked], cand_row[picked])


def unembedding(llm: LoadedLlm) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The LM's output embedding (vocab, d_model) and its final norm's weight (d_model,) if it has one
    with a weight; None when the model has no output embedding to read."""
    head = llm.model.get_output_embeddings() if hasattr(llm.model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm"):
        obj: Any = llm.model
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        norm_weight = getattr(obj, "weight", None)
        return weight, norm_weight if isinstance(norm_weight, torch.Tensor) else None
    return weight, None


@torch.no_grad()
def logit_lens(
    llm: LoadedLlm, w_dec: torch.Tensor, latents: np.ndarray, top: int, batch: int = 256
) -> np.ndarray | None:
    """(len(latents), top) ids of the vocabulary tokens each latent's decoder direction promotes most:
    W_dec[j] scaled by the final norm's weight, times the unembedding. The SAE's input normalisation is
    a shift and one scale, so the decoder row is a direction in the residual stream as it is. Computed
    in bfloat16 where the LLM runs in it (a third of the float32 time on CPU; 98% of the top tokens
    the same on the bundled model). None when the model's unembedding cannot be read."""
    found = unembedding(llm)
    if found is None or top == 0:
        return None
    weight, norm = found
    dtype = torch.bfloat16 if llm.dtype == torch.bfloat16 else torch.float32
    vocab = min(int(weight.shape[0]), len(llm.tokenizer))
    w_u = weight[:vocab].detach().to(dtype)
    scale = norm.detach().to(w_u.device, dtype) if norm is not None else None
    out = np.empty((len(latents), min(top, vocab)), dtype=np.int64)
    for start in range(0, len(latents), batch):
        rows = torch.as_tensor(latents[start : start + batch], device=w_dec.device)
        directions = w_dec[rows].to(w_u.device, dtype)
        if scale is not None:
            directions = directions * scale
        out[start : start + len(rows)] = (directions @ w_u.t()).topk(out.shape[1], dim=1).indices.cpu().numpy()
    return out


@torch.no_grad()
def decoder_neighbours(
    w_dec: torch.Tensor, latents: np.ndarray, top: int, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosines), each (len(latents), top): for each of `latents`, the others among them whose decoder
    directions are closest (cosine)."""
    top = min(top, len(latents) - 1)
    if top <= 0:
        return np.zeros((len(latents), 0), dtype=np.int64), np.zeros((len(latents), 0), dtype=np.float32)
    rows = w_dec[torch.as_tensor(latents, device=w_dec.device)].float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ids = np.empty((len(latents), top), dtype=np.int64)
    cos = np.empty((len(latents), top), dtype=np.float32)
    for start in range(0, len(latents), batch):
        sims = rows[start : start + batch] @ rows.t()
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -2.0  # not itself
        best = sims.topk(top, dim=1)
        ids[start : start + sims.shape[0]] = latents[best.indices.cpu().numpy()]
        cos[start : start + sims.shape[0]] = best.values.cpu().numpy()
    return ids, cos


def token_strings(llm: LoadedLlm, ids: np.ndarray) -> dict[int, str]:
    """Each token id's text (the tokenizer's decoding of that token alone)."""
    unique = [int(i) for i in np.unique(ids)]
    with llm.lock:
        texts = llm.tokenizer.batch_decode([[i] for i in unique])
    return dict(zip(unique, texts))


@dataclass(frozen=True)
class DescribeSettings:
    """How latents are described (`describe_latents`)."""

    top_contexts: int = 10
    """Contexts kept per latent: its strongest activations, at most one per document."""
    context_tokens: int = 5
    """Tokens of text kept on each side of a context's firing token."""
    characteristic: int = 8
    """Characteristic tokens kept per latent."""
    min_count: int = 3
    """Fewest firings on a token for it to count as characteristic (relaxed, for a latent that fires on
    no token that often, to the count of its most frequent token)."""
    smoothing: float = 5.0
    """Pseudo-occurrences in `characteristic_scores`."""
    token_score: str = "lift"
    """'lift' or 'kl' (`characteristic_scores`): 'lift' labels predict where a latent fires better
    (benchmarks/latent_labels.py)."""
    logit_tokens: int = 8
    """Vocabulary tokens kept per latent from the logit lens (0: none)."""
    neighbours: int = 5
    """Nearest latents by decoder cosine kept per latent."""
    label_size: int = 3
    """Characteristic tokens in a label."""
    chunk_passages: int = 1024
    """Passages encoded at a time (bounds memory)."""

    def __post_init__(self) -> None:
        if self.token_score not in TOKEN_SCORES:
            raise ValueError(f"token_score must be one of {TOKEN_SCORES}, got {self.token_score!r}")
        for name in ("top_contexts", "context_tokens", "characteristic", "logit_tokens", "neighbours"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_count < 1 or self.label_size < 1 or self.chunk_passages < 1 or self.smoothing <= 0:
            raise ValueError("min_count, label_size and chunk_passages must be >= 1 and smoothing > 0")


def describe_latents(
    llm: LoadedLlm,
    sae: SparseAutoencoder,
    passages: list[Passage],
    acts: TokenActivations,
    capture: CaptureConfig,
    top_contexts: int = 10,
    progress: bool = False,
    settings: DescribeSettings | None = None,
) -> LatentCatalog:
    """Describe every latent that fires on the corpus: frequencies, top contexts, characteristic tokens,
    logit-lens tokens, activation histogram, nearest latents and a label.

    Args:
        passages: the passages, in row order; `acts` their activations from
            `encode.passage_activations` (same LLM, `capture` settings and order).
        top_contexts: contexts kept per latent (overrides `settings.top_contexts`).
        settings: everything else (`DescribeSettings`).
    """
    settings = replace(settings or DescribeSettings(), top_contexts=top_contexts)
    if len(passages) != len(acts):
        raise ValueError(f"{len(passages)} passages but activations of {len(acts)} texts")
    if not passages:
        raise ValueError("describe_latents needs at least one passage")
    started = time.perf_counter()
    tokens = passage_tokens(llm, [p.text for p in passages], capture)
    if not np.array_equal(tokens.offsets, acts.offsets):
        raise ValueError("the passages tokenise to other lengths than the activations hold (other capture settings?)")
    stats = LatentStatistics(sae.num_latents, tokens, [p.doc_id for p in passages], settings.top_contexts)
    select = selection_dtype(llm)
    step = settings.chunk_passages
    bounds = list(range(0, len(passages), step)) + [len(passages)]
    for lo, hi in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="describe latents", disable=not progress):
        a, b = int(acts.offsets[lo]), int(acts.offsets[hi])
        values, indices = encode_tokens(sae, acts.values[a:b], select_dtype=select)
        stats.add(a, values, indices)
    counted = time.perf_counter()
    catalog = catalog_of(stats, llm, sae, passages, capture, settings)
    logger.info(
        "described %d live latents of %d on %d passages in %.1f s (%.1f s encoding and counting)",
        len(catalog),
        sae.num_latents,
        len(passages),
        time.perf_counter() - started,
        counted - started,
    )
    return catalog


def characteristic_tokens(
    stats: LatentStatistics, settings: DescribeSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(latent, token id, fires, score) of each latent's best characteristic tokens, by latent then score."""
    pairs = stats.pairs.tocsr()
    pairs.sort_indices()
    latent = np.repeat(np.arange(stats.num_latents), np.diff(pairs.indptr))
    fires = pairs.data.astype(np.float64)
    counts = np.bincount(stats.tokens.ids, minlength=stats.vocab)[pairs.indices].astype(np.float64)
    n_tokens = int(stats.tokens.offsets[-1])
    score = characteristic_scores(
        fires, counts, stats.token_fires[latent], n_tokens, settings.smoothing, settings.token_score
    )
    most = np.zeros(stats.num_latents, dtype=np.int64)
    nonempty = np.flatnonzero(np.diff(pairs.indptr))
    if len(nonempty):
        most[nonempty] = np.maximum.reduceat(pairs.data, pairs.indptr[nonempty])
    eligible = np.flatnonzero(pairs.data >= np.minimum(settings.min_count, most[latent]))
    order = eligible[np.lexsort((-score[eligible], latent[eligible]))]
    chosen = order[rank_within(latent[order]) < settings.characteristic]
    return latent[chosen], pairs.indices[chosen].astype(np.int64), pairs.data[chosen], score[chosen]


def rank_within(groups: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal values of sorted `groups` (0, 1, ... per run)."""
    if len(groups) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))


def catalog_of(
    stats: LatentStatistics,
    llm: LoadedLlm,
    sae: SparseAutoencoder,
    passages: list[Passage],
    capture: CaptureConfig,
    settings: DescribeSettings,
) -> LatentCatalog:
    """The catalog of the statistics of every passage's token codes."""
    tokens = stats.tokens
    if stats.rows_seen != int(tokens.offsets[-1]):
        raise ValueError(f"statistics of {stats.rows_seen} token rows, the passages have {int(tokens.offsets[-1])}")
    n_tokens = int(tokens.offsets[-1])
    live = np.flatnonzero(stats.token_fires > 0)
    token_counts = np.bincount(tokens.ids, minlength=stats.vocab)
    char_latent, char_token, fires, char_score = characteristic_tokens(stats, settings)
    w_dec = sae.W_dec.detach()
    lens = logit_lens(llm, w_dec, live, settings.logit_tokens)
    near_ids, near_cos = decoder_neighbours(w_dec, live, settings.neighbours)
    top_lat, top_val, top_row = stats.top
    needed = [tokens.ids[top_row], char_token] + ([lens.ravel()] if lens is not None else [])
    strings = token_strings(llm, np.concatenate(needed))

    chars: dict[int, list[CharacteristicToken]] = {}
    for j, t, f, score in zip(char_latent.tolist(), char_token.tolist(), fires.tolist(), char_score.tolist()):
        chars.setdefault(j, []).append(CharacteristicToken(strings[t], int(f), int(token_counts[t]), round(score, 4)))
    contexts: dict[int, list[LatentContext]] = {}
    width = settings.context_tokens
    for j, value, row in zip(top_lat.tolist(), top_val.tolist(), top_row.tolist()):
        p = int(stats.passage_of_row[row])
        first, last = int(tokens.offsets[p]), int(tokens.offsets[p + 1])
        text = passages[p].text
        start, end = int(tokens.starts[row]), int(tokens.ends[row])
        left = int(tokens.starts[max(first, row - width)])
        right = int(tokens.ends[min(last - 1, row + width)])
        contexts.setdefault(j, []).append(
            LatentContext(
                passages[p].passage_id,
                row - first,
                round(float(value), 4),
                text[left:start] if width else "",
                text[start:end] or strings[int(tokens.ids[row])],
                text[end:right] if width else "",
            )
        )
    cards = []
    for position, j in enumerate(live.tolist()):
        found = chars.get(j, [])
        mine = contexts.get(j, [])
        cards.append(
            LatentCard(
                latent=j,
                label=make_label([c.token for c in found], settings.label_size) or f"latent {j}",
                passages=int(stats.passage_fires[j]),
                tokens=int(stats.token_fires[j]),
                passage_frequency=float(stats.passage_fires[j] / max(len(passages), 1)),
                token_frequency=float(stats.token_fires[j] / max(n_tokens, 1)),
                mean_activation=round(float(stats.activation_sum[j] / stats.token_fires[j]), 4),
                max_activation=max((c.activation for c in mine), default=0.0),
                histogram=tuple(int(x) for x in stats.histogram[j]),
                contexts=tuple(mine),
                characteristic=tuple(found),
                logit_lens=tuple(strings[int(t)] for t in lens[position]) if lens is not None else (),
                neighbours=tuple((int(i), round(float(c), 4)) for i, c in zip(near_ids[position], near_cos[position])),
            )
        )
    return LatentCatalog.from_cards(
        sae.num_latents,
        len(passages),
        n_tokens,
        HISTOGRAM_EDGES,
        cards,
        source={
            "llm_id": llm.model_id,
            "llm_hash": llm.model_hash,
            "layer": capture.layer,
            "sae_architecture": sae.config.architecture,
            "sae_k": sae.config.k,
            "d_model": sae.d_model,
        },
        settings=asdict(settings),
    )
