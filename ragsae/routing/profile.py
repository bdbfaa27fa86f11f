"""A user's profile: a sparse vector over an index's latents, built from the passages they read, that
re-weights their queries' latents before scoring.

Each passage (or document) the profile is built from is one item: its live BM25 latent weights scaled to
unit length (a document: the mean of its passages' unit vectors). The profile is the weighted mean of its
items: `from_passages` gives each item weight 1; `update` first multiplies the weight of everything already
in the profile by `decay`, then adds the new items with weight 1. With `decay=1` (the default) the profile
is the plain mean of every item ever added, whatever the order and batching of the updates; with
`decay < 1` an update made t updates ago weighs decay**t as much as the latest one, so interests fade.

`Index.search(query, profile=p, weight=w)` changes the query's pooled code two ways: each of its latents
j is multiplied by `1 + w * p_j / max(p)` (latents the user's passages share gain up to a factor `1 + w`),
and the profile's `EXPAND_LATENTS` strongest latents are raised to at least
`w * EXPAND_FRACTION * p_j / max(p)` times the query's strongest value. The first reorders what matches the
query; the second carries the user's subject into a query too short to name it (one ambiguous word matches
every subject it occurs in: `benchmarks/personalisation.py`). `w = 0` is exactly the plain search.

A profile belongs to one SAE version of one index (latent j means nothing under another SAE): it records
a fingerprint of the SAE's weights, and is refused by an index with another SAE. Saved as a small JSON file
(`save`, `load`), written atomically and checked on load: format version, checksum, shapes, finite values.
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import ConfigError, QueryError
from ..index import Index
from ..retrieval.scoring import row_norms
from ..sae import SparseAutoencoder
from ..storage import json_checksum, read_versioned_json, write_json_atomic

PROFILE_FORMAT_VERSION = 1
PROFILE_KIND = "ragsae-profile"
EXPAND_LATENTS = 20
"""The profile's strongest latents that a personalised query gains where its own value is lower."""
EXPAND_FRACTION = 0.125
"""Their value at weight 1, as a fraction of the query's strongest: small beside the query's own subject
(chosen on the msmarco-5k simulation of `benchmarks/personalisation.py`, confirmed on cranfield's)."""


