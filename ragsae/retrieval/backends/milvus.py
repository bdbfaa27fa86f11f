"""A serving copy of an index's live passages in a Milvus collection (`pymilvus`: Milvus Lite or a server).

One entity per live passage, keyed by its global row: `row` (INT64 primary key), `sparse`
(SPARSE_FLOAT_VECTOR: the stored BM25 latent weights, SPARSE_INVERTED_INDEX, inner product), `dense`
(FLOAT_VECTOR(d_model): the decoder-space vector the faiss mode scores, FLAT, inner product),
`doc_id`, `passage_id`, `char_start`, `char_end` and `text` (empty when the index stores no text).

Milvus answers exactly what the in-memory segments answer, to float32 rounding: sparse queries carry
the live-IDF scaling (`Retriever.query_weights`), the sparse index is exhaustive (no drop ratio), and
the dense field holds each passage's vector as its segment's 8-bit FAISS index decodes it, searched by
FLAT (exact) inner product. Milvus returns only passages that share a latent with a sparse query; the
retriever adds the others with score 0, as exact scoring ranks them (`Retriever.served`).

The one approximation is opt-in (`MilvusBackend.query_latents`, default None: off): a sparse query with
more latents is searched by that many of its largest weights for `candidates` hits, which are scored
again by the whole query from their stored weights. The scores returned are then exact, but a passage
the pruned query ranks below the candidates is missed, so the hits can differ from the segments'
(`QUERY_LATENTS` says why it is off).

The index folder's segments stay the source of truth and the exact reference. The collection is filled
when the index is built, kept in step by add, delete and upsert, and made anew under the next name
(`next_collection`) by compact and retrain, which renumber the rows, so that a process still holding
the old numbering can never read the new one. Each write ends with a flush and records the index
generation in the collection's properties; `Index.load` fills it again when it is missing or its row
count or generation disagrees with the index.

Consistency: searches use `CONSISTENCY_LEVEL` ("Eventually"), which never waits for the server to
catch up with recent writes (Milvus's default level may wait for a time tick on every search). The
cost is freshness for other clients only: the writing process flushes after every write batch, so its
own next search sees the change, while another process sees it once the server has applied it. Which
rows are live is decided by the index's own view (deleted rows are masked, rows beyond it dropped), so
a lagging collection can miss a passage added a moment ago but never returns a deleted one.

A Milvus Lite "file" (`layout.MILVUS_LITE_FILE`, a folder in fact) changes in place and is opened by one
process at a time; it is not named in the manifest's file checks, unlike the segment files written
once. Serve an index from several processes with a Milvus server (`uri="http://host:19530"`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import scipy.sparse as sp

from ...errors import ConfigError, IndexFolderError
from ...layout import MILVUS_LITE_FILE
from ...text import Passage
from .base import Backend

logger = logging.getLogger(__name__)

CONSISTENCY_LEVEL = "Eventually"
"""Consistency of searches and row reads (see the module's docstring)."""
MAX_TOPK = 16_384
"""Milvus's limit on the hits of one search; deeper searches are answered by the segments."""
BATCH_ROWS = 1_000
"""Entities per insert, delete or read request."""
VARCHAR_BYTES = 65_535
"""Milvus's limit on a VARCHAR value: longer texts are cut (the index folder keeps them whole)."""
TOKEN_ENV = "RAGSAE_MILVUS_TOKEN"
"""Environment variable holding the Milvus token ("user:password" or an API key); never in the manifest."""
GENERATION_PROPERTY = "ragsae.generation"
"""Collection property: the index generation the collection was last brought in step with."""
SCHEMES = ("http", "https", "tcp", "unix")
COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
QUERY_LATENTS: int | None = None
"""Default `MilvusBackend.query_latents`: None, every latent of a sparse query is searched (exact).

Milvus Lite scores a sparse query one posting at a time in Python and offers no approximate sparse index
(only SPARSE_INVERTED_INDEX with the TAAT_NAIVE algorithm and drop ratios of 0; other settings are refused
or dropped), so the one lever is the query: searching by its strongest latents only, then scoring the
`CANDIDATES` hits again by the whole query. That keeps quality only with about half of a feedback query's
latents and a deep candidate list, saves well under half of the search time at 50k-200k passages (a
per-search cost that grows with the collection remains), and makes small collections slower (each
candidate's stored weights come back with the hits): not worth being the default
(`benchmarks/milvus_quality.py --query-latents` measures its quality)."""
CANDIDATES = 100
"""Default `MilvusBackend.candidates`: hits a pruned sparse query asks for, to be scored by the whole query."""


def import_pymilvus() -> Any:
    """The pymilvus module, with an install hint where it is missing."""
    try:
        import pymilvus
    except ImportError as error:
        raise ImportError("the Milvus backend needs pymilvus and milvus-lite: pip install 'ragsae[milvus]'") from error
    return pymilvus


def is_lite(uri: str) -> bool:
    """True for a Milvus Lite uri (a local path ending in .db, as pymilvus decides)."""
    return uri.endswith(".db")


class MilvusUnavailable(LookupError):
    """The collection cannot answer (server unreachable, collection gone, rows missing, search too deep):
    the retriever answers from the segments instead."""


class PassageRecords(NamedTuple):
    """Live passages to store: their global rows (n,), stored BM25 weights (n, num_latents), dense
    vectors (n, d_model) and records."""

    rows: np.ndarray
    weights: sp.csr_matrix
    dense: np.ndarray
    passages: Sequence[Passage]


# --- where the collection is (the manifest's `serving` record) -------------------------------------------
def serving_record(uri: str | None, folder: Path | None) -> dict[str, Any]:
    """The manifest's record of a Milvus serving copy asked for with `uri` (None: Milvus Lite in the
    index folder) for an index saved in `folder` (None: kept in memory); its collection is named when the
    index is saved (`moved_record`)."""
    return {"backend": "milvus", "uri": recorded_uri(uri, folder), "collection": None}


def recorded_uri(uri: str | None, folder: Path | None) -> str:
    """`uri` as the manifest records it: the Lite file inside the index folder by its name (the folder
    can move), another Lite file by its absolute path, a server without the credentials of its URL."""
    if uri is None:
        if folder is None:
            raise ConfigError("uri: an index without a folder needs a Milvus uri (a file.db path or http://host:19530)")
        return MILVUS_LITE_FILE
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"uri must be a Milvus Lite file (ending in .db) or a server URL, got {uri!r}")
    if is_lite(uri):
        path = Path(uri).expanduser().resolve()
        if folder is not None and path == (Path(folder) / MILVUS_LITE_FILE).resolve():
            return MILVUS_LITE_FILE
        return str(path)
    parts = urlsplit(uri)
    if parts.scheme.lower() not in SCHEMES:
        raise ConfigError(f"uri {uri!r}: expected a file ending in .db or a URL starting with {', '.join(SCHEMES)}")
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc if parts.hostname else parts.netloc, parts.path, parts.query, ""))


