"""pgd_step: every backend available here against the reference (the spec).

Tolerances: fp32/fp64 bit-exact (all backends do the same fp32 ops in the same order);
fp16/bf16 within one ulp of the dtype at 1.0 (atol = finfo.eps, rtol = 0): the Triton
interpreter rounds fp32 -> bf16 differently from ATen's round-to-nearest-even.
"""
from __future__ import annotations

import importlib
import os
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vars_fast.ops import _dispatch
from vars_fast.ops.pgd_step import pgd_random_start, pgd_step, pgd_step_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(5, 3, 37, 41), (1, 3, 8, 8), (3, 7)]
HAS_EXT = "ext" in _dispatch.available("pgd_step")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled extension without pgd_step")


def _tol(dtype):
    return dict(atol=0.0, rtol=0.0) if dtype in (torch.float32, torch.float64) else dict(atol=torch.finfo(dtype).eps, rtol=0.0)


def _inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g)
    x = (x0 + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad.view(-1)[::7] = 0.0  # sign(0) = 0 must be honoured
    return [t.to(device=device, dtype=dtype) for t in (x, x0, grad)]


def _alpha_eps(kind, batch, device="cpu"):
    if kind == "scalar":
        return 2 / 255, 8 / 255
    if kind == "0d":
        return torch.tensor(2 / 255), torch.tensor(8 / 255)
    g = torch.Generator().manual_seed(1)
    return (torch.rand(batch, generator=g) * 0.02).to(device), (torch.rand(batch, generator=g) * 0.05).to(device)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["scalar", "0d", "per_sample"])
@pytest.mark.parametrize("inplace", [False, True])
def test_ext_matches_reference(dtype, shape, kind, inplace):
    x, x0, g = _inputs(shape, dtype)
    a, e = _alpha_eps(kind, shape[0])
    want = pgd_step_reference(x, x0, g, a, e)
    xi = x.clone()
    got = pgd_step(xi, x0, g, a, e, inplace=inplace, backend="ext")
    torch.testing.assert_close(got, want, **_tol(dtype))
    if inplace:
        assert got is xi
    else:
        torch.testing.assert_close(xi, x, atol=0, rtol=0)  # input untouched


def test_invariants_and_no_grad():
    x, x0, g = _inputs((4, 3, 9, 9), torch.float32)
    x.requires_grad_(True)
    y = pgd_step(x, x0, g, 0.5, 0.03)  # a huge step: projection must bound it
    assert not y.requires_grad
    assert ((y - x0).abs() <= 0.03 + 1e-7).all() and (y >= 0).all() and (y <= 1).all()


def test_random_start_in_ball():
    x0 = torch.rand(4, 3, 5, 5)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.1])
    r = pgd_random_start(x0, eps, torch.Generator().manual_seed(0))
    assert ((r - x0).abs() <= eps.view(-1, 1, 1, 1) + 1e-7).all() and r.min() >= 0 and r.max() <= 1
    assert torch.equal(r[0], x0[0])


@needs_ext
def test_non_contiguous():
    x, x0, g = _inputs((4, 3, 9, 9), torch.float32)
    xt, x0t, gt = (t.transpose(2, 3) for t in (x, x0, g))
    want = pgd_step_reference(xt, x0t, gt, 0.01, 0.03)
    torch.testing.assert_close(pgd_step(xt, x0t, gt, 0.01, 0.03, backend="ext"), want, atol=0, rtol=0)
    # In place on a non-contiguous x_adv: the kernels refuse, auto falls back to the reference...
    xc = xt.clone().transpose(2, 3).contiguous().transpose(2, 3)
    assert not xc.is_contiguous()
    pgd_step(xc, x0t, gt, 0.01, 0.03, inplace=True)
    torch.testing.assert_close(xc, want, atol=0, rtol=0)
    # ...and a forced kernel backend says why.
    with pytest.raises(_dispatch.BackendUnavailable, match="contiguous x_adv"):
        pgd_step(xc, x0t, gt, 0.01, 0.03, inplace=True, backend="cpp")


