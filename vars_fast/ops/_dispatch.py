"""The one place that chooses a backend for a custom op.

Order (DESIGN.md "Custom ops"):

1. an explicit choice: the ``backend=`` argument, else the env var ``VARS_FAST_BACKEND``;
2. ``"triton"`` when every tensor is on CUDA (or ``TRITON_INTERPRET=1``, which runs Triton
   kernels on CPU tensors for tests) and the op has a Triton kernel;
3. ``"ext"``: the compiled extension ``vars_fast._C``; the torch dispatcher then picks its
   CPU or CUDA kernel from the tensors' device;
4. ``"reference"``: the pure-PyTorch spec, always available.

A forced backend that cannot serve raises :class:`BackendUnavailable`, whose message lists
why every backend was refused (xformers style), e.g.::

    vars_fast::pgd_step: backend 'triton' (from VARS_FAST_BACKEND) cannot serve these inputs.
      triton: tensors are on cpu (Triton needs CUDA tensors, or TRITON_INTERPRET=1)
      ext: OK
      reference: OK

Usage in an op module::

    from vars_fast.ops import _dispatch
    b = _dispatch.choose("pgd_step", (x, g), backend,
                         triton_ok=True, ext_ok=None if x.is_contiguous() else "x is not contiguous")
    if b == "triton": ...
    elif b == "ext": torch.ops.vars_fast.pgd_step(...)
    else: reference(...)

``triton_ok`` / ``ext_ok`` carry op-specific conditions: ``True``/``None`` = fine, ``False`` =
"no kernel for this op", a string = the refusal reason. Generic conditions (Triton importable,
extension loaded, a kernel registered for the device key) are checked here.

Aliases accepted for a forced backend: ``cpp``/``cuda``/``c++`` -> ``ext``; ``torch``/``eager``/
``ref`` -> ``reference``; ``auto``/empty -> no forcing. ``BACKENDS`` (the registry behind
``run.backend``) holds the backends and the aliases, each mapped to the backend it means.

The choice is pure Python on static facts (device, dtype, env), so under ``torch.compile``
Dynamo evaluates it at trace time and the graph holds just the chosen op: no graph break.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Iterable, Union

import torch
from torch import Tensor

from vars_fast import _ext
from vars_fast.registry import BACKENDS

ORDER = ("triton", "ext", "reference")  # the backends, in the order ``choose`` tries them
ENV = "VARS_FAST_BACKEND"
for _b in ORDER:
    BACKENDS.register(_b, _b)
for _alias, _b in {"cpp": "ext", "c++": "ext", "cuda": "ext", "extension": "ext", "torch": "reference",
                   "eager": "reference", "ref": "reference", "auto": ""}.items():
    BACKENDS.register(_alias, _b, alias=True)  # "": automatic
# a plain dict for the hot path: ``choose`` runs at torch.compile trace time
_CANONICAL: dict[str, str | None] = {n: (b or None) for n, b in BACKENDS.items()}

Ok = Union[bool, str, None]


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve a call; the message lists every backend's refusal reason."""


def normalize(backend: str | None) -> str | None:
    """Map a user spelling to one of ORDER (or None = automatic). Unknown names raise ValueError."""
    if backend is None:
        return None
    key = backend.strip().lower()
    if key in _CANONICAL or not key:
        return _CANONICAL.get(key)
    raise ValueError(f"unknown backend {backend!r} (from backend= or {ENV}); "
                     f"expected one of {ORDER} or aliases {sorted(k for k in _CANONICAL if k not in ORDER)}")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the (slow) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


@functools.lru_cache(maxsize=None)
def triton_module(op: str):
    """Import ``vars_fast.ops.triton.<op>`` once (it registers ``vars_fast::<op>_triton*``).

    Returns (module, None) or (None, reason)."""
    err = _triton_import_error()
    if err:
        return None, err
    try:
        return importlib.import_module(f"vars_fast.ops.triton.{op}"), None
    except ModuleNotFoundError as e:
        if e.name == f"vars_fast.ops.triton.{op}":
            return None, f"no Triton kernel for {op}"
        return None, f"vars_fast.ops.triton.{op} failed to import ({e})"
    except Exception as e:
        return None, f"vars_fast.ops.triton.{op} failed to import ({type(e).__name__}: {e})"