def uri_token(uri: str | None) -> str:
    """The credentials of a server URL (user:password), else `$RAGSAE_MILVUS_TOKEN`, else none."""
    if uri is not None and not is_lite(uri):
        parts = urlsplit(uri)
        if parts.username:
            return parts.username + (f":{parts.password}" if parts.password else "")
    return os.environ.get(TOKEN_ENV, "")


def resolve_uri(recorded: str, folder: Path | None) -> str:
    """The uri to connect to: a relative Lite path is inside the index folder."""
    if is_lite(recorded) and not os.path.isabs(recorded) and folder is not None:
        return str(Path(folder) / recorded)
    return recorded


def moved_record(record: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """`record` for an index (re)written to `folder`: same uri, the first collection name of that folder
    (another folder never shares a collection)."""
    if folder is None:
        base = "ragsae_" + secrets.token_hex(4)
    else:
        resolved = Path(folder).resolve()
        slug = re.sub(r"[^A-Za-z0-9_]", "_", resolved.name)[:48]
        base = f"ragsae_{slug}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    return {**record, "collection": f"{base}_1"}


def next_collection(name: str) -> str:
    """The collection a rebuild fills: `BASE_N` becomes `BASE_N+1`."""
    base, _, number = name.rpartition("_")
    return f"{base}_{int(number) + 1}" if base and number.isdigit() else f"{name}_2"


def check_record(record: Any) -> str | None:
    """What is wrong with a manifest's `serving` record, or None."""
    if not isinstance(record, dict) or record.get("backend") != "milvus":
        return "must be {'backend': 'milvus', 'uri': ..., 'collection': ...}"
    if not isinstance(record.get("uri"), str) or not record["uri"]:
        return "'uri' must be a non-empty string"
    if not isinstance(record.get("collection"), str) or not COLLECTION_NAME.match(record["collection"]):
        return "'collection' must be a Milvus collection name"
    return None


def release_lite(uri: str) -> None:
    """Stop this process's Milvus Lite server of `uri` (before the folder under it is replaced)."""
    if not is_lite(uri):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # pragma: no cover - an older milvus-lite
        return
    server_manager_instance.release_server(uri)


# --- the collection ---------------------------------------------------------------------------------------
class MilvusBackend(Backend):
    """The live passages of an index in one Milvus collection, rows keyed by their global row id.

    `search` takes sparse query weights (CSR, (nq, num_latents)) or dense query vectors ((nq, d_model));
    `rows` reads stored sparse weights back. Both raise `MilvusUnavailable` when Milvus cannot answer.
    """

    def __init__(self, client: Any, uri: str, collection: str, num_latents: int, d_model: int):
        self.client = client
        self.uri = uri
        self.collection = collection
        self.num_latents = num_latents
        self.d_model = d_model
        self.query_latents = QUERY_LATENTS
        """Latents of a sparse query that Milvus searches by, its strongest (`strongest_latents`); None: all."""
        self.candidates = CANDIDATES
        """Hits a pruned sparse query asks Milvus for, scored again by the whole query (`search`)."""

    @classmethod
    def connect(cls, uri: str, collection: str, num_latents: int, d_model: int, token: str = "") -> MilvusBackend:
        """A client of the Milvus at `uri` (a Lite file is created if missing); the collection is loaded
        when it exists. IndexFolderError when Milvus cannot be reached."""
        pymilvus = import_pymilvus()
        if is_lite(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            client = pymilvus.MilvusClient(uri=uri, token=token)
            backend = cls(client, uri, collection, num_latents, d_model)
            if client.has_collection(collection):
                client.load_collection(collection)
        except pymilvus.exceptions.MilvusException as error:
            hint = (
                " (a Milvus Lite file is opened by one process at a time: stop the other one, or serve the index "
                "from a Milvus server, build --uri http://host:19530)"
                if is_lite(uri)
                else ""
            )
            raise IndexFolderError(
                f"cannot open the Milvus collection {collection!r} at {uri}: {error}{hint}"
            ) from None
        return backend

    def _call(self, action: str, call: Any) -> Any:
        """`call()`, with Milvus's errors turned into `MilvusUnavailable`."""
        pymilvus = import_pymilvus()
        try:
            return call()
        except (pymilvus.exceptions.MilvusException, ConnectionError) as error:
            raise MilvusUnavailable(f"Milvus {action} on {self.collection!r} at {self.uri} failed: {error}") from None

    @property
    def exists(self) -> bool:
        return bool(self._call("has_collection", lambda: self.client.has_collection(self.collection)))

    def create(self) -> None:
        """Make the collection anew (dropping one of the same name), empty, indexed and loaded."""
        pymilvus = import_pymilvus()
        data_type = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", data_type.INT64, is_primary=True)
        schema.add_field("sparse", data_type.SPARSE_FLOAT_VECTOR)
        schema.add_field("dense", data_type.FLOAT_VECTOR, dim=self.d_model)
        for name in ("doc_id", "passage_id"):
            schema.add_field(name, data_type.VARCHAR, max_length=VARCHAR_BYTES)
        for name in ("char_start", "char_end"):
            schema.add_field(name, data_type.INT64)
        schema.add_field("text", data_type.VARCHAR, max_length=VARCHAR_BYTES)
        indexes = self.client.prepare_index_params()
        # Default parameters are exact: no drop ratio, exhaustive posting lists; FLAT compares every vector.
        indexes.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        indexes.add_index(field_name="dense", index_type="FLAT", metric_type="IP")

        def create() -> None:
            if self.client.has_collection(self.collection):
                self.client.drop_collection(self.collection)
            self.client.create_collection(
                self.collection, schema=schema, index_params=indexes, consistency_level=CONSISTENCY_LEVEL
            )

        self._call("create_collection", create)

    def drop(self) -> None:
        """Remove the collection (a no-op when it is gone)."""

        def drop() -> None:
            if self.client.has_collection(self.collection):
                self.client.drop_collection(self.collection)

        self._call("drop_collection", drop)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception as error:  # closing a client of a stopped Lite server
            logger.debug("closing the Milvus client of %s: %s", self.uri, error)

    # --- writing ---------------------------------------------------------------------------------------
    def entities(self, records: PassageRecords) -> list[dict[str, Any]]:
        """The rows Milvus stores for `records`."""
        weights = records.weights.tocsr()
        dense = np.asarray(records.dense, dtype=np.float32)
        if dense.shape != (len(records.rows), self.d_model):
            raise ValueError(f"dense vectors of shape {dense.shape}, expected ({len(records.rows)}, {self.d_model})")
        return [
            {
                "row": int(row),
                "sparse": self.sparse_entity(weights, i),
                "dense": dense[i].tolist(),
                "doc_id": fit_varchar(p.doc_id),
                "passage_id": fit_varchar(p.passage_id),
                "char_start": int(p.char_start),
                "char_end": int(p.char_end),
                "text": fit_varchar(p.text),
            }
            for i, (row, p) in enumerate(zip(records.rows.tolist(), records.passages))
        ]

    def sparse_entity(self, weights: sp.csr_matrix, i: int) -> dict[int, float]:
        """Row i of `weights` as {latent: weight}, zeros left out. Milvus refuses a vector without a nonzero
        weight: an empty one is stored as weight 1 on latent `num_latents`, which no query holds and
        `rows` leaves out."""
        entry = sparse_dict(weights, i)
        return entry or {self.num_latents: 1.0}

    def insert(self, records: PassageRecords) -> None:
        """Store `records` (their rows must not be stored yet), without flushing."""
        entities = self.entities(records)
        for start in range(0, len(entities), BATCH_ROWS):
            batch = entities[start : start + BATCH_ROWS]
            self._call("insert", lambda: self.client.insert(self.collection, batch))

    def flush(self) -> None:
        self._call("flush", lambda: self.client.flush(self.collection))

    def add(self, vectors: PassageRecords) -> None:
        """Store passages as the rows they carry, then flush (a search right after sees them)."""
        self.insert(vectors)
        self.flush()

    def delete(self, rows: Sequence[int] | np.ndarray) -> None:
        """Delete `rows`, then flush."""
        ids = [int(r) for r in np.asarray(rows, dtype=np.int64)]
        for start in range(0, len(ids), BATCH_ROWS):
            batch = ids[start : start + BATCH_ROWS]
            self._call("delete", lambda: self.client.delete(self.collection, ids=batch))
        self.flush()

    def mark(self, generation: int) -> None:
        """Record the index generation the collection is now in step with (skipped, with a debug line,
        where the server keeps no custom properties: `in_step` then compares row counts only)."""
        try:
            self.client.alter_collection_properties(self.collection, properties={GENERATION_PROPERTY: str(generation)})
        except Exception as error:
            logger.debug("Milvus at %s keeps no collection property %s: %s", self.uri, GENERATION_PROPERTY, error)

    def generation(self) -> int | None:
        """The generation `mark` recorded, or None."""
        try:
            properties = self.client.describe_collection(self.collection).get("properties") or {}
            return int(properties[GENERATION_PROPERTY])
        except Exception:
            return None

    def in_step(self, live_rows: int, generation: int) -> bool:
        """Whether the collection exists with `live_rows` rows and (where recorded) at `generation`."""
        try:
            if not self.exists or len(self) != live_rows:
                return False
        except MilvusUnavailable:
            return False
        recorded = self.generation()
        return recorded is None or recorded == generation

    # --- reading ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        result = self._call(
            "count",
            lambda: self.client.query(
                self.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
            ),
        )
        return int(result[0]["count(*)"])

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best `k` rows per query as (scores, ids), (nq, k), -1 padded: sparse weights (CSR) search the
        sparse field (only rows sharing a latent come back), dense vectors the dense field.

        A sparse query holding more than `query_latents` latents is searched by its strongest ones for
        `candidates` hits (at least `k`), which are scored again by the whole query from their stored
        weights (`rescore`): the scores returned are exact, the rows are those the pruned query ranks
        first (see the module's docstring)."""
        if k > MAX_TOPK:
            raise MilvusUnavailable(f"a search for {k} hits is deeper than Milvus's limit of {MAX_TOPK}")
        whole: list[dict[int, float]] = []
        if sp.issparse(queries):
            queries = sp.csr_matrix(queries)
            whole = [sparse_dict(queries, i) for i in range(queries.shape[0])]
            data: list[Any] = [strongest_latents(query, self.query_latents) for query in whole]
            field = "sparse"
        else:
            array = np.asarray(queries, dtype=np.float32)
            data, field = [row.tolist() for row in array], "dense"
        nq = len(data)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        asked = [i for i, query in enumerate(data) if len(query)]  # an empty sparse query matches nothing
        if not asked or k < 1:
            return scores, ids
        pruned = any(len(data[i]) < len(whole[i]) for i in asked) if whole else False
        limit = min(MAX_TOPK, max(k, self.candidates)) if pruned else k
        results = self._call(
            "search",
            lambda: self.client.search(
                self.collection,
                data=[data[i] for i in asked],
                anns_field=field,
                limit=limit,
                output_fields=["row", "sparse"] if pruned else ["row"],
                search_params={"metric_type": "IP"},
                consistency_level=CONSISTENCY_LEVEL,
            ),
        )
        for i, hits in zip(asked, results):
            if pruned:
                found = rescore(whole[i], hits)[:k]
            else:
                found = [(float(hit["distance"]), int(hit["row"])) for hit in list(hits)[:k]]
            scores[i, : len(found)] = [score for score, _ in found]
            ids[i, : len(found)] = [row for _, row in found]
        return scores, ids

    def rows(self, ids: Sequence[int] | np.ndarray) -> sp.csr_matrix:
        """Stored sparse weights of rows `ids`, in that order (CSR, (len(ids), num_latents));
        `MilvusUnavailable` when one is not stored."""
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64)]
        found: dict[int, dict[int, float]] = {}
        unique = sorted(set(wanted))
        for start in range(0, len(unique), BATCH_ROWS):
            batch = unique[start : start + BATCH_ROWS]
            got = self._call(
                "get",
                lambda: self.client.get(
                    self.collection, ids=batch, output_fields=["sparse"], consistency_level=CONSISTENCY_LEVEL
                ),
            )
            found.update({int(entity["row"]): entity["sparse"] for entity in got})
        missing = [row for row in unique if row not in found]
        if missing:
            raise MilvusUnavailable(f"rows {missing[:5]} are not in the Milvus collection {self.collection!r}")
        indptr: list[int] = [0]
        indices: list[int] = []
        values: list[float] = []
        for row in wanted:
            entry = sorted((int(j), float(w)) for j, w in found[row].items() if int(j) < self.num_latents)
            indices.extend(j for j, _ in entry)
            values.extend(w for _, w in entry)
            indptr.append(len(indices))
        return sp.csr_matrix(
            (np.asarray(values, dtype=np.float32), np.asarray(indices, dtype=np.int32), np.asarray(indptr)),
            shape=(len(wanted), self.num_latents),
        )


