"""random_resize_pad: every backend available here against the per-sample reference loop.

Tolerances (forward and backward): fp32 atol=rtol=1e-5 (the kernels blend in a different
order than ATen's upsample), fp64 1e-12, fp16/bf16 one ulp at 1.0 (atol=finfo.eps, rtol=0;
forward only). Nearest is exact.
"""
from __future__ import annotations

import importlib
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vars_fast.ops import _dispatch
from vars_fast.ops.random_resize_pad import (draw_resize_pad, random_resize_pad, random_resize_pad_grid_sample,
                                             random_resize_pad_reference)

HAS_EXT = "ext" in _dispatch.available("random_resize_pad")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled extension without random_resize_pad")
# (B, C, H, W, out_size, min_size): odd, non-square, up- and down-sampling, size == H.
CASES = [(5, 3, 37, 41, 48, 20), (2, 1, 8, 8, 20, 4), (3, 2, 30, 30, 31, 29), (4, 3, 64, 60, 40, 10)]


def _tol(dtype):
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}.get(
        dtype, dict(atol=torch.finfo(dtype).eps, rtol=0.0))


def _case(B, C, H, W, O, m, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, W, generator=g).to(device=device, dtype=dtype)
    sizes, offsets = draw_resize_pad(B, O, m, g, device)
    return x, sizes, offsets


@needs_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_ext_forward_matches_reference(case, mode, dtype):
    x, s, o = _case(*case, dtype=dtype)
    O = case[4]
    want = random_resize_pad_reference(x, s, o, O, mode)
    got, s2, o2 = random_resize_pad(x, O, case[5], mode=mode, sizes=s, offsets=o, backend="ext")
    tol = dict(atol=0.0, rtol=0.0) if mode == "nearest" else _tol(dtype)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(s2, s) and torch.equal(o2, o)


@needs_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_ext_backward_matches_reference(case, mode):
    x, s, o = _case(*case)
    O = case[4]
    gout = torch.randn(case[0], case[1], O, O, generator=torch.Generator().manual_seed(3))
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(random_resize_pad_reference(xr, s, o, O, mode), xr, gout)
    xk = x.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(random_resize_pad(xk, O, 1, mode=mode, sizes=s, offsets=o, backend="ext")[0], xk, gout)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_draws_reproducible_and_in_range():
    x = torch.rand(16, 3, 10, 10)
    out1, s1, o1 = random_resize_pad(x, 24, 12, torch.Generator().manual_seed(5))
    out2, s2, o2 = random_resize_pad(x, 24, 12, torch.Generator().manual_seed(5))
    assert torch.equal(out1, out2) and torch.equal(s1, s2) and torch.equal(o1, o2)
    assert s1.dtype == torch.long and s1.shape == (16,) and o1.shape == (16, 2)
    assert (s1 >= 12).all() and (s1 <= 23).all() and (o1 >= 0).all() and (o1 + s1[:, None] <= 24).all()
    with pytest.raises(ValueError, match="min_size"):
        random_resize_pad(x, 24, 24)


def test_grid_sample_baseline_matches_reference():
    x, s, o = _case(*CASES[0])
    torch.testing.assert_close(random_resize_pad_grid_sample(x, s, o, 48), random_resize_pad_reference(x, s, o, 48),
                               atol=1e-5, rtol=1e-5)


@needs_ext
def test_bad_draws_rejected():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="does not fit"):
        random_resize_pad(x, 10, 2, sizes=torch.tensor([5, 6]), offsets=torch.tensor([[0, 0], [5, 0]]), backend="ext")


@needs_ext
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_gradcheck_float64(mode):
    x, s, o = _case(2, 2, 6, 5, 9, 3, dtype=torch.float64)
    x.requires_grad_(True)
    f = lambda t: random_resize_pad(t, 9, 3, mode=mode, sizes=s, offsets=o, backend="ext")[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-7)


@needs_ext
def test_opcheck():
    x, s, o = _case(2, 3, 7, 9, 12, 4)
    torch.library.opcheck(torch.ops.vars_fast.random_resize_pad.default, (x.requires_grad_(True), s, o, 12, "bilinear"))
    g = torch.randn(2, 3, 12, 12)
    torch.library.opcheck(torch.ops.vars_fast.random_resize_pad_backward.default, (g, s, o, 7, 9, "nearest"))


