"""info_nce: every backend available here against the reference (the spec).

Tolerances: fp32 loss and gradients atol=rtol=1e-4 (the kernels accumulate the log-sum-exp
online over tiles and use BLAS tile products; the reference materialises N x M logits: both
are fp32, ~1e-6 apart at tau = 0.1); fp16/bf16 inputs are computed in fp32 and rounded once,
so the loss is within one ulp of the output dtype of the reference; fp64 gradcheck at the
default tolerances.
"""
from __future__ import annotations

import importlib
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vars_fast.ops import _dispatch
from vars_fast.ops.info_nce import info_nce, info_nce_reference

HAS_EXT = "ext" in _dispatch.available("info_nce")
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled extension without info_nce")


def _in_batch(n=37, m=53, d=19, dtype=torch.float32, device="cpu", seed=0):
    """Random groups of every kind: -1 (negative for all), g >= 0 (negative for group g), -2 (never)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    c = torch.randn(m, d, generator=g).to(device=device, dtype=dtype)
    pos = torch.randint(0, m, (n,), generator=g).to(device)
    ag = torch.randint(-1, 4, (n,), generator=g).to(device)
    cg = torch.randint(-2, 4, (m,), generator=g).to(device)
    return a, c, pos, ag, cg


def _detector_pairs(items=6, d=16, seed=1):
    """The detector's structure (Eq. 8): per item rows x, D(x), D(x_adv), x_adv; positives
    (x, D(x)), (x, D(x_adv)), (D(x), D(x_adv)); x_adv is a negative for its own item only."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(items, 4, d, generator=g)  # [item, (x, Dx, Dxadv, xadv), d]
    cands = z.reshape(items * 4, d)
    row = lambda i, j: i * 4 + j  # noqa: E731
    anchors, pos, ag = [], [], []
    for i in range(items):
        for a, p in ((0, 1), (0, 2), (1, 2)):
            anchors.append(z[i, a]), pos.append(row(i, p)), ag.append(i)
    cg = torch.full((items * 4,), -2, dtype=torch.long)
    cg[3::4] = torch.arange(items)
    return torch.stack(anchors), cands, torch.tensor(pos), torch.tensor(ag), cg


def _fwd_bwd(fn, a, c, pos, ag, cg, tau, **kw):
    leaves = [a.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)]
    loss = fn(leaves[0], leaves[1], pos, ag, cg, tau, **kw)
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    (loss * w).sum().backward()
    return loss.detach(), leaves[0].grad, leaves[1].grad


@needs_ext
@pytest.mark.parametrize("case", ["in_batch", "detector", "large_tiles"])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_ext_matches_reference_fp32(case, tau):
    if case == "in_batch":
        args = _in_batch()
    elif case == "detector":
        args = _detector_pairs()
    else:  # several anchor blocks and candidate tiles, ragged edges
        args = _in_batch(n=300, m=530, d=40)
    want = _fwd_bwd(info_nce_reference, *args, tau)
    got = _fwd_bwd(info_nce, *args, tau, backend="ext")
    for name, g, w in zip(("loss", "grad anchors", "grad candidates"), got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_ext
def test_all_groups_minus_one_is_plain_in_batch_cross_entropy():
    a, c, _, _, _ = _in_batch(n=20, m=20)
    pos = torch.arange(20)
    loss = info_nce(a, c, pos, torch.zeros(20, dtype=torch.long), torch.full((20,), -1), 0.2, backend="ext")
    logits = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(c, dim=1).t() / 0.2
    want = torch.nn.functional.cross_entropy(logits, pos, reduction="none")
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ext_reduced_precision_forward(dtype):
    a, c, pos, ag, cg = _in_batch(dtype=dtype)
    want = info_nce_reference(a, c, pos, ag, cg, 0.1)
    got = info_nce(a, c, pos, ag, cg, 0.1, backend="ext")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=torch.finfo(dtype).eps)


