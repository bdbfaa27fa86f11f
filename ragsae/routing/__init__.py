"""Routing stage: several indexes over one LLM searched as one (`Collections`), each query sent to the
indexes whose latent signature it matches, or to none; and user profiles over an index's latents that
re-weight queries (`Profile`)."""

from .collections import ROUTES, Collections, Routed, RoutedHit, check_route, choose, routing_score
from .profile import Profile, sae_fingerprint
from .signature import Signature, compute_signature, signature, spherical_kmeans, unit_passages

__all__ = [
    "ROUTES",
    "Collections",
    "Profile",
    "Routed",
    "RoutedHit",
    "Signature",
    "check_route",
    "choose",
    "compute_signature",
    "routing_score",
    "sae_fingerprint",
    "signature",
    "spherical_kmeans",
    "unit_passages",
]
