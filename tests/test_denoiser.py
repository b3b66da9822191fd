"""Denoiser (Fig. 4) shapes, no downsampling, identity init; the losses on known inputs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vars_fast.defense.denoiser import Denoiser
from vars_fast.defense.losses import (ADV, DADV, DX, X, content_loss, contrastive_loss, contrastive_pairs,
                                      perceptual_loss)


def tiny(**kw):
    base = dict(width=8, n_res_blocks=2, norm="instance", patch_size=4, heads=2, embed_dim=16, mlp_ratio=2.0,
                image_size=32)
    base.update(kw)
    return Denoiser(**base)


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("hw", [(32, 32), (37, 41), (20, 28)])
def test_shape_and_range_any_size(norm, hw):
    torch.manual_seed(0)
    d = tiny(norm=norm)
    with torch.no_grad():  # perturb the zero init so the output is not trivially x
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 3, *hw)
    y = d(x)
    assert y.shape == x.shape
    assert 0.0 <= float(y.detach().min()) and float(y.detach().max()) <= 1.0
    y.sum().backward()  # gradients flow through every part (pos-embedding interpolation too)
    assert d.glob.pos.grad is not None and d.conv_in.weight.grad.abs().sum() > 0


def test_no_downsampling_in_conv_path():
    d = tiny()
    seen = []

    def hook(mod, inp, out):
        seen.append((mod, tuple(out.shape[-2:])))

    hs = [m.register_forward_hook(hook) for m in d.modules() if isinstance(m, nn.Conv2d)]
    d(torch.rand(1, 3, 37, 41))
    for h in hs:
        h.remove()
    assert len(seen) == sum(isinstance(m, nn.Conv2d) for m in d.modules()) == 2 + 2 * 2 + 2 * 2
    assert all(shape == (37, 41) for _, shape in seen)
    assert all(m.stride == (1, 1) for m, _ in seen)


def test_identity_at_init_and_after_small_step():
    torch.manual_seed(0)
    d = tiny()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(d(x), x)
    # one optimiser step on the content loss keeps D close to the identity
    opt = torch.optim.Adam(d.parameters(), lr=1e-4)
    content_loss(x, d(x + 0.05 * torch.randn_like(x))).backward()
    opt.step()
    with torch.no_grad():
        assert float((d(x) - x).abs().mean()) < 0.01


def test_kwargs_rebuild():
    d = tiny()
    d2 = Denoiser(**d.kwargs())
    d2.load_state_dict(d.state_dict())
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(d(x), d2(x))


# ---- losses -------------------------------------------------------------------------------

def test_content_loss_value():
    x = torch.zeros(1, 3, 2, 2)
    y = torch.full((1, 3, 2, 2), 0.5)
    assert float(content_loss(x, y)) == pytest.approx(0.25)


class _Stages(nn.Module):
    """A frozen two-map 'backbone' with known maps: identity and 2x2 average pooling."""

    def stages(self, x):
        return [x, F.avg_pool2d(x, 2)]


def test_perceptual_loss_values():
    bb = _Stages()
    x = torch.rand(2, 3, 4, 4)
    assert float(perceptual_loss(bb, x, x.clone())) == 0.0
    y = x + 0.1  # both maps shift by 0.1 everywhere: each term is 0.01 per element
    assert float(perceptual_loss(bb, x, y)) == pytest.approx(0.02, rel=1e-5)
    assert float(perceptual_loss(bb, x, torch.rand_like(x))) > 0


def test_contrastive_pairs():
    n = 3
    rows, pos, ag, cg = contrastive_pairs(n, share_negatives=False, symmetric=False)
    # item k's views: x at k, x_adv at n+k, D(x) at 2n+k, D(x_adv) at 3n+k
    got = {(int(a), int(p)) for a, p in zip(rows, pos)}
    want = {(X * n + k, DX * n + k) for k in range(n)} | {(X * n + k, DADV * n + k) for k in range(n)} \
        | {(DX * n + k, DADV * n + k) for k in range(n)}
    assert got == want
    assert torch.equal(ag, rows % n)  # anchor's group = its item
    assert torch.equal(cg[ADV * n:(ADV + 1) * n], torch.arange(n))  # negatives: own item's x_adv
    assert (cg[:n] == -2).all() and (cg[2 * n:] == -2).all()  # clean/denoised: never negatives
    rows_s, pos_s, _, cg_s = contrastive_pairs(n)  # default: symmetric, shared negatives
    assert rows_s.numel() == 6 * n and (cg_s[n:2 * n] == -1).all()
    assert {(int(a), int(p)) for a, p in zip(rows_s, pos_s)} == want | {(p, a) for a, p in want}
    # x_adv is never an anchor nor a positive
    assert not ((rows_s >= n) & (rows_s < 2 * n)).any() and not ((pos_s >= n) & (pos_s < 2 * n)).any()


def test_contrastive_loss_hand_computed():
    tau = 0.5
    e = lambda *v: torch.tensor([list(v)], dtype=torch.float32)  # noqa: E731
    z_x, z_adv, z_dx, z_dadv = e(1.0, 0.0), e(0.0, 1.0), e(1.0, 1.0), e(1.0, -1.0)
    c = 1 / math.sqrt(2)
    cos = {("x", "dx"): c, ("x", "dadv"): c, ("dx", "dadv"): 0.0,
           ("x", "adv"): 0.0, ("dx", "adv"): c, ("dadv", "adv"): -c}

    def ell(a, b):  # Eq. 9 with the single negative x_adv
        s = cos.get((a, b), cos.get((b, a)))
        return -math.log(math.exp(s / tau) / (math.exp(s / tau) + math.exp(cos[(a, "adv")] / tau)))

    want_one_way = ell("x", "dx") + ell("x", "dadv") + ell("dx", "dadv")
    want = want_one_way + ell("dx", "x") + ell("dadv", "x") + ell("dadv", "dx")
    got = contrastive_loss(z_x, z_adv, z_dx, z_dadv, tau, share_negatives=False)
    assert float(got) == pytest.approx(want, rel=1e-5)
    got1 = contrastive_loss(z_x, z_adv, z_dx, z_dadv, tau, share_negatives=False, symmetric=False)
    assert float(got1) == pytest.approx(want_one_way, rel=1e-5)


def test_shared_negatives_add_other_items_adv():
    torch.manual_seed(0)
    z = [torch.randn(4, 8) for _ in range(4)]
    own = contrastive_loss(*z, 0.1, share_negatives=False)
    shared = contrastive_loss(*z, 0.1, share_negatives=True)
    assert float(shared) > float(own)  # more negatives in every denominator


@pytest.mark.parametrize("hw", [(32, 32), (29, 35)])
def test_nhwc_token_order_keeps_the_global_block(hw):
    """GlobalBlock.nhwc_tokens (set by the screener's inference copy) takes NHWC tokens in
    (row, col, channel) order with permuted embed/unembed weights: the same block function."""
    from vars_fast.defense.denoiser import GlobalBlock

    torch.manual_seed(0)
    blk = GlobalBlock(width=8, patch_size=8, dim=32, heads=4, mlp_ratio=2.0, image_size=32).eval()
    for p in blk.parameters():  # unembed starts at zero: give every weight a value
        nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 8, *hw).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = blk(x)
        blk.nhwc_tokens = True
        got = blk(x)
        got_nchw = blk(x.contiguous())  # NCHW input: the flag does not apply
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_nchw, want, rtol=0, atol=0)


def _random_global_block(unpatchify: str):
    from vars_fast.defense.denoiser import GlobalBlock

    torch.manual_seed(3)
    g = GlobalBlock(8, 4, 16, 2, 2.0, 32, unpatchify=unpatchify)
    with torch.no_grad():
        for p in g.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        g.pos.zero_()  # every token sees the same input below
    return g


def test_smooth_unpatchify_adds_no_patch_periodic_pattern():
    # a constant feature map gives identical tokens; "pixel" turns each token into a fixed
    # 4x4 tile (a pattern with the patch period), "smooth" into a constant
    x = torch.full((1, 8, 32, 32), 0.3)
    with torch.no_grad():
        pixel = _random_global_block("pixel")(x) - x
        smooth = _random_global_block("smooth")(x) - x
    assert float(pixel.std(dim=(-2, -1)).min()) > 0.1
    torch.testing.assert_close(pixel[..., :4, :4].repeat(1, 1, 8, 8), pixel)  # period 4 = the patch
    assert float(smooth.std(dim=(-2, -1)).max()) < 1e-5
    assert float(smooth.abs().mean()) > 0.1  # not zero: the block still acts


@pytest.mark.parametrize("hw", [(32, 32), (37, 41)])
def test_smooth_unpatchify_nhwc_and_any_size(hw):
    g = _random_global_block("smooth")
    x = torch.rand(2, 8, *hw)
    with torch.no_grad():
        a = g(x)
        b = g(x.contiguous(memory_format=torch.channels_last))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)


def test_unpatchify_checks_and_old_kwargs():
    with pytest.raises(ValueError, match="defense.unpatchify"):
        tiny(unpatchify="nearest")
    d = tiny(unpatchify="smooth")
    assert d.kwargs()["unpatchify"] == "smooth"
    assert d.glob.unembed.out_features == 8  # one vector per token, not per pixel
    old = {k: v for k, v in tiny().kwargs().items() if k != "unpatchify"}  # a checkpoint from before the option
    assert Denoiser(**old).glob.unpatchify == "pixel"


def test_zero_mean_residual_shifts_no_colour():
    """defense.zero_mean_residual: r has zero spatial mean per image and channel, also in the
    screening path's polyphase copy; checkpoints from before the option load without it."""
    from vars_fast.nn.fuse import polyphase_copy

    torch.manual_seed(0)
    d = tiny(zero_mean_residual=True).eval()
    for p in d.conv_out.parameters():  # past the identity init, with a bias that shifts colours
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(3, 3, 32, 32)
    r = d.residual(x)
    assert r.abs().mean() > 1e-3
    torch.testing.assert_close(r.mean(dim=(2, 3)), torch.zeros(3, 3), atol=1e-6, rtol=0)
    assert Denoiser(**d.kwargs()).zero_mean_residual
    fast, _ = polyphase_copy(d, lambda m: m.residual(x))
    torch.testing.assert_close(fast.residual(x), r, atol=1e-5, rtol=1e-4)
    old = {k: v for k, v in d.kwargs().items() if k != "zero_mean_residual"}
    assert not Denoiser(**old).zero_mean_residual