@pytest.mark.parametrize("backend", ["ext"])
def test_compile_fullgraph(backend):
    if backend not in _dispatch.available("random_resize_pad"):
        pytest.skip(f"{backend} unavailable")
    x, s, o = _case(3, 2, 11, 13, 16, 8)

    def loss(t):
        return random_resize_pad(t, 16, 8, sizes=s, offsets=o, backend=backend)[0].square().sum()

    torch._dynamo.reset()
    f = torch.compile(loss, fullgraph=True, backend="aot_eager")
    xr, xk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = random_resize_pad_reference(xr, s, o, 16).square().sum()
    got = f(xk)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(xk.grad, xr.grad, atol=1e-5, rtol=1e-5)


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from vars_fast.ops.random_resize_pad import draw_resize_pad, random_resize_pad, random_resize_pad_reference
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 11, generator=g)
    s, o = draw_resize_pad(2, 16, 5, g)
    gout = torch.randn(2, 3, 16, 16, generator=g)
    for mode in ("bilinear", "nearest"):
        xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        want = random_resize_pad_reference(xr, s, o, 16, mode)
        got = random_resize_pad(xt, 16, 5, mode=mode, sizes=s, offsets=o, backend="triton")[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        want.backward(gout); got.backward(gout)
        torch.testing.assert_close(xt.grad, xr.grad, atol=1e-5, rtol=1e-5)
    print("OK")
""")


def test_triton_interpreter(run_triton_interpreted):
    """Triton kernels on CPU under TRITON_INTERPRET=1 (correctness only)."""
    run_triton_interpreted(_TRITON_SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_gpu_matches_reference(backend, mode):
    if backend not in _dispatch.available("random_resize_pad", "cuda"):
        pytest.skip(f"{backend} unavailable on CUDA")
    for case in CASES + [(64, 3, 224, 224, 224, 180)]:
        x, s, o = _case(*case, device="cuda")
        O = case[4]
        xr, xk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        want = random_resize_pad_reference(xr, s, o, O, mode)
        got = random_resize_pad(xk, O, case[5], mode=mode, sizes=s, offsets=o, backend=backend)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        gout = torch.randn_like(want)
        want.backward(gout)
        got.backward(gout)
        torch.testing.assert_close(xk.grad, xr.grad, atol=1e-4, rtol=1e-4)


# Outputs of >= 32 MiB come from the kernels' huge-page allocator (csrc/cpu/huge_page_alloc.h,
# Linux): fresh zero-filled mappings whose padding the kernels do not write. These cases are
# large enough to take that path (forward out 16x3x448x448 fp32 = 38.5 MB, backward grad_x
# 16x3x424x416 fp32 = 32.3 MiB), for the AVX-512 fp32 kernel and the generic one.
LARGE = (16, 3, 424, 416, 448, 100)


@needs_ext
@pytest.mark.parametrize("mode,dtype", [("bilinear", torch.float32), ("nearest", torch.float32),
                                        ("bilinear", torch.float64)])
def test_ext_large_output_matches_reference(mode, dtype):
    x, s, o = _case(*LARGE, dtype=dtype, seed=1)
    O = LARGE[4]
    want = random_resize_pad_reference(x, s, o, O, mode)
    for _ in range(3):  # fresh mappings each time; also after earlier ones were released
        got = random_resize_pad(x, O, LARGE[5], mode=mode, sizes=s, offsets=o, backend="ext")[0]
        tol = dict(atol=0.0, rtol=0.0) if mode == "nearest" else _tol(dtype)
        torch.testing.assert_close(got, want, **tol)
    gout = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    xr, xk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(random_resize_pad_reference(xr, s, o, O, mode), xr, gout)
    (gk,) = torch.autograd.grad(random_resize_pad(xk, O, 1, mode=mode, sizes=s, offsets=o, backend="ext")[0], xk, gout)
    torch.testing.assert_close(gk, gw, atol=1e-5, rtol=1e-5)


@needs_ext
def test_ext_large_output_is_an_ordinary_tensor():
    import io
    import os
    import sys

    x, s, o = _case(*LARGE, seed=4)
    O = LARGE[4]
    want = random_resize_pad_reference(x, s, o, O)
    out = random_resize_pad(x, O, LARGE[5], sizes=s, offsets=o, backend="ext")[0]
    assert out.is_contiguous() and out.device.type == "cpu" and out.data_ptr() % 64 == 0
    if sys.platform == "linux":  # the huge-page path (2 MiB-aligned mapping), not the fallback
        assert out.data_ptr() % (2 << 20) == 0
    # Storage resize keeps the data (grows into a new allocation, shrinks in place).
    grown = random_resize_pad(x, O, LARGE[5], sizes=s, offsets=o, backend="ext")[0]
    n = grown.numel()
    grown.resize_(n + 1000)
    torch.testing.assert_close(grown[:n].view(want.shape), want, atol=1e-5, rtol=1e-5)
    grown.resize_(10)
    torch.testing.assert_close(grown, want.reshape(-1)[:10], atol=1e-5, rtol=1e-5)
    del grown
    # In-place ops, views, numpy sharing, serialisation, shared memory.
    out.view(-1)[:5].add_(1)
    assert out.numpy()[0, 0, 0, 0] == out[0, 0, 0, 0].item()
    out.view(-1)[:5].sub_(1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf), want, atol=1e-5, rtol=1e-5)
    shared = out.clone().share_memory_()
    assert shared.is_shared()
    torch.testing.assert_close(shared, want, atol=1e-5, rtol=1e-5)
    del out, shared
    # Outputs are released when dropped: 40 outputs of 38.5 MB do not pile up in RSS.
    if os.path.exists("/proc/self/statm"):
        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        before = rss_mb()
        for _ in range(40):
            out = random_resize_pad(x, O, LARGE[5], sizes=s, offsets=o, backend="ext")[0]
            del out
        assert rss_mb() - before < 100


# ---- fake kernels, and the Triton ops through opcheck and gradcheck -------------------------

def _ops(backend: str):
    """(forward op, backward op) of the extension or of Triton (skips when missing here)."""
    if backend == "triton":
        pytest.importorskip("triton")
        importlib.import_module("vars_fast.ops.triton.random_resize_pad")
        return torch.ops.vars_fast.random_resize_pad_triton, torch.ops.vars_fast.random_resize_pad_triton_backward
    if not HAS_EXT:
        pytest.skip("compiled extension without random_resize_pad")
    return torch.ops.vars_fast.random_resize_pad, torch.ops.vars_fast.random_resize_pad_backward


_BAD = {  # what is wrong: (x shape, x dtype, sizes shape, offsets shape, offsets dtype, offsets device, mode, error)
    "x_3d": ((2, 7, 9), torch.float32, (2,), (2, 2), torch.int64, "cpu", "bilinear", r"x must be \[B, C, H, W\]"),
    "x_int": ((2, 3, 7, 9), torch.int64, (2,), (2, 2), torch.int64, "cpu", "bilinear", "must be float32/float64"),
    "sizes": ((2, 3, 7, 9), torch.float32, (3,), (2, 2), torch.int64, "cpu", "bilinear", r"sizes must be \[2\]"),
    "offsets": ((2, 3, 7, 9), torch.float32, (2,), (2, 3), torch.int64, "cpu", "bilinear", r"offsets must be \[B=2, 2\]"),
    "offsets_dtype": ((2, 3, 7, 9), torch.float32, (2,), (2, 2), torch.int32, "cpu", "bilinear", "offsets must be torch.int64"),
    "device": ((2, 3, 7, 9), torch.float32, (2,), (2, 2), torch.int64, "meta", "bilinear", "one device"),
    "mode": ((2, 3, 7, 9), torch.float32, (2,), (2, 2), torch.int64, "cpu", "bicubic", "mode must be one of"),
}


@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("bad", sorted(_BAD))
def test_fake_kernel_rejects_bad_inputs(backend, bad):
    fwd, bwd = _ops(backend)
    xs, xdt, ss, os_, odt, odev, mode, err = _BAD[bad]
    with FakeTensorMode():
        x = torch.empty(xs, dtype=xdt)
        sizes, offsets = torch.empty(ss, dtype=torch.int64), torch.empty(os_, dtype=odt, device=odev)
        with pytest.raises(RuntimeError, match=err):
            fwd(x, sizes, offsets, 12, mode)
        if len(xs) == 4:  # the backward takes grad_out [B, C, O, O] with the same draws
            with pytest.raises(RuntimeError, match=err.replace("x must", "grad_out must")):
                bwd(torch.empty(xs[:2] + (12, 12), dtype=xdt), sizes, offsets, 7, 9, mode)


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_fake_kernel_output_and_non_square_grad(backend):
    fwd, bwd = _ops(backend)
    with FakeTensorMode():
        x, sizes, offsets = torch.empty(2, 3, 7, 9), torch.empty(2, dtype=torch.int64), torch.empty(2, 2, dtype=torch.int64)
        assert fwd(x, sizes, offsets, 12, "nearest").shape == (2, 3, 12, 12)
        assert bwd(torch.empty(2, 3, 12, 12), sizes, offsets, 7, 9, "bilinear").shape == (2, 3, 7, 9)
        with pytest.raises(RuntimeError, match=r"grad_out must be \[B, C, O, O\]"):
            bwd(torch.empty(2, 3, 12, 11), sizes, offsets, 7, 9, "bilinear")


# The interpreter launches kernels eagerly, also while AOTAutograd traces the op's decomposition
# (test_aot_dispatch_dynamic), so that part of opcheck runs on a GPU only (test_gpu_triton_opcheck).
# gradcheck in float64 with eps=1e-3: the Triton kernels interpolate in fp32, and the map is
# linear in x, so a large step costs no truncation error while fp32 rounding stays below atol.
# fast_mode (random projections of the Jacobian) keeps the interpreter to a few dozen launches.
_TRITON_OPCHECK = textwrap.dedent("""
    import torch
    import vars_fast.ops.triton.random_resize_pad  # registers vars_fast::random_resize_pad_triton*
    from vars_fast.ops.random_resize_pad import draw_resize_pad, random_resize_pad
    ops = torch.ops.vars_fast
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 9, generator=g)
    s, o = draw_resize_pad(2, 12, 4, g)
    for mode in ("bilinear", "nearest"):
        torch.library.opcheck(ops.random_resize_pad_triton.default, (x.clone().requires_grad_(True), s, o, 12, mode),
                              test_utils=utils)
        gout = torch.randn(2, 3, 12, 12, generator=g, requires_grad=True)
        torch.library.opcheck(ops.random_resize_pad_triton_backward.default, (gout, s, o, 7, 9, mode), test_utils=utils)
        xs = torch.rand(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
        ss, oo = draw_resize_pad(1, 7, 3, g)
        f = lambda t: random_resize_pad(t, 7, 3, mode=mode, sizes=ss, offsets=oo, backend="triton")[0]
        assert torch.autograd.gradcheck(f, (xs,), eps=1e-3, atol=1e-4, rtol=1e-3, fast_mode=True)
        assert torch.autograd.gradgradcheck(f, (xs,), eps=1e-3, atol=1e-4, rtol=1e-3, fast_mode=True)
    print("OK")
""")


def test_triton_opcheck_and_double_backward(run_triton_interpreted):
    """The Triton ops under the interpreter: opcheck (schema, autograd registration, fake
    kernel), gradcheck and gradgradcheck in float64 (the shared autograd's double backward)."""
    run_triton_interpreted(_TRITON_OPCHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_gpu_opcheck_and_double_backward(backend):
    fwd, bwd = _ops(backend)
    x, s, o = _case(2, 3, 7, 9, 12, 4, device="cuda")
    torch.library.opcheck(fwd.default, (x.requires_grad_(True), s, o, 12, "bilinear"))
    torch.library.opcheck(bwd.default, (torch.randn(2, 3, 12, 12, device="cuda", requires_grad=True), s, o, 7, 9, "nearest"))
    xs, ss, oo = _case(1, 2, 5, 4, 7, 3, dtype=torch.float64, device="cuda")
    f = lambda t: random_resize_pad(t, 7, 3, sizes=ss, offsets=oo, backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (xs.requires_grad_(True),), eps=1e-3, atol=1e-4, rtol=1e-3)
    assert torch.autograd.gradgradcheck(f, (xs,), eps=1e-3, atol=1e-4, rtol=1e-3)
