"""Errors a user can fix: importable from anywhere in the package without an import cycle."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key, value or path."""


class DeprecatedKeyWarning(FutureWarning):
    """A config key under its old name: it still works for one release (the message names the
    new key). A FutureWarning, so that it shows by default: it is meant for the user."""