@needs_ext
def test_opcheck():
    x, x0, g = _inputs((3, 2, 5, 7), torch.float32)
    a = torch.rand(3) * 0.01
    torch.library.opcheck(torch.ops.vars_fast.pgd_step.default, (x, x0, g, a, None, 0.0, 0.03))
    torch.library.opcheck(torch.ops.vars_fast.pgd_step_.default, (x.clone(), x0, g, None, None, 0.01, 0.03))


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_compile_fullgraph(backend):
    if backend not in _dispatch.available("pgd_step"):
        pytest.skip(f"{backend} unavailable")
    x, x0, g = _inputs((2, 3, 6, 5), torch.float32)
    alpha = torch.tensor([0.01, 0.02])

    def attack_step(xa, xo, gr):
        pgd_step(xa, xo, gr, alpha, 0.03, inplace=True, backend=backend)
        return pgd_step(xa, xo, gr, 0.01, 0.03, backend=backend)

    torch._dynamo.reset()
    f = torch.compile(attack_step, fullgraph=True, backend="aot_eager")
    xa = x.clone()
    got = f(xa, x0, g)
    want1 = pgd_step_reference(x, x0, g, alpha, 0.03)
    torch.testing.assert_close(xa, want1, atol=0, rtol=0)
    torch.testing.assert_close(got, pgd_step_reference(want1, x0, g, 0.01, 0.03), atol=0, rtol=0)


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from vars_fast.ops.pgd_step import pgd_step, pgd_step_reference
    from vars_fast.ops import _dispatch
    assert _dispatch.choose("pgd_step", [torch.zeros(1)], "triton") == "triton"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tol = dict(atol=0.0, rtol=0.0) if dtype == torch.float32 else dict(atol=torch.finfo(dtype).eps, rtol=0.0)
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(3, 3, 7, 9, generator=g)
        x = (x0 + 0.05 * torch.randn(x0.shape, generator=g)).clamp(0, 1).to(dtype)
        x0, grad = x0.to(dtype), torch.randn(x0.shape, generator=g).to(dtype)
        for a, e in ((0.01, 0.03), (torch.rand(3, generator=g) * 0.02, torch.rand(3, generator=g) * 0.05)):
            want = pgd_step_reference(x, x0, grad, a, e)
            torch.testing.assert_close(pgd_step(x, x0, grad, a, e, backend="triton"), want, **tol)
            xi = x.clone()
            pgd_step(xi, x0, grad, a, e, inplace=True, backend="triton")
            torch.testing.assert_close(xi, want, **tol)
    print("OK")
""")


def test_triton_interpreter(run_triton_interpreted):
    """Triton kernels on CPU under TRITON_INTERPRET=1 (correctness only)."""
    run_triton_interpreted(_TRITON_SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_reference(backend, dtype):
    if backend not in _dispatch.available("pgd_step", "cuda"):
        pytest.skip(f"{backend} unavailable on CUDA: {_dispatch.reasons('pgd_step', [torch.empty(0, device='cuda')])}")
    for shape in ((5, 3, 37, 41), (32, 3, 224, 224), (3, 7)):
        x, x0, g = _inputs(shape, dtype, "cuda")
        a, e = _alpha_eps("per_sample", shape[0], "cuda")
        want = pgd_step_reference(x, x0, g, a, e)
        torch.testing.assert_close(pgd_step(x, x0, g, a, e, backend=backend), want, **_tol(dtype))
        xi = x.clone()
        pgd_step(xi, x0, g, 0.01, 0.03, inplace=True, backend=backend)
        torch.testing.assert_close(xi, pgd_step_reference(x, x0, g, 0.01, 0.03), **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_gpu_compile_fullgraph(backend):
    if backend not in _dispatch.available("pgd_step", "cuda"):
        pytest.skip(f"{backend} unavailable on CUDA")
    x, x0, g = _inputs((4, 3, 16, 16), torch.float32, "cuda")

    def step(xa):
        pgd_step(xa, x0, g, 0.01, 0.03, inplace=True, backend=backend)
        return xa

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x.clone())
    torch.testing.assert_close(got, pgd_step_reference(x, x0, g, 0.01, 0.03), atol=0, rtol=0)


# ---- fake kernels: the schema conditions hold under fake tensors too -----------------------

def _op(backend: str, inplace: bool = False):
    """The extension's or the Triton op (skips when that backend is missing here)."""
    if backend == "triton":
        pytest.importorskip("triton")
        importlib.import_module("vars_fast.ops.triton.pgd_step")
    elif not HAS_EXT:
        pytest.skip("compiled extension without pgd_step")
    name = "pgd_step" + ("_triton" if backend == "triton" else "") + ("_" if inplace else "")
    return getattr(torch.ops.vars_fast, name)


