"""Sweeps: NAME=V1,V2 settings over config fields, crossed into one result row per combination."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from ..config import BuildConfig, optional_int
from ..errors import ConfigError

SWEEP_KEYS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "layer": ("capture", "layer", int),
    "window": ("capture", "window", int),
    "k": ("sae", "k", int),
    "latents": ("sae", "num_latents", int),
    "architecture": ("sae", "architecture", str),
    "epochs": ("sae", "epochs", int),
    "auxk": ("sae", "auxk_coef", float),
    "ortho": ("sae", "ortho_coef", float),
    "seed": ("sae", "seed", int),
    "pooling": ("scoring", "pooling", str),
    "prefix": ("capture", "query_prefix", str),
    "passage_prefix": ("capture", "passage_prefix", str),
    "max_latents": ("scoring", "max_latents", optional_int),
    "feedback": ("scoring", "feedback_passages", int),
    "k1": ("scoring", "k1", float),
    "b": ("scoring", "b", float),
}
"""Sweep names -> (config stage, field, parser of one value)."""


def parse_sweep(items: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """['layer=4,8', 'k=16,32'] -> the cartesian product as [{'layer': 4, 'k': 16}, ...]."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in SWEEP_KEYS or not values:
            raise ConfigError(f"sweep item {item!r}: expected NAME=V1,V2 with NAME in {', '.join(SWEEP_KEYS)}")
        cast = SWEEP_KEYS[name][2]
        try:
            axes[name] = [cast(v) for v in values.split(",")]
        except ValueError:
            raise ConfigError(f"sweep item {item!r}: values must be {getattr(cast, '__name__', cast)}") from None
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def sweep_stem(collection: str, sweep: tuple[str, ...] | list[str]) -> str:
    """Result file stem: `msmarco-5k`, or `msmarco-5k-sweep-layer-k` for a sweep over layer and k."""
    return collection + "".join(["-sweep", *(f"-{item.partition('=')[0]}" for item in sweep)] if sweep else [])


def apply_setting(build: BuildConfig, setting: dict[str, Any]) -> BuildConfig:
    """`build` with sweep values replaced (each config re-validated)."""
    changes: dict[str, dict[str, Any]] = {}
    for name, value in setting.items():
        stage, key, _ = SWEEP_KEYS[name]
        changes.setdefault(stage, {})[key] = value
    return dataclasses.replace(
        build, **{stage: dataclasses.replace(getattr(build, stage), **values) for stage, values in changes.items()}
    )
