"""What a search returns for one passage."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hit:
    """One retrieved passage."""

    passage_id: str
    doc_id: str
    score: float
    rank: int
    text: str = ""
    latents: list[tuple[int, float]] = field(default_factory=list)
    """(latent, contribution) pairs that added most to the score, strongest first."""
    labels: list[str] = field(default_factory=list)
    """A short label of each of `latents` (its characteristic tokens; `latents/`), where the index has
    a latent catalog; empty otherwise."""