_BAD = {  # what is wrong: (x_orig shape, grad dtype, x dtype, device of grad, alpha_t shape, error)
    "shape": ((2, 3, 4, 5), torch.float32, torch.float32, "cpu", None, "x_orig .* must have the shape of x_adv"),
    "dtype": ((2, 3, 4, 4), torch.float64, torch.float32, "cpu", None, "grad dtype torch.float64 must match"),
    "int": ((2, 3, 4, 4), torch.int32, torch.int32, "cpu", None, "must be float32/float64"),
    "device": ((2, 3, 4, 4), torch.float32, torch.float32, "meta", None, "one device"),
    "alpha_t": ((2, 3, 4, 4), torch.float32, torch.float32, "cpu", (3,), r"alpha_t must be \[2\]"),
}


@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bad", sorted(_BAD))
def test_fake_kernel_rejects_bad_inputs(backend, inplace, bad):
    op = _op(backend, inplace)
    shape0, gdt, xdt, gdev, ashape, err = _BAD[bad]
    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 4, dtype=xdt)
        x0 = torch.empty(shape0, dtype=xdt)
        g = torch.empty(2, 3, 4, 4, dtype=gdt, device=gdev)
        a = torch.empty(ashape) if ashape else None
        with pytest.raises(RuntimeError, match=err):
            op(x, x0, g, a, None, 0.01, 0.03)


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_fake_kernel_output(backend):
    with FakeTensorMode():
        x = torch.empty(5, 3, 7, 9, dtype=torch.float16)
        out = _op(backend)(x, x, x, torch.empty(5), None, 0.0, 0.03)
    assert out.shape == x.shape and out.dtype == x.dtype


# The interpreter launches kernels eagerly, also while AOTAutograd traces the op's decomposition
# (test_aot_dispatch_dynamic), so that part of opcheck runs on a GPU only (test_gpu_triton_opcheck).
_INTERPRETED_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def _triton_opcheck_cases(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 5, 7, generator=g)
    x = (x0 + 0.05 * torch.randn(x0.shape, generator=g)).clamp(0, 1)
    grad = torch.randn(x0.shape, generator=g)
    a, e = torch.rand(3, generator=g) * 0.02, torch.rand(3, generator=g) * 0.05
    x, x0, grad, a, e = (t.to(device) for t in (x, x0, grad, a, e))
    return [(x, x0, grad, None, None, 0.01, 0.03), (x, x0, grad, a, e, 0.0, 0.0)]


_TRITON_OPCHECK = textwrap.dedent(f"""
    import sys
    import torch
    import vars_fast.ops.triton.pgd_step  # registers vars_fast::pgd_step_triton[_]
    sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
    from test_ops_pgd_step import _INTERPRETED_OPCHECK, _triton_opcheck_cases
    ops = torch.ops.vars_fast
    for args in _triton_opcheck_cases():
        torch.library.opcheck(ops.pgd_step_triton.default, args, test_utils=_INTERPRETED_OPCHECK)
        torch.library.opcheck(ops.pgd_step_triton_.default, (args[0].clone(),) + args[1:], test_utils=_INTERPRETED_OPCHECK)
    print("OK")
""")


def test_triton_opcheck(run_triton_interpreted):
    """torch.library.opcheck on the Triton ops (schema, autograd registration, fake kernel),
    run by the interpreter on CPU."""
    run_triton_interpreted(_TRITON_OPCHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_opcheck():
    pytest.importorskip("triton")
    importlib.import_module("vars_fast.ops.triton.pgd_step")
    for args in _triton_opcheck_cases("cuda"):
        torch.library.opcheck(torch.ops.vars_fast.pgd_step_triton.default, args)
        torch.library.opcheck(torch.ops.vars_fast.pgd_step_triton_.default, (args[0].clone(),) + args[1:])
