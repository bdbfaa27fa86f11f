"""`LatentCatalog`: what each live latent of an index's SAE means on its corpus (label, frequencies, top
contexts, characteristic and logit-lens tokens, activation histogram, nearest latents), saved as one
versioned, checksummed JSON file and looked up by latent id, label or token.

The file is columnar: one list per field over all live latents, and variable-length fields (contexts,
tokens, neighbours) as flat lists with offsets. Tens of thousands of latents then load and validate
in a fraction of a second; `LatentCatalog.card` assembles one latent's `LatentCard` when asked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexFolderError, QueryError
from ..storage import json_checksum, read_versioned_json, write_text_atomic

LATENTS_FILE = "latents.json"
"""The catalog's file in an index folder."""
LATENTS_FORMAT_VERSION = 1
"""What changed between versions goes in CHANGELOG.md."""
LATENTS_KIND = "ragsae latent catalog"


@dataclass(frozen=True)
class LatentContext:
    """One place in the corpus where a latent fires strongly: the firing token with text either side."""

    passage_id: str
    position: int
    """The token's position among the passage's captured tokens (prefix left out)."""
    activation: float
    left: str
    token: str
    right: str


@dataclass(frozen=True)
class CharacteristicToken:
    """A token a latent fires on more than its corpus frequency predicts (`describe.characteristic_scores`)."""

    token: str
    """As the tokenizer decodes it alone (with its leading space, if any)."""
    fires: int
    """Occurrences of the token on which the latent fires."""
    count: int
    """Occurrences of the token in the corpus."""
    score: float


@dataclass(frozen=True)
class LatentCard:
    """What the corpus says about one live latent."""

    latent: int
    label: str
    passages: int
    """Passages on which the latent fires on at least one token."""
    tokens: int
    """Tokens on which it fires."""
    passage_frequency: float
    token_frequency: float
    mean_activation: float
    max_activation: float
    histogram: tuple[int, ...]
    """Tokens per activation bin (`LatentCatalog.histogram_edges`: len(edges) + 1 bins)."""
    contexts: tuple[LatentContext, ...]
    """Strongest activations, at most one per document, strongest first."""
    characteristic: tuple[CharacteristicToken, ...]
    """Best first."""
    logit_lens: tuple[str, ...]
    """Vocabulary tokens the decoder direction promotes most through the LM's unembedding, best first."""
    neighbours: tuple[tuple[int, float], ...]
    """(latent, decoder cosine) of the nearest live latents, nearest first."""

    def to_json(self) -> dict[str, Any]:
        return {
            "latent": self.latent,
            "label": self.label,
            "passages": self.passages,
            "tokens": self.tokens,
            "passage_frequency": self.passage_frequency,
            "token_frequency": self.token_frequency,
            "mean_activation": self.mean_activation,
            "max_activation": self.max_activation,
            "histogram": list(self.histogram),
            "contexts": [c.__dict__ for c in self.contexts],
            "characteristic": [c.__dict__ for c in self.characteristic],
            "logit_lens": list(self.logit_lens),
            "neighbours": [list(n) for n in self.neighbours],
        }


LATENT_COLUMNS: dict[str, type] = {
    "latent": int,
    "label": str,
    "passages": int,
    "tokens": int,
    "mean_activation": float,
    "max_activation": float,
}
"""One value per live latent."""
RAGGED_COLUMNS: dict[str, dict[str, type]] = {
    "contexts": {"passage_id": str, "position": int, "activation": float, "left": str, "token": str, "right": str},
    "characteristic": {"token": str, "fires": int, "count": int, "score": float},
    "logit_lens": {"token": str},
    "neighbours": {"latent": int, "cosine": float},
}
"""Several values per live latent: the entries of live latent i are offsets[i]:offsets[i+1] of each column."""


