"""Latent stage: what each SAE latent means on an index's corpus (frequencies, top contexts,
characteristic and logit-lens tokens, a label), why a passage matched a query in those terms, and a
self-contained HTML atlas of the latents."""

from .atlas import atlas_html, write_atlas
from .catalog import (
    LATENTS_FILE,
    LATENTS_FORMAT_VERSION,
    CharacteristicToken,
    LatentCard,
    LatentCatalog,
    LatentContext,
    clean_token,
)
from .describe import DescribeSettings, LatentStatistics, catalog_of, describe_latents, passage_tokens
from .explain import Explanation, SharedLatent, TokenFiring, explain_match, explain_query

__all__ = [
    "LATENTS_FILE",
    "LATENTS_FORMAT_VERSION",
    "CharacteristicToken",
    "DescribeSettings",
    "Explanation",
    "LatentCard",
    "LatentCatalog",
    "LatentContext",
    "LatentStatistics",
    "SharedLatent",
    "TokenFiring",
    "atlas_html",
    "catalog_of",
    "clean_token",
    "describe_latents",
    "explain_match",
    "explain_query",
    "passage_tokens",
    "write_atlas",
]