@needs_ext
def test_opcheck():
    a, c, pos, ag, cg = _in_batch(n=9, m=11, d=5)
    a.requires_grad_(True), c.requires_grad_(True)
    torch.library.opcheck(torch.ops.vars_fast.info_nce.default, (a, c, pos, ag, cg, 0.1))


@needs_ext
def test_gradcheck_fp64():
    a, c, pos, ag, cg = _in_batch(n=7, m=9, d=4, dtype=torch.float64)
    a.requires_grad_(True), c.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: info_nce(x, y, pos, ag, cg, 0.3, backend="ext"), (a, c))


@needs_ext
def test_bad_positive_index_raises():
    a, c, pos, ag, cg = _in_batch(n=4, m=5)
    with pytest.raises(RuntimeError, match="positive_index"):
        info_nce(a, c, torch.tensor([0, 1, 2, 5]), ag, cg, 0.1, backend="ext")


@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_compile_fullgraph(backend):
    if backend not in _dispatch.available("info_nce"):
        pytest.skip(f"{backend} unavailable")
    a, c, pos, ag, cg = _detector_pairs()

    def loss_fn(x, y):
        return info_nce(x, y, pos, ag, cg, 0.1, backend=backend).mean()

    torch._dynamo.reset()
    f = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x, y = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    f(x, y).backward()
    ga, gc = _mean_grad(a, c, pos, ag, cg)
    torch.testing.assert_close(x.grad, ga, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y.grad, gc, atol=1e-5, rtol=1e-4)


def _mean_grad(a, c, pos, ag, cg):
    x, y = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    info_nce_reference(x, y, pos, ag, cg, 0.1).mean().backward()
    return x.grad, y.grad


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from vars_fast.ops import _dispatch
    from vars_fast.ops.info_nce import info_nce, info_nce_reference
    assert _dispatch.choose("info_nce", [torch.zeros(1)], "triton") == "triton"
    g = torch.Generator().manual_seed(0)
    n, m, d = 37, 53, 19
    a, c = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    pos = torch.randint(0, m, (n,), generator=g)
    ag, cg = torch.randint(-1, 4, (n,), generator=g), torch.randint(-2, 4, (m,), generator=g)
    outs = []
    for fn, kw in ((info_nce, dict(backend="triton")), (info_nce_reference, {})):
        x, y = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
        loss = fn(x, y, pos, ag, cg, 0.1, **kw)
        (loss * torch.linspace(0.5, 1.5, n)).sum().backward()
        outs.append((loss.detach(), x.grad, y.grad))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    print("OK")
