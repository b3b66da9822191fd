"""The attack suite (issue #22, part 1): APGD, Square, EOT, BPDA and the ranking-margin loss.

Fixtures are tiny (12 px images, a three-conv classifier with cross-entropy, a 3-user x
12-item toy recommender) so the module runs in seconds on a busy 2-core machine. Each test
checks a property a broken attack would violate: the ball, reproducibility, APGD beating PGD
on the same budget, the step-size halving, black-box never beating white-box, noise costing
little, the margin equal to a hand computation and its maximisation demoting the item."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.attacks import PGD  # noqa: E402
from vars_fast.attacks.base import Attack  # noqa: E402
from vars_fast.attacks.bpda import bpda, clamp, quantize_u8, straight_through  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ EOT
class _NoisyLoss:
    """A stochastic loss: each call draws a fresh weight w, loss = sum(w * x)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, x):
        w = torch.randn(x.shape[1:], generator=self.g)
        return (x * w).flatten(1).sum(1)


def test_eot_averages_loss_and_gradient_over_draws():
    x = torch.rand(3, 3, 4, 4)
    atk = PGD(_NoisyLoss(0), 0.1, steps=1, eot=5)
    loss, grad = atk.loss_and_grad(x)
    replay = torch.Generator().manual_seed(0)
    ws = [torch.randn(x.shape[1:], generator=replay) for _ in range(5)]
    w = sum(ws) / 5
    torch.testing.assert_close(grad, w.expand_as(x))
    torch.testing.assert_close(loss, (x * w).flatten(1).sum(1))
    assert Attack(_NoisyLoss(0), 0.1).eot == 1
    with pytest.raises(ValueError):
        PGD(_NoisyLoss(0), 0.1, eot=0)


# ------------------------------------------------------------------ BPDA
def test_bpda_forward_is_the_real_op_and_backward_the_identity():
    x = (torch.rand(2, 3, 5, 5, dtype=torch.float64) * 1.4 - 0.2).requires_grad_(True)
    w = torch.randn(x.shape, dtype=torch.float64)
    for st, real in ((quantize_u8, lambda t: torch.round(t * 255.0) / 255.0), (clamp, lambda t: t.clamp(0, 1)),
                     (lambda t: straight_through(torch.floor, t), torch.floor)):
        y = st(x)
        assert torch.equal(y, real(x.detach()))
        (g,) = torch.autograd.grad((w * y).sum(), x)
        assert torch.equal(g, w)  # the gradient flows where the real op has none (rounding, saturation)
    # a differentiable stand-in for the backward pass
    y = bpda(torch.round, x, approx=lambda t: 2 * t)
    assert torch.equal(y, torch.round(x.detach()))
    (g,) = torch.autograd.grad((w * y).sum(), x)
    torch.testing.assert_close(g, 2 * w)


