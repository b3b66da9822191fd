"""Loads the compiled extension ``vars_fast._C`` once.

A missing extension is not an error: every op has a pure-PyTorch reference, and the
package degrades to it with one warning.
"""
from __future__ import annotations

import os
import warnings

_loaded: bool | None = None
_error: str | None = None


def _load() -> bool:
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if os.environ.get("VARS_FAST_NO_EXT") == "1":
        _loaded, _error = False, "disabled by VARS_FAST_NO_EXT=1"
        return False
    try:
        import torch  # noqa: F401  (the extension links against libtorch)
        # optional: the compiled extension may be missing (then the reference ops serve)
        from vars_fast import _C  # noqa: F401  (registers the vars_fast:: ops)
        _loaded = True
    except (ImportError, OSError) as e:
        _loaded, _error = False, f"{type(e).__name__}: {e}"
        warnings.warn(f"vars_fast._C is not available ({_error}); using the pure-PyTorch reference ops",
                      RuntimeWarning, stacklevel=3)
    return _loaded


def has_ops() -> bool:
    """True when the compiled extension is loaded (its CPU, and maybe CUDA, kernels are registered)."""
    return _load()


def load_error() -> str | None:
    _load()
    return _error
