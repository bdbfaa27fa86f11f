"""SAE stage: sparse autoencoders over residual-stream activations, one module per architecture."""

from .base import SaeOutput, SparseAutoencoder, TopK, fvu
from .evaluate import evaluate_sae
from .gated import GatedSae
from .kl import KlSae, kl_sparsity
from .registry import ARCHITECTURES, create_sae, load_sae
from .relu import ReluSae
from .topk import TopKSae
from .train import TrainReport, optimiser_step, train_sae

__all__ = [
    "ARCHITECTURES",
    "GatedSae",
    "KlSae",
    "ReluSae",
    "SaeOutput",
    "SparseAutoencoder",
    "TopK",
    "TopKSae",
    "TrainReport",
    "create_sae",
    "evaluate_sae",
    "fvu",
    "kl_sparsity",
    "load_sae",
    "optimiser_step",
    "train_sae",
]
