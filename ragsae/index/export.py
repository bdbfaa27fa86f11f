"""An index's stored passage weights written for other engines: JSONL sparse vectors and CIFF.

What is written is what the index stores and searches: each live passage's BM25 latent weights under the
SAE version's frozen reference statistics (`Retriever.document_weights`), read from the folder without
loading the LLM. Another engine then scores a passage as ragsae does with the query weights ragsae
computes (`Retriever.query_weights`: the query's latents, scaled to the live IDF, feedback included).

- JSONL, one line per live passage: `{"id": passage_id, "doc_id": ..., "vector": {"LATENT": weight}}`,
  latents as decimal strings, zero weights left out: what OpenSearch / Elasticsearch `rank_features`
  fields and Qdrant sparse vectors take.
- CIFF (the Common Index File Format, Lin et al. 2020, https://github.com/osirrc/ciff): length-delimited
  protobuf messages, a `Header`, one `PostingsList` per latent in use (term = the latent id as a decimal
  string, postings in passage order with gap-encoded docids) and one `DocRecord` per passage (docid =
  position among the live passages, collection docid = passage id, length = passage tokens). CIFF
  carries integer term frequencies: each weight is stored as `tf = max(1, round(weight * scale))`
  (`scale` 100 by default, written in the header's description), which engines such as PISA and
  Anserini read as a quantised impact score.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from ..errors import ConfigError, IndexFolderError
from ..retrieval.scoring import CorpusStatistics, bm25_document_weights
from ..storage import atomic_output
from ..text import Passage
from .folder import read_index_folder

EXPORT_FORMATS = ("jsonl", "ciff")
CIFF_SCALE = 100.0
"""Default factor from a stored weight to a CIFF term frequency."""
CIFF_VERSION = 1
CIFF_PACKAGE = "io.osirrc.ciff"


@dataclass(frozen=True)
class StoredPassages:
    """The live passages of an index in row order, with their stored weights (n, num_latents) and lengths."""

    passages: list[Passage]
    weights: sp.csr_matrix
    lengths: np.ndarray


def stored_passages(path: str | Path) -> StoredPassages:
    """The live passages of an index folder and their stored weights, every file checked (no LLM loaded)."""
    contents = read_index_folder(path)
    scoring = contents.config.scoring
    try:
        reference = CorpusStatistics.from_json(contents.sae.metadata.get("reference"), contents.sae.num_latents)
    except ValueError as error:
        raise IndexFolderError(f"{path}: SAE metadata 'reference': {error}") from None
    idf = reference.idf()
    passages: list[Passage] = []
    parts, lengths = [], []
    for segment in contents.segments:
        live = segment.live
        weights = bm25_document_weights(
            segment.codes, segment.lengths, idf, scoring.k1, scoring.b, reference.avg_length
        )
        parts.append(weights[live])
        lengths.append(segment.lengths[live])
        passages.extend(segment.passages[i] for i in live)
    weights = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, contents.sae.num_latents))
    weights.eliminate_zeros()
    weights.sort_indices()
    return StoredPassages(passages, weights.astype(np.float32), np.concatenate(lengths) if lengths else np.zeros(0))


# --- JSONL -----------------------------------------------------------------------------------------------
def jsonl_lines(stored: StoredPassages) -> Iterator[str]:
    """One JSON line per live passage: id, doc_id and {latent: weight} (float32 values written exactly)."""
    weights = stored.weights
    for i, passage in enumerate(stored.passages):
        lo, hi = weights.indptr[i], weights.indptr[i + 1]
        vector = {str(j): float(w) for j, w in zip(weights.indices[lo:hi].tolist(), weights.data[lo:hi].tolist())}
        yield json.dumps({"id": passage.passage_id, "doc_id": passage.doc_id, "vector": vector}) + "\n"


def write_jsonl(stored: StoredPassages, handle: IO[str]) -> int:
    """Write the JSONL export; the number of passages written."""
    count = 0
    for line in jsonl_lines(stored):
        handle.write(line)
        count += 1
    return count


# --- CIFF ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def ciff_messages() -> tuple[Any, Any, Any, Any]:
    """The CIFF protobuf message classes (Header, Posting, PostingsList, DocRecord), built from their
    definition in the CIFF repository's CommonIndexFileFormat.proto, with no generated code."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError as error:
        raise ImportError("CIFF export needs protobuf: pip install 'ragsae[ciff]'") from error
    field = descriptor_pb2.FieldDescriptorProto
    kinds = {
        "int32": field.TYPE_INT32,
        "int64": field.TYPE_INT64,
        "double": field.TYPE_DOUBLE,
        "string": field.TYPE_STRING,
    }
    messages = {
        "Header": [
            ("version", "int32"),
            ("num_postings_lists", "int32"),
            ("num_doc_records", "int32"),
            ("total_postings_lists", "int32"),
            ("total_docs", "int32"),
            ("total_terms_in_collection", "int64"),
            ("average_doclength", "double"),
            ("description", "string"),
        ],
        "Posting": [("docid", "int32"), ("tf", "int32")],
        "PostingsList": [("term", "string"), ("df", "int64"), ("cf", "int64"), ("postings", "Posting")],
        "DocRecord": [("docid", "int32"), ("collection_docid", "string"), ("doclength", "int32")],
    }
    proto = descriptor_pb2.FileDescriptorProto(name="ragsae_ciff.proto", package=CIFF_PACKAGE, syntax="proto3")
    for name, fields in messages.items():
        message = proto.message_type.add(name=name)
        for number, (field_name, kind) in enumerate(fields, 1):
            if kind in kinds:
                message.field.add(name=field_name, number=number, type=kinds[kind], label=field.LABEL_OPTIONAL)
            else:
                message.field.add(
                    name=field_name,
                    number=number,
                    type=field.TYPE_MESSAGE,
                    label=field.LABEL_REPEATED,
                    type_name=f".{CIFF_PACKAGE}.{kind}",
                )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    classes = [
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{CIFF_PACKAGE}.{name}")) for name in messages
    ]
    return classes[0], classes[1], classes[2], classes[3]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def write_delimited(handle: IO[bytes], message: Any) -> None:
    """One message preceded by its length as a varint (protobuf's writeDelimitedTo, which CIFF uses)."""
    data = message.SerializeToString()
    handle.write(_varint(len(data)))
    handle.write(data)


