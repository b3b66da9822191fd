"""Square attack, L-inf (Andriushchenko, Croce, Flammarion & Hein, 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search").

Score-based and gradient-free: it only reads the per-sample loss, so it is the check that a
defence's robustness is not an artefact of masked gradients. Random search over the vertices
of the eps-ball:

* start: vertical stripes, ``x + eps * s`` with one random sign per (channel, column);
* each iteration draws, per sample, a square window of side ``s`` at a uniform position and
  one random sign per channel, sets the window's perturbation to ``+-eps`` with those signs
  (projected onto the ball and [0,1]), and keeps the candidate when its loss is strictly
  higher. A candidate that would not change the current image is redrawn (a few tries);
* the window's area is ``p`` of the image, ``p`` halved on the paper's schedule after
  10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 iterations, rescaled to the
  budget (``p_schedule``; the authors' ``resc_schedule``); ``p_init = 0.8``, AutoAttack's
  value for L-inf (the paper's ImageNet runs use 0.05).

Details from the authors' code (max-andriushchenko/square-attack, fra31/auto-attack), written
anew: ``s = round(sqrt(p * H * W))`` clamped to [1, H - 1]; windows drawn per sample as in the
original code (AutoAttack draws one window per batch). We maximise the loss, and stop at the
budget rather than at a misclassification (the loss has no success threshold here).

``n_queries`` counts candidate evaluations per sample, the start included (so
``n_queries - 1`` iterations); each costs ``eot`` calls of a stochastic ``loss_fn``. The
attack never calls autograd.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vars_fast.attacks.base import Attack, LossFn, as_eps
from vars_fast.registry import ATTACKS

#: iterations (of 10,000) after which the paper halves p
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(it: int, n_iter: int, p_init: float) -> float:
    """The window share at iteration ``it`` (0-based) of ``n_iter``: ``p_init`` halved once per
    mark of ``HALVINGS`` passed, the marks rescaled from 10,000 iterations to ``n_iter``."""
    t = int(it / max(n_iter, 1) * 10000)
    return p_init / 2 ** sum(t > h for h in HALVINGS)


@ATTACKS.register("square", iterative=True, ball="linf", gradient_free=True)
class Square(Attack):
    """``Square(loss_fn, eps, n_queries=1000, p_init=0.8, eot=1, generator=None)(x, init=None)``.

    eps: pixel units, a float or a [B] tensor. ``init``: a start in the ball (projected) instead
    of the vertical stripes, e.g. another attack's result to refine. After a call:
    ``queries`` [B] (candidates evaluated per sample), ``best_loss`` [B], ``trace``
    [n_queries] (batch mean of the best loss after each query, to show it flattening) and
    ``accepted`` (share of the iterations whose candidate was kept, over samples).
    """

    def __init__(self, loss_fn: LossFn, eps: float | Tensor, n_queries: int = 1000, p_init: float = 0.8,
                 eot: int = 1, generator: torch.Generator | None = None, redraws: int = 10):
        super().__init__(loss_fn, eps, generator, eot=eot)
        if n_queries < 1:
            raise ValueError(f"Square needs n_queries >= 1 (got {n_queries})")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"Square p_init must be in (0, 1] (got {p_init})")
        self.n_queries, self.p_init, self.redraws = int(n_queries), float(p_init), int(redraws)
        self.queries = self.best_loss = self.trace = self.accepted = None

    @classmethod
    def craft(cls, loss_fn, x, eps, *, steps=None, alpha=None, init=None, random_start=True, generator=None,
              keep_best=True, n_queries=1000, p_init=0.8, eot=1):
        """Gradient steps and their size do not apply (``steps``, ``alpha`` ignored): the budget is
        ``n_queries``. ``init`` is ignored too: in this protocol it is a caller's uniform random
        start, and Square's own random start is the vertical stripes (a warm start from another
        attack's result: ``Square(...)(x, init=...)``). The result is always the best candidate.
        ``generator=None`` draws from torch's global generator."""
        return cls(loss_fn, eps, n_queries=n_queries, p_init=p_init, eot=eot, generator=generator)(x)

    def _rand(self, *shape: int, device) -> Tensor:
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.rand(shape, generator=self.generator, device=gen_device).to(device)

    def _signs(self, *shape: int, device) -> Tensor:
        return torch.where(self._rand(*shape, device=device) < 0.5, -1.0, 1.0)

    def _randint(self, high: Tensor | int, n: int, device) -> Tensor:
        """n uniform integers in [0, high] (inclusive)."""
        return (self._rand(n, device=device) * (high + 1)).long().clamp_(max=high)

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        e = as_eps(self.eps, x0)
        return torch.minimum(torch.maximum(x, x0 - e), x0 + e).clamp_(0.0, 1.0)

    def perturb(self, x: Tensor, init: Tensor | None = None) -> Tensor:
        x0 = x.detach()
        B, C, H, W = x0.shape
        dev, e = x0.device, as_eps(self.eps, x0)
        if init is not None:
            best = self.project(init.to(x0), x0)
        else:  # vertical stripes: one sign per (sample, channel, column)
            best = (x0 + e * self._signs(B, C, 1, W, device=dev).to(x0.dtype)).clamp_(0.0, 1.0)
        best_loss = self.eval_loss(best).float()
        trace = [best_loss.mean()]
        n_iter = self.n_queries - 1
        rows, cols = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
        kept = 0.0
        for it in range(n_iter):
            p = p_schedule(it, n_iter, self.p_init)
            s = min(max(int(round(math.sqrt(p * H * W))), 1), max(min(H, W) - 1, 1))
            top = self._randint(H - s, B, dev).view(B, 1, 1)
            left = self._randint(W - s, B, dev).view(B, 1, 1)
            window = ((rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)).unsqueeze(1)  # [B,1,H,W]
            cand = best
            todo = torch.ones(B, dtype=torch.bool, device=dev)
            for _ in range(self.redraws):  # a candidate equal to the current image costs a query for nothing
                signs = self._signs(B, C, 1, 1, device=dev).to(x0.dtype)
                new = self.project(torch.where(window, x0 + e * signs, best), x0)
                cand = torch.where(todo.view(B, 1, 1, 1), new, cand)
                todo = (cand == best).flatten(1).all(1)
                if not todo.any():
                    break
            loss = self.eval_loss(cand).float()
            better = loss > best_loss
            kept += float(better.float().mean())
            best = torch.where(better.view(B, 1, 1, 1), cand, best)
            best_loss = torch.where(better, loss, best_loss)
            trace.append(best_loss.mean())
        self.queries = torch.full((B,), self.n_queries, dtype=torch.long)
        self.best_loss, self.trace = best_loss, torch.stack(trace).cpu()
        self.accepted = kept / max(n_iter, 1)
        return best
