"""Stores of passage vectors behind one interface: exact CSR scoring (the reference) and FAISS."""

from .base import Backend
from .csr import CsrBackend
from .faiss import FaissBackend, to_gpu_if_available

__all__ = ["Backend", "CsrBackend", "FaissBackend", "to_gpu_if_available"]