def sparse_dict(matrix: sp.csr_matrix, i: int) -> dict[int, float]:
    """Row i of a CSR matrix as {column: value}, zeros left out."""
    lo, hi = matrix.indptr[i], matrix.indptr[i + 1]
    values = matrix.data[lo:hi]
    keep = values != 0
    return dict(zip(matrix.indices[lo:hi][keep].tolist(), values[keep].astype(np.float64).tolist()))


def strongest_latents(query: dict[int, float], count: int | None) -> dict[int, float]:
    """`query` kept to its `count` weights of largest magnitude (ties: the lower latent), in latent order;
    the whole of it where `count` is None or it holds no more."""
    if count is None or len(query) <= count:
        return query
    kept = sorted(query.items(), key=lambda item: (-abs(item[1]), item[0]))[:count]
    return dict(sorted(kept))


def rescore(query: dict[int, float], hits: Any) -> list[tuple[float, int]]:
    """(score, row) of Milvus `hits` (with their "row" and stored "sparse" weights) under the whole `query`,
    summed in float64 as Milvus sums, best first (ties: the lower row, as the segments rank them)."""
    found = []
    for hit in hits:
        weights = hit["sparse"]
        score = sum(weight * query.get(int(latent), 0.0) for latent, weight in weights.items())
        found.append((float(score), int(hit["row"])))
    found.sort(key=lambda pair: (-pair[0], pair[1]))
    return found