def quantise(weights: np.ndarray, scale: float) -> np.ndarray:
    """CIFF term frequencies of stored weights: round(weight * scale), at least 1 (int64)."""
    return np.maximum(1, np.rint(np.asarray(weights, dtype=np.float64) * scale)).astype(np.int64)


def write_ciff(stored: StoredPassages, handle: IO[bytes], scale: float = CIFF_SCALE) -> int:
    """Write the CIFF export; the number of postings lists written."""
    if not (np.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale must be a positive number, got {scale!r}")
    header_class, posting_class, postings_class, doc_class = ciff_messages()
    postings = stored.weights.tocsc()  # latent-major: docids ascending within each latent
    postings.sort_indices()
    terms = np.flatnonzero(np.diff(postings.indptr))
    tfs = quantise(postings.data, scale)
    if tfs.size and tfs.max() > np.iinfo(np.int32).max:
        raise ConfigError(f"scale {scale}: a weight of {postings.data.max():.3g} would not fit CIFF's int32 tf")
    lengths = np.rint(stored.lengths).astype(np.int64)
    header = header_class(
        version=CIFF_VERSION,
        num_postings_lists=len(terms),
        num_doc_records=len(stored.passages),
        total_postings_lists=len(terms),
        total_docs=len(stored.passages),
        total_terms_in_collection=int(lengths.sum()),
        average_doclength=float(lengths.mean()) if len(lengths) else 0.0,
        description=(
            f"ragsae export: SAE latents as terms, tf = max(1, round(weight * {scale:g})) of the stored BM25 "
            "latent weights; doclength = passage tokens"
        ),
    )
    write_delimited(handle, header)
    for term in terms.tolist():
        lo, hi = postings.indptr[term], postings.indptr[term + 1]
        docs = postings.indices[lo:hi].astype(np.int64)
        gaps = np.diff(docs, prepend=0)
        tf = tfs[lo:hi]
        message = postings_class(term=str(term), df=int(hi - lo), cf=int(tf.sum()))
        message.postings.extend(posting_class(docid=int(g), tf=int(t)) for g, t in zip(gaps.tolist(), tf.tolist()))
        write_delimited(handle, message)
    for docid, (passage, length) in enumerate(zip(stored.passages, lengths.tolist())):
        write_delimited(handle, doc_class(docid=docid, collection_docid=passage.passage_id, doclength=int(length)))
    return len(terms)


@dataclass(frozen=True)
class CiffIndex:
    """A CIFF file read back: its header, {term: [(docid, tf)]} with docids decoded from their gaps, and
    the doc records as (docid, collection docid, length)."""

    header: Any
    postings: dict[str, list[tuple[int, int]]]
    documents: list[tuple[int, str, int]]


def read_ciff(path: str | Path) -> CiffIndex:
    """Parse a CIFF file (`write_ciff`'s or another engine's); IndexFolderError when it is not one."""
    header_class, _, postings_class, doc_class = ciff_messages()
    data = Path(path).read_bytes()
    position = 0

    def message(cls: Any) -> Any:
        nonlocal position
        size, shift = 0, 0
        while True:
            if position >= len(data):
                raise IndexFolderError(f"{path}: ends inside a CIFF message (at byte {position})")
            byte = data[position]
            position += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if position + size > len(data):
            raise IndexFolderError(f"{path}: a CIFF message runs past the end of the file (at byte {position})")
        parsed = cls()
        parsed.ParseFromString(data[position : position + size])
        position += size
        return parsed

    header = message(header_class)
    postings: dict[str, list[tuple[int, int]]] = {}
    for _ in range(header.num_postings_lists):
        plist = message(postings_class)
        docid, entries = 0, []
        for posting in plist.postings:
            docid += posting.docid
            entries.append((docid, posting.tf))
        postings[plist.term] = entries
    documents = []
    for _ in range(header.num_doc_records):
        record = message(doc_class)
        documents.append((record.docid, record.collection_docid, record.doclength))
    if position != len(data):
        raise IndexFolderError(f"{path}: {len(data) - position} bytes follow the CIFF header's messages")
    return CiffIndex(header, postings, documents)


# --- the command ----------------------------------------------------------------------------------------
def export_index(
    path: str | Path, output: str | Path, format: str = "jsonl", scale: float = CIFF_SCALE
) -> dict[str, Any]:
    """Write the stored weights of an index folder's live passages to `output` (atomically) as JSONL or
    CIFF; a summary of what was written."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    stored = stored_passages(path)
    summary: dict[str, Any] = {"format": format, "output": str(output), "passages": len(stored.passages)}
    if format == "jsonl":
        with atomic_output(output, "w") as text:
            write_jsonl(stored, text)
    else:
        ciff_messages()  # the install hint before any file is opened
        with atomic_output(output, "wb") as binary:
            summary["postings_lists"] = write_ciff(stored, binary, scale)
        summary["scale"] = scale
    summary["nonzeros"] = int(stored.weights.nnz)
    return summary