# The static facts below (what is installed and registered) are evaluated once and, under
# torch.compile, at trace time as constants (assume_constant_result): tracing into importlib or
# torch._C queries would otherwise break the graph.
@torch.compiler.assume_constant_result
def _triton_error(op: str) -> str | None:
    return triton_module(op)[1]


def _dispatch_key(device_type: str) -> str:
    return {"cpu": "CPU", "cuda": "CUDA"}.get(device_type, device_type.upper())


@torch.compiler.assume_constant_result
def _ext_kernel_error(op: str, device_type: str) -> str | None:
    key = (op, device_type)
    if key not in _EXT_CACHE:
        _EXT_CACHE[key] = _ext_kernel_error_uncached(op, device_type)
    return _EXT_CACHE[key]


_EXT_CACHE: dict[tuple[str, str], str | None] = {}


def _ext_kernel_error_uncached(op: str, device_type: str) -> str | None:
    if not _ext.has_ops():
        return f"the compiled extension is not loaded ({_ext.load_error()})"
    qual = f"vars_fast::{op}"
    if not hasattr(torch.ops.vars_fast, op):
        return f"{qual} is not in the compiled extension (stale build? rebuild it)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qual, _dispatch_key(device_type)):
        return f"{qual} has no {_dispatch_key(device_type)} kernel in this build"
    return None


def _as_reason(ok: Ok, what: str) -> str | None:
    if ok is True or ok is None:
        return None
    if ok is False:
        return f"no {what} kernel for this op"
    return str(ok)


def reasons(op: str, tensors: Iterable[Tensor], *, triton_ok: Ok = True, ext_ok: Ok = True) -> dict[str, str | None]:
    """{backend: None if it can serve, else why not} for these inputs."""
    ts = [t for t in tensors if isinstance(t, Tensor)]
    devices = {t.device.type for t in ts}
    out: dict[str, str | None] = {}

    # Triton: an op kernel, CUDA tensors (or the interpreter), an importable Triton.
    why = _as_reason(triton_ok, "Triton")
    if why is None:
        if len(devices) > 1:
            why = f"tensors are on several devices {sorted(devices)}"
        elif devices != {"cuda"} and not triton_interpret():
            why = f"tensors are on {'/'.join(sorted(devices)) or 'no device'} (Triton needs CUDA tensors, or TRITON_INTERPRET=1)"
        else:
            why = _triton_error(op)
    out["triton"] = why

    # Extension: loaded and holding a kernel for the device key.
    why = _as_reason(ext_ok, "compiled")
    if why is None:
        if len(devices) != 1:
            why = f"tensors are on several devices {sorted(devices)}" if devices else "no tensor inputs"
        else:
            why = _ext_kernel_error(op, next(iter(devices)))
    out["ext"] = why
    out["reference"] = None
    return out


def requested(backend: str | None = None) -> tuple[str | None, str]:
    """The forced backend (or None) and where it came from."""
    if backend is not None:
        return normalize(backend), "backend= argument"
    env = os.environ.get(ENV)
    if env:
        return normalize(env), ENV
    return None, "automatic"


def choose(op: str, tensors: Iterable[Tensor], backend: str | None = None, *,
           triton_ok: Ok = True, ext_ok: Ok = True) -> str:
    """Pick "triton" | "ext" | "reference" for ``vars_fast::<op>`` on these tensors.

    ``backend`` (or env VARS_FAST_BACKEND) forces one; if it cannot serve, BackendUnavailable
    lists the reason for every backend. Without forcing, the first backend that can serve in
    ORDER wins.
    """
    want, source = requested(backend)
    why = reasons(op, tensors, triton_ok=triton_ok, ext_ok=ext_ok)
    if want is not None:
        if why[want] is None:
            return want
        lines = "\n".join(f"  {b}: {why[b] or 'OK'}" for b in ORDER)
        raise BackendUnavailable(f"vars_fast::{op}: backend {want!r} (from {source}) cannot serve these inputs.\n{lines}")
    for b in ORDER:
        if why[b] is None:
            return b
    raise AssertionError("unreachable: the reference always serves")


def available(op: str, device: str | torch.device = "cpu", **kw) -> list[str]:
    """Backends that could serve ``op`` for tensors on ``device`` (for benchmarks and tests)."""
    t = torch.empty(0, device=device)
    return [b for b, r in reasons(op, [t], **kw).items() if r is None]