def fit_varchar(text: str) -> str:
    """`text` cut to `VARCHAR_BYTES` of UTF-8 (at a character boundary)."""
    encoded = text.encode("utf-8")
    return text if len(encoded) <= VARCHAR_BYTES else encoded[:VARCHAR_BYTES].decode("utf-8", errors="ignore")


# --- filling from an index's segments ---------------------------------------------------------------------
def view_records(view: Any, passages: Sequence[Passage], segments: Sequence[int]) -> Iterator[PassageRecords]:
    """The live passages of `segments` (positions in a `retriever.SegmentsView`) in batches: stored
    weights, and dense vectors as each segment's FAISS index decodes them (what the faiss mode scores)."""
    for s in segments:
        segment, dead, offset = view.segments[s], view.deleted[s], int(view.offsets[s])
        live = np.flatnonzero(~dead)
        for start in range(0, len(live), BATCH_ROWS):
            local = live[start : start + BATCH_ROWS]
            lo, hi = int(local[0]), int(local[-1]) + 1
            dense = segment.dense.index.reconstruct_n(lo, hi - lo)[local - lo]
            rows = local + offset
            yield PassageRecords(rows, segment.sparse.rows(local), dense, [passages[r] for r in rows.tolist()])


def fill(backend: MilvusBackend, view: Any, passages: Sequence[Passage], generation: int) -> None:
    """Make the collection anew with every live passage of `view`, flushed and marked with `generation`."""
    backend.create()
    for records in view_records(view, passages, range(len(view.segments))):
        backend.insert(records)
    backend.flush()
    backend.mark(generation)