""")


def test_triton_interpreter(run_triton_interpreted):
    """Triton kernels on CPU under TRITON_INTERPRET=1 (correctness only)."""
    run_triton_interpreted(_TRITON_SCRIPT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_gpu_matches_reference(backend):
    if backend not in _dispatch.available("info_nce", "cuda"):
        pytest.skip(f"{backend} unavailable on CUDA")
    for n, m, d in ((37, 53, 19), (1000, 3000, 128)):
        args = _in_batch(n, m, d, device="cuda")
        want = _fwd_bwd(info_nce_reference, *args, 0.1)
        got = _fwd_bwd(info_nce, *args, 0.1, backend=backend)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4)


# ---- fake kernels, and the Triton ops through opcheck ---------------------------------------

def _ops(backend: str):
    """(forward op, backward op) of the extension or of Triton (skips when missing here)."""
    if backend == "triton":
        pytest.importorskip("triton")
        importlib.import_module("vars_fast.ops.triton.info_nce")
        return torch.ops.vars_fast.info_nce_triton, torch.ops.vars_fast.info_nce_triton_backward
    if not HAS_EXT:
        pytest.skip("compiled extension without info_nce")
    return torch.ops.vars_fast.info_nce, torch.ops.vars_fast.info_nce_backward


_BAD = {  # what is wrong: (anchors, candidates, positive_index, anchor_group, candidate_group) specs, error
    "d": (((4, 5), torch.float32), ((6, 3), torch.float32), (4,), (4,), (6,), "must share d"),
    "anchors_1d": (((4,), torch.float32), ((6, 4), torch.float32), (4,), (4,), (6,), r"anchors must be \[N, d\]"),
    "dtype": (((4, 5), torch.float32), ((6, 5), torch.float64), (4,), (4,), (6,), "candidates dtype torch.float64 must match"),
    "int": (((4, 5), torch.int32), ((6, 5), torch.int32), (4,), (4,), (6,), "must be float32/float64"),
    "positive_index": (((4, 5), torch.float32), ((6, 5), torch.float32), (3,), (4,), (6,), r"positive_index must be \[4\]"),
    "candidate_group": (((4, 5), torch.float32), ((6, 5), torch.float32), (4,), (4,), (6, 1), r"candidate_group must be \[6\]"),
}


@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("bad", sorted(_BAD))
def test_fake_kernel_rejects_bad_inputs(backend, bad):
    fwd, bwd = _ops(backend)
    (sa, da), (sc, dc), sp, sag, scg, err = _BAD[bad]
    with FakeTensorMode():
        a, c = torch.empty(sa, dtype=da), torch.empty(sc, dtype=dc)
        pos, ag, cg = (torch.empty(s, dtype=torch.int64) for s in (sp, sag, scg))
        with pytest.raises(RuntimeError, match=err):
            fwd(a, c, pos, ag, cg, 0.1)
        with pytest.raises(RuntimeError, match=err):
            bwd(torch.empty(sa[:1]), a, c, pos, ag, cg, torch.empty(sa[:1]), 0.1)


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_fake_kernel_checks_devices_and_outputs(backend):
    fwd, bwd = _ops(backend)
    with FakeTensorMode():
        a, c = torch.empty(4, 5), torch.empty(6, 5)
        pos, ag, cg = torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64), torch.empty(6, dtype=torch.int64)
        loss, lse = fwd(a, c, pos, ag, cg, 0.1)
        assert loss.shape == lse.shape == (4,) and lse.dtype == torch.float32
        da, dc = bwd(loss, a, c, pos, ag, cg, lse, 0.1)
        assert da.shape == a.shape and dc.shape == c.shape
        with pytest.raises(RuntimeError, match="one device"):
            fwd(a, c.to("meta"), pos, ag, cg, 0.1)
        with pytest.raises(RuntimeError, match=r"lse must be \[4\]"):
            bwd(loss, a, c, pos, ag, cg, lse[:3], 0.1)


# The interpreter launches kernels eagerly, also while AOTAutograd traces the op's decomposition
# (test_aot_dispatch_dynamic), so that part of opcheck runs on a GPU only (test_gpu_triton_opcheck).
_TRITON_OPCHECK = textwrap.dedent("""
    import torch
    import vars_fast.ops.triton.info_nce  # registers vars_fast::info_nce_triton*
    ops = torch.ops.vars_fast
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(9, 5, generator=g, requires_grad=True), torch.randn(11, 5, generator=g, requires_grad=True)
    pos, ag, cg = torch.randint(0, 11, (9,), generator=g), torch.randint(-1, 3, (9,), generator=g), torch.randint(-2, 3, (11,), generator=g)
    torch.library.opcheck(ops.info_nce_triton.default, (a, c, pos, ag, cg, 0.1), test_utils=utils)
    loss, lse = ops.info_nce_triton(a.detach(), c.detach(), pos, ag, cg, 0.1)
    torch.library.opcheck(ops.info_nce_triton_backward.default, (torch.rand(9, generator=g), a.detach(), c.detach(),
                          pos, ag, cg, lse, 0.1), test_utils=utils)
    print("OK")
""")


def test_triton_opcheck(run_triton_interpreted):
    run_triton_interpreted(_TRITON_OPCHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_opcheck():
    fwd, _ = _ops("triton")
    a, c, pos, ag, cg = _in_batch(n=9, m=11, d=5, device="cuda")
    torch.library.opcheck(fwd.default, (a.requires_grad_(True), c.requires_grad_(True), pos, ag, cg, 0.1))
