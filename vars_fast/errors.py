"""Errors a user can fix: importable from anywhere in the package without an import cycle."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key, value or path."""