@dataclass(frozen=True)
class Ragged:
    """Variable-length entries per live latent, stored flat (see `RAGGED_COLUMNS`)."""

    offsets: np.ndarray
    """(n_live + 1,) int64."""
    columns: dict[str, Any]
    """Column name -> list[str] or 1-D numpy array, each offsets[-1] long."""

    def span(self, i: int) -> range:
        return range(int(self.offsets[i]), int(self.offsets[i + 1]))

    @classmethod
    def of(cls, rows: Sequence[Sequence[tuple[Any, ...]]], names: dict[str, type]) -> Ragged:
        """From per-latent lists of tuples (one value per column, in `names` order)."""
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        flat = [entry for r in rows for entry in r]
        columns: dict[str, Any] = {}
        for c, (name, kind) in enumerate(names.items()):
            values = [entry[c] for entry in flat]
            columns[name] = values if kind is str else np.array(values, dtype=np.int64 if kind is int else np.float64)
        return cls(offsets, columns)


VISIBLE_WHITESPACE = {"\n": "⏎", "\r": "⏎", "\t": "⇥", " ": "␣"}


def clean_token(text: str) -> str:
    """A token as a label shows it: surrounding whitespace (the tokenizer's space marker) removed, a
    whitespace-only token made visible, control characters escaped."""
    stripped = text.strip()
    if stripped:
        return stripped if stripped.isprintable() else stripped.encode("unicode_escape").decode("ascii")
    return "".join(VISIBLE_WHITESPACE.get(ch, "␣") for ch in text[:3]) or "∅"


def search_key(text: str) -> str:
    """A token or word as searches compare it: as `clean_token` shows it, case folded."""
    return clean_token(text).casefold()


