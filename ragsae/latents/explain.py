"""Why a passage matched a query, in words: the latents query and passage share, each with its label,
its share of the sparse score and the passage tokens where it fires."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from ..encode import encode_tokens, passage_activations, selection_dtype
from ..errors import QueryError
from .catalog import LatentCatalog, clean_token
from .describe import passage_tokens


@dataclass(frozen=True)
class TokenFiring:
    """A passage token on which a latent fires."""

    position: int
    """Among the passage's captured tokens."""
    token: str
    """The token's text in the passage."""
    start: int
    end: int
    """Character span in the passage's text."""
    activation: float


@dataclass(frozen=True)
class SharedLatent:
    """One latent of the sparse score: query weight times passage weight."""

    latent: int
    label: str
    contribution: float
    share: float
    """contribution / score (the shares of all shared latents add up to 1)."""
    query_weight: float
    passage_weight: float
    """The passage's BM25 weight of the latent, as the index stores it."""
    in_query: bool
    """False for a latent that pseudo-relevance feedback added to the query."""
    tokens: tuple[TokenFiring, ...]
    """Passage tokens where it fires, strongest first."""

    def to_json(self) -> dict[str, Any]:
        return {
            "latent": self.latent,
            "label": self.label,
            "contribution": self.contribution,
            "share": self.share,
            "query_weight": self.query_weight,
            "passage_weight": self.passage_weight,
            "in_query": self.in_query,
            "tokens": [[t.position, t.token, t.start, t.end, t.activation] for t in self.tokens],
        }


@dataclass(frozen=True)
class Explanation:
    """The sparse score of one passage for one query, latent by latent."""

    query: str
    passage_id: str
    doc_id: str
    text: str
    score: float
    """The sparse score: the sum of every shared latent's contribution."""
    latents: tuple[SharedLatent, ...]
    """Every shared latent, largest contribution first."""

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "passage_id": self.passage_id,
            "doc_id": self.doc_id,
            "score": self.score,
            "text": self.text,
            "latents": [s.to_json() for s in self.latents],
        }

    def format(self, top: int = 10, tokens: int = 4) -> str:
        """A readable account: the passage, then its `top` latents with label, share and firing tokens."""
        snippet = " ".join(self.text.split())
        lines = [
            f"Query: {self.query}",
            f"Passage {self.passage_id} (document {self.doc_id}), sparse score {self.score:.4f}:",
            f"  {snippet[:300]}{'...' if len(snippet) > 300 else ''}",
            f"Shared latents ({len(self.latents)}), by share of the score:",
        ]
        for s in self.latents[:top]:
            fired = ", ".join(f'"{clean_token(t.token)}"' for t in s.tokens[:tokens])
            more = f" +{len(s.tokens) - tokens}" if len(s.tokens) > tokens else ""
            origin = "" if s.in_query else " (feedback)"
            lines.append(
                f"  {100 * s.share:5.1f}%  #{s.latent:<6} {s.label or '(no label)'}{origin}\n"
                f"          fires on: {fired or '(none where the passage was captured again)'}{more}"
            )
        rest = self.latents[top:]
        if rest:
            lines.append(f"  {100 * sum(s.share for s in rest):5.1f}%  {len(rest)} more latents")
        return "\n".join(lines)


