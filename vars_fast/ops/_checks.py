"""Input checks for the fake kernels and the Triton ops, written with ``torch._check``.

They state the shape, dtype and device conditions that the C++/CUDA kernels check
(``csrc/common.h``), on values that may be fake or symbolic, as torchvision's
``_meta_registrations.py`` does: a call traced under fake tensors (``torch.compile``,
``opcheck``, ``FakeTensorMode``) with bad inputs then fails the way an eager call does,
instead of returning a plausible empty tensor. Values (indices in range, draws that fit)
are not checked here: fake tensors have none.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def same_shape(op: str, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Every tensor has the first one's shape."""
    ref = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        torch._check(t.dim() == ref.dim(),
                     lambda: f"vars_fast::{op}: {name} {_shape(t)} must have the shape of {names[0]} {_shape(ref)}")
        for a, b in zip(t.shape, ref.shape):
            torch._check(a == b,
                         lambda: f"vars_fast::{op}: {name} {_shape(t)} must have the shape of {names[0]} {_shape(ref)}")


def same_dtype(op: str, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    ref = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        torch._check(t.dtype == ref.dtype,
                     lambda: f"vars_fast::{op}: {name} dtype {t.dtype} must match {names[0]} dtype {ref.dtype}")


def same_device(op: str, ref: Tensor, *tensors: Optional[Tensor]) -> None:
    for t in tensors:
        if t is not None:
            torch._check(t.device == ref.device,
                         lambda: f"vars_fast::{op}: all tensors must be on one device, got {ref.device} and {t.device}")


def floating(op: str, name: str, t: Tensor) -> None:
    torch._check(t.dtype in FLOAT_DTYPES,
                 lambda: f"vars_fast::{op}: {name} must be float32/float64/float16/bfloat16, got {t.dtype}")


def ndim(op: str, name: str, t: Tensor, n: int, layout: str, at_least: bool = False) -> None:
    ok = t.dim() >= n if at_least else t.dim() == n
    torch._check(ok, lambda: f"vars_fast::{op}: {name} must be {layout}, got shape {_shape(t)}")


def vector(op: str, name: str, t: Tensor, length, dtype: Optional[torch.dtype] = None, integer: bool = False) -> None:
    """``t`` is 1-D of ``length`` elements (of ``dtype``, or of an integer dtype when ``integer``)."""
    torch._check(t.dim() == 1 and t.shape[0] == length,
                 lambda: f"vars_fast::{op}: {name} must be [{length}], got shape {_shape(t)}")
    if dtype is not None:
        torch._check(t.dtype == dtype, lambda: f"vars_fast::{op}: {name} must be {dtype}, got {t.dtype}")
    if integer:
        torch._check(not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool,
                     lambda: f"vars_fast::{op}: {name} must be an integer tensor, got {t.dtype}")


def one_of(op: str, name: str, value: str, allowed: Sequence[str]) -> None:
    torch._check(value in allowed, lambda: f"vars_fast::{op}: {name} must be one of {tuple(allowed)}, got {value!r}")