@dataclass
class LatentCatalog:
    """The live latents of an index's SAE on its corpus (`describe.describe_latents`), columnar."""

    num_latents: int
    passages: int
    """Passages described."""
    tokens: int
    """Their captured tokens."""
    histogram_edges: tuple[float, ...]
    columns: dict[str, Any]
    """`LATENT_COLUMNS` (lists or numpy arrays, ascending latent ids) and 'histogram' (n_live, bins)."""
    ragged: dict[str, Ragged]
    """`RAGGED_COLUMNS`."""
    source: dict[str, Any] = field(default_factory=dict)
    """What was described: LLM id and hash, layer, SAE architecture, k and width (informational)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The `describe_latents` settings used."""

    def __post_init__(self) -> None:
        self.live = np.asarray(self.columns["latent"], dtype=np.int64)
        """Ids of the live latents (those that fire on at least one token), ascending."""
        self._row = {int(j): i for i, j in enumerate(self.live)}
        self._by_token: dict[str, list[tuple[int, int, int]]] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_cards(
        cls,
        num_latents: int,
        passages: int,
        tokens: int,
        histogram_edges: Sequence[float],
        cards: Sequence[LatentCard],
        source: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> LatentCatalog:
        """A catalog of `cards` (any order; frequencies are recomputed from the counts)."""
        cards = sorted(cards, key=lambda c: c.latent)
        bins = len(histogram_edges) + 1
        columns: dict[str, Any] = {
            name: [getattr(c, name) for c in cards] if kind is str else np.array([getattr(c, name) for c in cards])
            for name, kind in LATENT_COLUMNS.items()
        }
        columns["histogram"] = np.array([c.histogram for c in cards], dtype=np.int64).reshape(len(cards), bins)
        ragged = {
            "contexts": Ragged.of(
                [[tuple(x.__dict__.values()) for x in c.contexts] for c in cards], RAGGED_COLUMNS["contexts"]
            ),
            "characteristic": Ragged.of(
                [[tuple(x.__dict__.values()) for x in c.characteristic] for c in cards],
                RAGGED_COLUMNS["characteristic"],
            ),
            "logit_lens": Ragged.of([[(t,) for t in c.logit_lens] for c in cards], RAGGED_COLUMNS["logit_lens"]),
            "neighbours": Ragged.of([list(c.neighbours) for c in cards], RAGGED_COLUMNS["neighbours"]),
        }
        return cls(num_latents, passages, tokens, tuple(histogram_edges), columns, ragged, source or {}, settings or {})

    def __len__(self) -> int:
        return len(self.live)

    def __iter__(self) -> Iterator[LatentCard]:
        """Every live latent's card, by id."""
        return (self.card(int(j)) for j in self.live)

    @property
    def dead(self) -> int:
        """Latents that never fired on the corpus."""
        return self.num_latents - len(self.live)

    def card(self, latent: int) -> LatentCard:
        """The card of one latent; QueryError for an id out of range or a latent that never fired."""
        if isinstance(latent, bool) or not isinstance(latent, (int, np.integer)) or not 0 <= latent < self.num_latents:
            raise QueryError(f"latent {latent!r} does not exist: the SAE has latents 0..{self.num_latents - 1}")
        i = self._row.get(int(latent))
        if i is None:
            raise QueryError(f"latent {latent} never fires on this index's passages (a dead latent): it has no card")
        col, rag = self.columns, self.ragged

        def entries(name: str) -> list[tuple[Any, ...]]:
            table = rag[name]
            return [tuple(_item(table.columns[c], k) for c in RAGGED_COLUMNS[name]) for k in table.span(i)]

        passages, tokens = int(col["passages"][i]), int(col["tokens"][i])
        return LatentCard(
            latent=int(latent),
            label=col["label"][i],
            passages=passages,
            tokens=tokens,
            passage_frequency=passages / max(self.passages, 1),
            token_frequency=tokens / max(self.tokens, 1),
            mean_activation=float(col["mean_activation"][i]),
            max_activation=float(col["max_activation"][i]),
            histogram=tuple(int(x) for x in col["histogram"][i]),
            contexts=tuple(LatentContext(*e) for e in entries("contexts")),
            characteristic=tuple(CharacteristicToken(*e) for e in entries("characteristic")),
            logit_lens=tuple(e[0] for e in entries("logit_lens")),
            neighbours=tuple((int(a), float(b)) for a, b in entries("neighbours")),
        )

    def label(self, latent: int) -> str:
        """A latent's label, or '' for one without a card."""
        i = self._row.get(int(latent))
        return self.columns["label"][i] if i is not None else ""

    def labelled(self, latents: list[tuple[int, float]]) -> list[tuple[int, float, str]]:
        """(latent, contribution) pairs (`Hit.latents`) with each latent's label added."""
        return [(j, w, self.label(j)) for j, w in latents]

    def _token_index(self) -> dict[str, list[tuple[int, int, int]]]:
        """Search key -> (tier, -fires, latent) of the latents that fire on that token: tier 0 where it
        is in the label, 1 among the characteristic tokens, 2 only in the top contexts. Built on first
        use, under a lock."""
        with self._lock:
            if self._by_token is not None:
                return self._by_token
            found: dict[tuple[str, int], tuple[int, int, int]] = {}
            chars, contexts = self.ragged["characteristic"], self.ragged["contexts"]
            for i, latent in enumerate(self.live.tolist()):
                label = {search_key(word) for word in self.columns["label"][i].split(" · ")}
                for k in chars.span(i):
                    key = search_key(chars.columns["token"][k])
                    entry = (0 if key in label else 1, -int(chars.columns["fires"][k]), latent)
                    found[(key, latent)] = min(found.get((key, latent), entry), entry)
                for k in contexts.span(i):
                    key = search_key(contexts.columns["token"][k])
                    found.setdefault((key, latent), (2, 0, latent))
            index: dict[str, list[tuple[int, int, int]]] = {}
            for (key, _), entry in found.items():
                if key:
                    index.setdefault(key, []).append(entry)
            for entries in index.values():
                entries.sort()
            self._by_token = index
            return index

    def search(self, word: str, limit: int = 20) -> list[LatentCard]:
        """Latents that fire on a token equal to `word` (case-insensitive): those with it in their label,
        then among their characteristic tokens (most firings on it first), then only in their top
        contexts; then latents whose label contains `word`, most frequent first."""
        if not isinstance(word, str) or not word.strip():
            raise QueryError("latent search needs a word (search '␣' for tokens of spaces)")
        key = search_key(word)
        found = [latent for _, _, latent in self._token_index().get(key, [])]
        seen = set(found)
        labels, tokens = self.columns["label"], self.columns["tokens"]
        by_label = [
            (-int(tokens[i]), int(j))
            for i, j in enumerate(self.live.tolist())
            if j not in seen and key in labels[i].casefold()
        ]
        found += [j for _, j in sorted(by_label)]
        return [self.card(j) for j in found[:limit]]

    # --- persistence -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The catalog as saved (with its checksum)."""
        latents = {name: _plain(self.columns[name]) for name in LATENT_COLUMNS}
        latents["histogram"] = self.columns["histogram"].reshape(-1).tolist()
        data: dict[str, Any] = {
            "format_version": LATENTS_FORMAT_VERSION,
            "kind": LATENTS_KIND,
            "num_latents": self.num_latents,
            "passages": self.passages,
            "tokens": self.tokens,
            "histogram_edges": list(self.histogram_edges),
            "source": self.source,
            "settings": self.settings,
            "latents": latents,
            **{
                name: {"offsets": self.ragged[name].offsets.tolist()}
                | {c: _plain(self.ragged[name].columns[c]) for c in RAGGED_COLUMNS[name]}
                for name in RAGGED_COLUMNS
            },
        }
        data["checksum"] = json_checksum(data)
        return data

    def save(self, folder: str | Path) -> list[str]:
        """Write the catalog into the existing folder `folder` (atomically, replacing an older one);
        returns the names of the files written."""
        text = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        write_text_atomic(Path(folder) / LATENTS_FILE, text)
        return [LATENTS_FILE]

    @classmethod
    def load(cls, folder: str | Path, num_latents: int | None = None) -> LatentCatalog:
        """The catalog saved in `folder`, checked (format version, checksum, every field's type, length
        and range); IndexFolderError naming the file and field otherwise, or when it describes another
        number of latents than `num_latents`."""
        path = Path(folder) / LATENTS_FILE
        data = read_versioned_json(path, LATENTS_FORMAT_VERSION, IndexFolderError, "a latent catalog", 1)
        catalog = _parse(data, path)
        if num_latents is not None and catalog.num_latents != num_latents:
            raise IndexFolderError(
                f"{path}: describes {catalog.num_latents} latents, but the index's SAE has {num_latents}"
            )
        return catalog


def _item(column: Any, k: int) -> Any:
    value = column[k]
    return value.item() if isinstance(value, np.generic) else value


def _plain(column: Any) -> list[Any]:
    return column.tolist() if isinstance(column, np.ndarray) else list(column)


# --- validation ------------------------------------------------------------------------


class _Checker:
    """Checks on parsed JSON that raise IndexFolderError naming the file and field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> IndexFolderError:
        return IndexFolderError(f"{self.path}: {where} {what}")

    def get(self, obj: dict[str, Any], name: str, where: str = "") -> Any:
        if name not in obj:
            raise self.fail(where + name, "is missing")
        return obj[name]

    def integer(self, value: Any, where: str, low: int = 0) -> int:
        if type(value) is not int or value < low:
            raise self.fail(where, f"must be a whole number >= {low}, got {value!r}")
        return value

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be an object, got {type(value).__name__}")
        return value

    def column(self, value: Any, where: str, kind: type, length: int) -> Any:
        """A list of `length` values of `kind`: the list (str) or a numpy array (int64, float64)."""
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {type(value).__name__}")
        if len(value) != length:
            raise self.fail(where, f"has {len(value)} entries, expected {length}")
        if kind is str:
            ok = all(type(x) is str for x in value)
        elif kind is int:
            ok = all(type(x) is int for x in value)
        else:
            ok = all(type(x) is float or type(x) is int for x in value)
        if not ok:
            bad = next(k for k, x in enumerate(value) if not _is(x, kind))
            raise self.fail(f"{where}[{bad}]", f"must be a {kind.__name__}, got {value[bad]!r}")
        if kind is str:
            return value
        array = np.array(value, dtype=np.int64 if kind is int else np.float64)
        if kind is float and len(array) and not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array))[0])
            raise self.fail(f"{where}[{bad}]", f"must be a finite number, got {value[bad]!r}")
        return array

    def within(self, array: np.ndarray, where: str, low: Any, high: Any, what: str) -> None:
        """Each entry in [low, high] (arrays or numbers)."""
        bad = np.flatnonzero((array < low) | (array > high))
        if len(bad):
            k = int(bad[0])
            raise self.fail(f"{where}[{k}]", f"is {array[k]}, {what}")

    def offsets(self, value: Any, where: str, rows: int) -> np.ndarray:
        offsets = self.column(value, where, int, rows + 1)
        if rows + 1 and (offsets[0] != 0 or (np.diff(offsets) < 0).any()):
            raise self.fail(where, "must start at 0 and never decrease")
        return offsets


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def _parse(data: dict[str, Any], path: Path) -> LatentCatalog:
    r = _Checker(path)
    if data.get("kind") != LATENTS_KIND:
        raise r.fail("kind", f"must be {LATENTS_KIND!r}, got {data.get('kind')!r}")
    m = r.integer(r.get(data, "num_latents"), "num_latents", 1)
    n_passages = r.integer(r.get(data, "passages"), "passages")
    n_tokens = r.integer(r.get(data, "tokens"), "tokens", n_passages)
    raw_edges = r.get(data, "histogram_edges")
    edges = r.column(raw_edges, "histogram_edges", float, len(raw_edges) if isinstance(raw_edges, list) else 0)
    if (np.diff(edges) <= 0).any():
        raise r.fail("histogram_edges", "must increase")
    source = r.mapping(r.get(data, "source"), "source")
    settings = r.mapping(r.get(data, "settings"), "settings")
    table = r.mapping(r.get(data, "latents"), "latents")
    raw_ids = r.get(table, "latent", "latents.")
    n_live = len(raw_ids) if isinstance(raw_ids, list) else 0
    columns = {
        name: r.column(r.get(table, name, "latents."), f"latents.{name}", kind, n_live)
        for name, kind in LATENT_COLUMNS.items()
    }
    ids = columns["latent"]
    r.within(ids, "latents.latent", 0, m - 1, f"outside [0, {m - 1}]")
    if (np.diff(ids) <= 0).any():
        raise r.fail("latents.latent", "must be strictly increasing (each latent once)")
    r.within(columns["passages"], "latents.passages", 1, n_passages, f"outside [1, {n_passages}] passages")
    r.within(
        columns["tokens"], "latents.tokens", columns["passages"], n_tokens, "fewer than its passages or above tokens"
    )
    bins = len(edges) + 1
    histogram = r.column(r.get(table, "histogram", "latents."), "latents.histogram", int, n_live * bins)
    r.within(histogram, "latents.histogram", 0, n_tokens, f"outside [0, {n_tokens}] tokens")
    histogram = histogram.reshape(n_live, bins)
    sums = histogram.sum(axis=1)
    if (sums != columns["tokens"]).any():
        i = int(np.flatnonzero(sums != columns["tokens"])[0])
        raise r.fail(
            f"latents.histogram (latent {ids[i]})",
            f"counts {sums[i]} tokens, latents.tokens says {columns['tokens'][i]}",
        )
    columns["histogram"] = histogram
    ragged = {}
    for name, fields in RAGGED_COLUMNS.items():
        obj = r.mapping(r.get(data, name), name)
        offsets = r.offsets(r.get(obj, "offsets", f"{name}."), f"{name}.offsets", n_live)
        total = int(offsets[-1])
        ragged[name] = Ragged(
            offsets, {c: r.column(r.get(obj, c, f"{name}."), f"{name}.{c}", kind, total) for c, kind in fields.items()}
        )
    contexts, chars, near = ragged["contexts"].columns, ragged["characteristic"].columns, ragged["neighbours"].columns
    r.within(contexts["position"], "contexts.position", 0, np.inf, "negative")
    r.within(chars["count"], "characteristic.count", 1, n_tokens, f"outside [1, {n_tokens}]")
    r.within(chars["fires"], "characteristic.fires", 1, chars["count"], "below 1 or above the token's count")
    r.within(near["latent"], "neighbours.latent", 0, m - 1, f"outside [0, {m - 1}]")
    return LatentCatalog(m, n_passages, n_tokens, tuple(float(e) for e in edges), columns, ragged, source, settings)