def explain_match(
    query_weights: sp.csr_matrix,
    passage_weights: sp.csr_matrix,
    token_values: np.ndarray,
    token_indices: np.ndarray,
    token_texts: list[str],
    token_spans: np.ndarray,
    catalog: LatentCatalog | None = None,
    query_codes: sp.csr_matrix | None = None,
) -> tuple[float, list[SharedLatent]]:
    """The sparse score of one passage and every latent it shares with the query, largest contribution first.

    Args:
        query_weights: (1, num_latents) the query's sparse weights (`Retriever.query_weights`).
        passage_weights: (1, num_latents) the passage's stored BM25 weights.
        token_values, token_indices: (n_tokens, k) SAE codes of the passage's tokens.
        token_texts: (n_tokens) each token's text in the passage; `token_spans` (n_tokens, 2) its
            character span.
        catalog: labels (none without it).
        query_codes: (1, num_latents) the query's own codes, to tell its latents from feedback's.
    """
    q = sp.csr_matrix(query_weights).astype(np.float64)
    d = sp.csr_matrix(passage_weights).astype(np.float64)
    contrib = q.multiply(d).tocsr()
    latents, values = contrib.indices, contrib.data
    keep = values != 0
    latents, values = latents[keep], values[keep]
    score = float(values.sum())
    own = set(sp.csr_matrix(query_codes).indices.tolist()) if query_codes is not None else None
    q_dense = {int(j): float(w) for j, w in zip(q.indices, q.data)}
    d_dense = {int(j): float(w) for j, w in zip(d.indices, d.data)}
    fired = token_values > 0
    shared = []
    for position in np.argsort(-values, kind="stable"):
        j = int(latents[position])
        rows, cols = np.nonzero((token_indices == j) & fired)
        acts = token_values[rows, cols]
        order = np.argsort(-acts, kind="stable")
        tokens = tuple(
            TokenFiring(
                int(rows[o]),
                token_texts[rows[o]],
                int(token_spans[rows[o], 0]),
                int(token_spans[rows[o], 1]),
                float(acts[o]),
            )
            for o in order
        )
        shared.append(
            SharedLatent(
                latent=j,
                label=catalog.label(j) if catalog is not None else "",
                contribution=float(values[position]),
                share=float(values[position] / score) if score else 0.0,
                query_weight=q_dense[j],
                passage_weight=d_dense[j],
                in_query=own is None or j in own,
                tokens=tokens,
            )
        )
    return score, shared


class SearchableIndex(Protocol):
    """What `explain_query` reads of an `Index`."""

    passages: list[Any]
    retriever: Any
    config: Any

    @property
    def llm(self) -> Any: ...

    @property
    def sae(self) -> Any: ...

    def encode_queries(self, queries: list[str]) -> sp.csr_matrix: ...

    def search(self, query: str, k: int = 10, mode: str | None = None, per_doc: bool = False) -> list[Any]: ...


def explain_query(
    index: SearchableIndex, catalog: LatentCatalog | None, query: str, doc_id: str | None = None
) -> Explanation:
    """Why a passage matches `query`: the index's top hit, or with `doc_id` (a document or passage id)
    that document's passage with the highest sparse score. Whatever mode ranked the hit, what is
    explained is its sparse score (as `Hit.latents`). The passage is captured again to find the tokens
    where each latent fires."""
    if not isinstance(query, str) or not query.strip():
        raise QueryError("explain needs a non-empty query")
    # An index that keeps deleted rows (`Index.passages` of a segmented index) says which rows are live
    # in `doc_rows`; without it every row is.
    doc_rows = getattr(index, "doc_rows", None)
    live = range(len(index.passages)) if doc_rows is None else sorted(r for rows in doc_rows.values() for r in rows)
    rows_of: dict[str, list[int]] = {}
    for row in live:
        passage = index.passages[row]
        rows_of.setdefault(passage.passage_id, []).append(row)
        if passage.doc_id != passage.passage_id:
            rows_of.setdefault(passage.doc_id, []).append(row)
    query_codes = index.encode_queries([query])
    weights = index.retriever.query_weights(query_codes)
    if doc_id is None:
        hits = index.search(query, k=1)
        if not hits:
            raise QueryError("the index returned no passage for this query")
        rows = rows_of[hits[0].passage_id][:1]
    else:
        if doc_id not in rows_of:
            raise QueryError(f"document or passage {doc_id!r} is not in the index")
        rows = rows_of[doc_id]
    passage_weights = index.retriever.sparse.rows(rows)
    scores = np.asarray(passage_weights.multiply(weights).sum(axis=1)).ravel()
    best = int(np.argmax(scores))
    row = rows[best]
    passage = index.passages[row]
    capture = index.config.capture
    acts = passage_activations(index.llm, [passage.text], capture)
    values, indices = encode_tokens(index.sae, acts.values, select_dtype=selection_dtype(index.llm))
    tokens = passage_tokens(index.llm, [passage.text], capture)
    spans = np.stack([tokens.starts, tokens.ends], axis=1)
    with index.llm.lock:  # a token outside the text (the space after the prefix) shows as decoded
        texts = [passage.text[s:e] or index.llm.tokenizer.decode([t]) for (s, e), t in zip(spans, tokens.ids)]
    score, shared = explain_match(weights, passage_weights[best], values, indices, texts, spans, catalog, query_codes)
    return Explanation(query, passage.passage_id, passage.doc_id, passage.text, score, tuple(shared))
