"""The backend dispatcher: order, forcing (argument and env), aliases, refusal messages."""
from __future__ import annotations

import pytest
import torch

from vars_fast.ops import _dispatch
from vars_fast.ops.pgd_step import pgd_step


def test_normalize_aliases_and_unknown():
    assert _dispatch.normalize("CPP") == "ext" and _dispatch.normalize("cuda") == "ext"
    assert _dispatch.normalize("eager") == "reference" and _dispatch.normalize("auto") is None
    assert _dispatch.normalize(None) is None and _dispatch.normalize("triton") == "triton"
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        _dispatch.normalize("fortran")


def test_auto_order_on_cpu(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = torch.zeros(2, 3)
    why = _dispatch.reasons("pgd_step", [t])
    assert "CUDA" in why["triton"] and why["reference"] is None
    want = "ext" if why["ext"] is None else "reference"
    assert _dispatch.choose("pgd_step", [t]) == want
    # an op-specific refusal of every kernel leaves the reference
    assert _dispatch.choose("pgd_step", [t], triton_ok="nope", ext_ok="nope") == "reference"


def test_forced_backend_refusal_lists_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = torch.zeros(2, 3)
    with pytest.raises(_dispatch.BackendUnavailable) as e:
        _dispatch.choose("pgd_step", [t], "ext", ext_ok="inputs are odd")
    msg = str(e.value)
    assert "vars_fast::pgd_step" in msg and "backend= argument" in msg
    assert "triton:" in msg and "ext: inputs are odd" in msg and "reference: OK" in msg


def test_env_forcing(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV, "reference")
    assert _dispatch.choose("pgd_step", [torch.zeros(1)]) == "reference"
    monkeypatch.setenv(_dispatch.ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(_dispatch.BackendUnavailable, match=_dispatch.ENV):
        pgd_step(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.1, 0.2)
    # the argument wins over the env
    y = pgd_step(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.1, 0.2, backend="reference")
    torch.testing.assert_close(y, torch.full((1, 2), 0.1))


def test_unknown_op_has_no_kernels():
    why = _dispatch.reasons("no_such_op", [torch.zeros(1)], triton_ok=True)
    assert why["ext"] is not None and why["reference"] is None
    assert _dispatch.choose("no_such_op", [torch.zeros(1)]) == "reference"


def test_mixed_devices_refused():
    why = _dispatch.reasons("pgd_step", [torch.zeros(1), torch.zeros(1, device="meta")])
    assert "several devices" in why["ext"] and "several devices" in why["triton"]