@dataclass
class Profile:
    """A sparse vector over one SAE's latents: what the passages a user read have in common.

    The mean of the unit-length latent weights of the passages read (a document counts as the mean of its
    passages); `update` first multiplies the weight of what the profile held by `decay` (1: a plain mean of
    everything added, in any order). `Index.search(..., profile=p, weight=w)` multiplies each of the
    query's latents by `1 + w * p_j / max(p)` and adds the profile's strongest latents at a small share of
    the query's strongest (module docstring). Saved as JSON, written atomically and checked on load
    (format version, checksum, shapes, finite values).

    Build with `from_passages`, extend with `update`, keep with `save` / `load`; pass to `Index.search`
    (`profile=`, `weight=`). `update` changes the profile in place: do not update one that other threads
    are searching with.
    """

    num_latents: int
    latents: np.ndarray
    """(nnz,) int64 latent ids, increasing."""
    values: np.ndarray
    """(nnz,) float64 weights, each > 0: the weighted mean of the items' unit-length latent weights."""
    mass: float
    """Total weight of the items in the profile (their count when `decay` is 1)."""
    decay: float
    """What the weight of everything already in the profile is multiplied by at each `update`, in (0, 1]."""
    sae_fingerprint: str
    """SHA-256 of the SAE's weights (`sae_fingerprint`): the profile is refused by an index with another SAE."""
    sae_version: int
    """The index's SAE version it was built on (shown in messages)."""
    items: int = 0
    """Passages and documents added so far, all updates together."""

    # --- building --------------------------------------------------------------------------
    @classmethod
    def from_passages(cls, index: Index, passage_ids: Iterable[str], decay: float = 1.0) -> Profile:
        """The profile of the live passages (or whole documents) with these ids in `index`, each weight 1."""
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {decay!r}")
        items = item_vectors(index, passage_ids)
        profile = cls(
            index.sae.num_latents,
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.float64),
            0.0,
            float(decay),
            sae_fingerprint(index.sae),
            index.sae_version,
        )
        profile._add(items)
        return profile

    def update(self, index: Index, passage_ids: Iterable[str]) -> Profile:
        """Add more passages (or documents) read: what the profile held weighs `decay` times as much as
        before, each new item weight 1. Changes the profile in place and returns it."""
        self.check_index(index)
        self._add(item_vectors(index, passage_ids), self.decay)
        return self

    def _add(self, items: sp.csr_matrix, decay: float = 1.0) -> None:
        kept = decay * self.mass
        total = self.dense() * kept + np.asarray(items.sum(axis=0), dtype=np.float64).ravel()
        mass = kept + items.shape[0]
        vector = total / mass
        latents = np.flatnonzero(vector > 0)
        self.latents, self.values = latents.astype(np.int64), vector[latents]
        self.mass, self.items = float(mass), self.items + items.shape[0]

    def dense(self) -> np.ndarray:
        """(num_latents,) float64 profile weights."""
        vector = np.zeros(self.num_latents, dtype=np.float64)
        vector[self.latents] = self.values
        return vector

    def top(self, n: int = 10) -> list[tuple[int, float]]:
        """The `n` strongest latents as (latent, weight)."""
        order = np.argsort(-self.values, kind="stable")[:n]
        return [(int(self.latents[i]), float(self.values[i])) for i in order]

    # --- searching -------------------------------------------------------------------------
    def check_index(self, index: Index) -> None:
        """QueryError unless `index` encodes with the SAE this profile was built on."""
        if index.sae.num_latents != self.num_latents or sae_fingerprint(index.sae) != self.sae_fingerprint:
            raise QueryError(
                f"profile: built on an SAE of {self.num_latents} latents (version {self.sae_version}, weights "
                f"{self.sae_fingerprint[:12]}), but {index.path or 'this index'} encodes with another "
                f"({index.sae.num_latents} latents, version {index.sae_version}, weights "
                f"{sae_fingerprint(index.sae)[:12]}); build the profile on this index"
            )

    def reweight(self, index: Index, codes: sp.csr_matrix, weight: float) -> sp.csr_matrix:
        """Pooled query codes (n_queries, num_latents) of `index` with each latent j scaled by
        `1 + weight * p_j / max(p)`, and the profile's `EXPAND_LATENTS` strongest latents raised to at
        least `weight * EXPAND_FRACTION * p_j / max(p)` times each query's strongest value; `codes`
        itself when `weight` is 0 (the plain search)."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not weight >= 0:
            raise QueryError(f"weight must be a number >= 0, got {weight!r}")
        if not math.isfinite(weight):
            raise QueryError(f"weight must be finite, got {weight!r}")
        self.check_index(index)
        if weight == 0 or len(self.values) == 0:
            return codes
        peak = float(self.values.max())
        factor = 1.0 + float(weight) * self.dense() / peak
        scaled = sp.csr_matrix(codes.multiply(factor.astype(np.float32)[None, :]), dtype=np.float32)
        strongest = np.argsort(-self.values, kind="stable")[:EXPAND_LATENTS]
        query_peak = np.asarray(abs(codes).max(axis=1).todense(), dtype=np.float64).ravel()
        nq, added = codes.shape[0], len(strongest)
        values = np.outer(query_peak * float(weight) * EXPAND_FRACTION, self.values[strongest] / peak)
        gained = sp.csr_matrix(
            (values.ravel().astype(np.float32), np.tile(self.latents[strongest], nq), np.arange(nq + 1) * added),
            shape=codes.shape,
        )
        return sp.csr_matrix(scaled.maximum(gained), dtype=np.float32)

    # --- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format_version": PROFILE_FORMAT_VERSION,
            "kind": PROFILE_KIND,
            "num_latents": self.num_latents,
            "sae": {"fingerprint": self.sae_fingerprint, "version": self.sae_version},
            "decay": self.decay,
            "mass": self.mass,
            "items": self.items,
            "latents": self.latents.tolist(),
            "values": self.values.tolist(),
        }
        data["checksum"] = json_checksum(data)
        return data

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON, atomically (a crash leaves the old file or the new one)."""
        path = Path(path)
        write_json_atomic(path, self.to_json(), durable=True)
        return path

    @classmethod
    def load(cls, path: str | Path, index: Index | None = None) -> Profile:
        """A profile written by `save`; ConfigError naming the file and field when it is damaged, and,
        with `index`, QueryError when it was built on another SAE than the index's."""
        path = Path(path)
        data = read_versioned_json(path, PROFILE_FORMAT_VERSION, ConfigError, "a profile", PROFILE_FORMAT_VERSION)
        profile = cls.from_json(data, str(path))
        if index is not None:
            profile.check_index(index)
        return profile

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "profile") -> Profile:
        """From `to_json`'s output (its checksum already checked); ConfigError naming the field at fault."""

        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field {field!r} {why}")

        if data.get("kind") != PROFILE_KIND:
            raise bad("kind", f"must be {PROFILE_KIND!r}, got {data.get('kind')!r}")
        num_latents = data.get("num_latents")
        if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 1:
            raise bad("num_latents", f"must be a whole number >= 1, got {num_latents!r}")
        sae = data.get("sae")
        if not isinstance(sae, dict):
            raise bad("sae", "must be an object with 'fingerprint' and 'version'")
        fingerprint, version = sae.get("fingerprint"), sae.get("version")
        if not isinstance(fingerprint, str) or len(fingerprint) != 64 or not _is_hex(fingerprint):
            raise bad("sae.fingerprint", "must be a SHA-256 in hex")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise bad("sae.version", f"must be a whole number >= 1, got {version!r}")
        decay, mass, items = data.get("decay"), data.get("mass"), data.get("items")
        if not _is_number(decay) or not 0 < decay <= 1:
            raise bad("decay", f"must be a number in (0, 1], got {decay!r}")
        if not _is_number(mass) or not math.isfinite(mass) or mass <= 0:
            raise bad("mass", f"must be a finite number > 0, got {mass!r}")
        if isinstance(items, bool) or not isinstance(items, int) or items < 1:
            raise bad("items", f"must be a whole number >= 1, got {items!r}")
        latents, values = data.get("latents"), data.get("values")
        if not isinstance(latents, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in latents):
            raise bad("latents", "must be a list of whole numbers")
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise bad("values", "must be a list of numbers")
        if len(latents) != len(values):
            raise bad("values", f"has {len(values)} entries for {len(latents)} latents")
        ids = np.asarray(latents, dtype=np.int64)
        weights = np.asarray(values, dtype=np.float64)
        if len(ids) and (ids.min() < 0 or ids.max() >= num_latents):
            raise bad("latents", f"must lie in [0, {num_latents})")
        if (np.diff(ids) <= 0).any():
            raise bad("latents", "must be strictly increasing")
        if not np.isfinite(weights).all() or (weights <= 0).any():
            raise bad("values", "must be finite and > 0")
        return cls(num_latents, ids, weights, float(mass), float(decay), fingerprint, version, items)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def item_vectors(index: Index, ids: Iterable[str]) -> sp.csr_matrix:
    """(n_items, num_latents) one row per id: the unit-length live BM25 latent weights of a live passage,
    or the mean of those of a live document's passages. QueryError for an id that is neither."""
    if isinstance(ids, str):
        ids = [ids]
    ids = list(ids)
    if not ids:
        raise QueryError("a profile needs at least one passage or document id")
    retriever, passages = index._snapshot
    view = retriever.view
    groups: list[list[int]] = []
    for item in ids:
        if not isinstance(item, str):
            raise QueryError(f"passage ids must be strings, got {type(item).__name__}")
        rows = index.doc_rows.get(item)
        if rows is None:
            owner = item.rsplit("#", 1)[0] if "#" in item else None
            rows = [r for r in index.doc_rows.get(owner or "", []) if passages[r].passage_id == item]
        if not rows:
            raise QueryError(f"no live passage or document with id {item!r}")
        groups.append(list(rows))
    unique = sorted({r for rows in groups for r in rows})
    position = {row: i for i, row in enumerate(unique)}
    weights = retriever.rows(unique, view).multiply(view.scale[None, :]).tocsr().astype(np.float64)
    norms = row_norms(weights)
    weights = sp.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)) @ weights
    # Each item is the mean of its passages' unit vectors: a sparse (n_items, n_rows) averaging matrix.
    cols = np.concatenate([[position[r] for r in rows] for rows in groups])
    lengths = np.array([len(rows) for rows in groups])
    averaging = sp.csr_matrix(
        (np.repeat(1.0 / lengths, lengths), (np.repeat(np.arange(len(groups)), lengths), cols)),
        shape=(len(groups), len(unique)),
    )
    return sp.csr_matrix(averaging @ weights)


_fingerprints: weakref.WeakKeyDictionary[SparseAutoencoder, tuple[tuple[int, ...], str]] = weakref.WeakKeyDictionary()
_fingerprints_lock = threading.Lock()


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    """SHA-256 of an SAE's weights and normalisation (names, shapes and float32 bytes), kept per SAE
    object until a weight changes: the same for the SAE of an index in memory and once saved and loaded."""
    state = sae.state_dict()
    versions = tuple(t._version for t in state.values())
    with _fingerprints_lock:
        cached = _fingerprints.get(sae)
        if cached is not None and cached[0] == versions:
            return cached[1]
    digest = hashlib.sha256()
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name].detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.numpy().tobytes())
    value = digest.hexdigest()
    with _fingerprints_lock:
        _fingerprints[sae] = (versions, value)
    return value
