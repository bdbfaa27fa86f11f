"""Errors a user can cause. Each message names the file, line, field or argument at fault.

The CLI prints a `RagsaeError` in one line and exits 2; anything else is a programming error and
keeps its traceback. Each class also derives from `ValueError` (or `FileNotFoundError`), so code
that caught those before still does.
"""

from __future__ import annotations


class RagsaeError(Exception):
    """Base of every error caused by input: corpus, configuration, index folder, SAE folder, model, query."""


class ConfigError(RagsaeError, ValueError):
    """A configuration field or command-line argument out of its range or set of values."""


class CorpusError(RagsaeError, ValueError):
    """Bad corpus or benchmark input; the message names the file, line or field."""


class IndexFolderError(RagsaeError, ValueError):
    """An index folder that cannot be written or read as asked; the message names the file or field."""


class SaeLoadError(RagsaeError, ValueError):
    """A saved SAE folder that cannot be loaded, or an SAE that does not fit the LLM or layer asked for."""


class ModelError(RagsaeError, ValueError):
    """An LLM that cannot be found or loaded, a layer it does not have, a device that is not there."""


class QueryError(RagsaeError, ValueError):
    """A query or question that cannot be searched (empty, not text), or search arguments out of range."""


class TrainingError(RagsaeError, ValueError):
    """Training data an SAE cannot be trained on (too few tokens for one batch)."""
