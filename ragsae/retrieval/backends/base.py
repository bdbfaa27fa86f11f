"""The interface every store of passage vectors implements, so that `Retriever` and `Index` need not
know which engine answers: the in-memory CSR scorer, FAISS, or a server-side engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class Backend(ABC):
    """Passage vectors, row i for passage i, searched by inner product.

    `vectors` are what the backend stores: sparse latent weights (CSR, (n, num_latents)) for a sparse
    backend, dense decoder-space vectors ((n, d_model) float32) for a dense one. Searches return
    `(scores, ids)` arrays of shape (nq, k), ids padded with -1 where fewer than k rows exist.
    """

    @abstractmethod
    def add(self, vectors: Any) -> None:
        """Append `vectors` as the next rows."""

    @abstractmethod
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best `k` rows per query by inner product, as (scores, ids) of shape (nq, k)."""

    @abstractmethod
    def rows(self, ids: Sequence[int] | np.ndarray) -> Any:
        """The stored vectors of rows `ids`, in that order."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of rows stored."""

    def save(self, folder: Path) -> list[str]:
        """Write the backend's files into `folder`; returns their names (none for a backend rebuilt from
        the index's codes at load, which has no files of its own)."""
        return []

    @classmethod
    def load(cls, folder: Path, **options: Any) -> Backend:
        """A backend from the files `save` wrote into `folder`."""
        raise NotImplementedError(f"{cls.__name__} is rebuilt from the index's codes, not loaded")
