"""Architecture name -> class, for building an SAE from its config and loading a saved folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import SAE_ARCHITECTURES, SaeConfig, from_dict
from ..errors import RagsaeError, SaeLoadError
from ..layout import SAE_CONFIG_FILE, SAE_READABLE_VERSIONS, SAE_WEIGHTS_FILE
from ..storage import file_sha256, read_versioned_json
from .base import SparseAutoencoder
from .gated import GatedSae
from .kl import KlSae
from .relu import ReluSae
from .topk import TopKSae

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (TopKSae, ReluSae, KlSae, GatedSae)
}
assert tuple(ARCHITECTURES) == SAE_ARCHITECTURES, "every configurable architecture has a class"


def create_sae(config: SaeConfig, d_model: int) -> SparseAutoencoder:
    """A freshly initialised SAE of `config.architecture` for `d_model`-wide activations."""
    return ARCHITECTURES[config.architecture](config, d_model)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load and validate a folder written by `SparseAutoencoder.save` (format version, architecture,
    shapes, checksum), in eval mode on `device`."""
    path = Path(path)
    weights_path = path / SAE_WEIGHTS_FILE
    header = read_versioned_json(
        path / SAE_CONFIG_FILE, SAE_READABLE_VERSIONS, SaeLoadError, "an SAE folder", checksummed_from=2
    )
    if not weights_path.is_file():
        raise SaeLoadError(f"{weights_path}: missing")
    digest = file_sha256(weights_path)
    if header.get("weights_sha256") != digest:
        raise SaeLoadError(f"{weights_path}: checksum mismatch (file changed or truncated)")
    try:
        config = from_dict(SaeConfig, header["config"])
        d_model = int(header["d_model"])
        if d_model < 1:
            raise ValueError(f"d_model {d_model}")
    except (KeyError, TypeError, ValueError, RagsaeError) as error:
        raise SaeLoadError(f"{path / SAE_CONFIG_FILE}: bad field ({error})") from None
    if header.get("architecture", config.architecture) != config.architecture:
        raise SaeLoadError(
            f"{path / SAE_CONFIG_FILE}: architecture {header['architecture']!r} disagrees with its config"
        )
    sae = create_sae(config, d_model)
    tensors = load_file(str(weights_path))
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != got:
        raise SaeLoadError(f"{weights_path}: tensor shapes {got} do not match config {expected}")
    sae.load_state_dict(tensors)
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise SaeLoadError(f"{path / SAE_CONFIG_FILE}: field 'metadata' must be an object")
    sae.metadata = metadata
    sae.weights_sha256 = digest
    return sae.to(device).eval()
