"""Dense search with FAISS (GPU FAISS where installed and a GPU is there): decoder-space passage vectors."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...layout import FAISS_FILE
from .base import Backend

logger = logging.getLogger(__name__)


def import_faiss() -> Any:
    """The faiss module, with an install hint where it is missing."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("dense search needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12 with CUDA 12)") from error
    return faiss


class FaissBackend(Backend):
    """Inner-product FAISS index over dense vectors, searched on the GPU when faiss-gpu and CUDA are
    there. `index` is the CPU index (what is saved); `searched` is what answers queries."""

    def __init__(self, index: Any, use_gpu: bool = True):
        self.index = index
        self.searched = to_gpu_if_available(index) if use_gpu else index

    @classmethod
    def build(cls, vectors: np.ndarray, use_gpu: bool = True, quantized: bool = False) -> FaissBackend:
        """Exact float32 inner products, or with `quantized` 8-bit scalar quantisation (a quarter of
        the bytes; its value range is trained on `vectors`)."""
        faiss = import_faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if quantized:
            quantizer = faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexScalarQuantizer(vectors.shape[1], quantizer, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        else:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index, use_gpu)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index.add(vectors)
        if self.searched is not self.index:  # a GPU copy: placed again with the new rows
            self.searched = to_gpu_if_available(self.index)

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored vectors as FAISS reconstructs them (8-bit rounded for a quantised index)."""
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.index.d))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def on_gpu(self) -> bool:
        return self.searched is not self.index

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.searched.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return scores, ids.astype(np.int64)

    def save(self, folder: Path) -> list[str]:
        """Write the CPU index as `faiss.index` (a GPU copy is never saved)."""
        import_faiss().write_index(self.index, str(Path(folder) / FAISS_FILE))
        return [FAISS_FILE]

    @classmethod
    def load(cls, folder: Path, **options: Any) -> FaissBackend:
        """The index `save` wrote; `use_gpu=False` keeps it on the CPU."""
        return cls(import_faiss().read_index(str(Path(folder) / FAISS_FILE)), options.get("use_gpu", True))


_gpu_resources: Any = None
_gpu_lock = threading.Lock()


def shared_gpu_resources() -> Any:
    """One `StandardGpuResources` per process: each reserves scratch memory on the GPU."""
    global _gpu_resources
    with _gpu_lock:
        if _gpu_resources is None:
            _gpu_resources = import_faiss().StandardGpuResources()
        return _gpu_resources


def to_gpu_if_available(index: Any, block: int = 1 << 20) -> Any:
    """`index` copied to GPU 0 when this FAISS build has GPU support and sees a GPU, else `index`.

    FAISS has no GPU version of the flat 8-bit scalar quantiser that ragsae saves: its vectors are
    decoded (`block` at a time) into a float16 scalar-quantised index, which FAISS serves from a
    float16 flat GPU index. Scores then differ from the CPU's by float16 rounding of the decoded values.
    """
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    source = index
    if isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype != faiss.ScalarQuantizer.QT_fp16:
        source = faiss.IndexScalarQuantizer(index.d, faiss.ScalarQuantizer.QT_fp16, index.metric_type)
        for start in range(0, index.ntotal, block):
            source.add(index.reconstruct_n(start, min(block, index.ntotal - start)))
    try:
        return faiss.index_cpu_to_gpu(shared_gpu_resources(), 0, source)
    except RuntimeError as error:  # an index type this FAISS build cannot place on the GPU
        logger.warning("FAISS GPU transfer failed (%s); searching on the CPU", error)
        return index
