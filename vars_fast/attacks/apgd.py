"""APGD, L-inf (Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Algorithm 1): PGD with momentum and a step size
that adapts itself, so that no step size has to be tuned per model or per eps.

One run (a restart) of ``N = steps`` iterations from a start ``x^0``, step ``eta = 2 eps``:

    z^{k+1} = P(x^k + eta * sign(grad f(x^k)))
    x^{k+1} = P(x^k + a (z^{k+1} - x^k) + (1 - a)(x^k - x^{k-1})),  a = 1 at k = 0, else 0.75

``P`` projects onto the eps-ball around the clean image and [0,1]. The step is checked at the
checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0``, ``p_1 = 0.22``,
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (``checkpoints``). At ``w_j`` a sample's
step is halved, and its iterate restarts from its best point so far (the momentum term then
points from the last iterate to that point, as in Algorithm 1), when

1. the loss went up in fewer than ``rho = 0.75`` of the iterations since ``w_{j-1}``, or
2. its step was not halved at ``w_{j-1}`` and its best loss did not improve since then.

Details taken from the authors' code (fra31/auto-attack, ``autopgd_base.py``), written anew
here: condition 2 is off at the first checkpoint; the best point is updated only on a strict
improvement; every restart draws its own uniform start in the ball. Where the paper and that
code differ we follow the paper: "fewer than rho" is strict (the code counts ``<=``, which
only differs when ``rho * (w_j - w_{j-1})`` is an integer), and the share of increases in the
first interval compares each iterate with the previous one from ``x^0`` on (the code's first
comparison wraps to an unset entry).

The loss is evaluated (with its gradient) once at the start and once per iteration: N + 1
evaluations per restart, with ``eot`` draws each (``Attack.loss_and_grad`` averages the loss
and the gradient over ``eot`` calls of a stochastic ``loss_fn``). The result is each sample's
best iterate over all iterations and restarts, by that (EOT-averaged) loss.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vars_fast.attacks.base import Attack, LossFn, as_eps
from vars_fast.ops import pgd_step
from vars_fast.registry import ATTACKS


def checkpoints(n_iter: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j * n_iter)``, j >= 1, up to ``n_iter``, after which APGD
    checks its step size (Croce & Hein 2020, Sec. 3.2); a w_j equal to the one before is dropped
    (short runs). The p_j are kept in hundredths so that 0.22 - 0.03 is exact.
    ``checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]``, as the authors' code."""
    out, prev, cur = [], 0, 22  # p in hundredths
    while True:
        w = math.ceil(cur * n_iter / 100)
        if w > n_iter:
            return out
        if w > (out[-1] if out else 0):
            out.append(w)
        prev, cur = cur, cur + max(cur - prev - 3, 6)


@ATTACKS.register("apgd", iterative=True, ball="linf")
class APGD(Attack):
    """``APGD(loss_fn, eps, steps=100, n_restarts=1, rho=0.75, momentum=0.75, eot=1,
    random_start=True, generator=None)(x, init=None)``.

    eps: pixel units, a float or a [B] tensor. ``steps``: iterations per restart (N).
    ``n_restarts``: independent runs, each from a uniform start in the ball drawn from
    ``generator`` (restart 0 starts at ``init`` when given, at ``x`` when
    ``random_start=False``); the result keeps each sample's best iterate over all of them, so
    with the same generator seed more restarts never give a lower loss. ``eot``: draws of a
    stochastic ``loss_fn`` averaged per evaluation (``Attack.loss_and_grad``).

    After a call: ``trace`` [n_restarts, steps + 1], the batch mean of the best loss so far
    within each restart after each evaluation (column 0: the start), to show the loss
    flattening; ``trace_samples`` [n_restarts, steps + 1, B], the same per sample;
    ``step_trace`` [n_restarts, steps, B], the step size (pixel units) each sample used at each
    iteration; ``best_loss`` [B], the loss of the returned images.
    """

    def __init__(self, loss_fn: LossFn, eps: float | Tensor, steps: int = 100, n_restarts: int = 1,
                 rho: float = 0.75, momentum: float = 0.75, eot: int = 1, random_start: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__(loss_fn, eps, generator, eot=eot)
        if steps < 1 or n_restarts < 1:
            raise ValueError(f"APGD needs steps >= 1 and n_restarts >= 1 (got {steps}, {n_restarts})")
        self.steps, self.n_restarts = int(steps), int(n_restarts)
        self.rho, self.momentum = float(rho), float(momentum)
        self.random_start = bool(random_start)
        self.trace = self.trace_samples = self.step_trace = self.best_loss = None

    @classmethod
    def craft(cls, loss_fn, x, eps, *, steps=100, alpha=None, init=None, random_start=True, generator=None,
              keep_best=True, n_restarts=1, eot=1):
        """``alpha`` does not apply (the step size is APGD's own); the result is always the best iterate."""
        return cls(loss_fn, eps, steps=steps, n_restarts=n_restarts, eot=eot, random_start=random_start,
                   generator=generator)(x, init=init)

    def start(self, x: Tensor) -> Tensor:
        """Uniform start in the eps-ball (intersected with [0,1]), drawn from ``generator``."""
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        u = torch.rand(x.shape, generator=self.generator, device=gen_device, dtype=torch.float32).to(x.device)
        return (x + (2 * u - 1) * as_eps(self.eps, x)).clamp_(0.0, 1.0).to(x.dtype)

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        e = as_eps(self.eps, x0)
        return torch.minimum(torch.maximum(x, x0 - e), x0 + e).clamp_(0.0, 1.0)

    def perturb(self, x: Tensor, init: Tensor | None = None) -> Tensor:
        x0 = x.detach()
        B = x0.shape[0]
        best_x, best_loss = x0.clone(), torch.full((B,), -math.inf, device=x0.device)
        traces, steps_used = [], []
        for r in range(self.n_restarts):
            if r == 0 and init is not None:
                start = self.project(init.to(x0), x0)
            elif r == 0 and not self.random_start:
                start = x0.clone()
            else:
                start = self.start(x0)
            run_x, run_loss, trace, eta_trace = self._run(x0, start)
            better = run_loss > best_loss
            best_x[better] = run_x[better]
            best_loss = torch.where(better, run_loss, best_loss)
            traces.append(trace)
            steps_used.append(eta_trace)
        self.trace_samples = torch.stack(traces).cpu()  # [R, N + 1, B]
        self.trace = self.trace_samples.mean(2)
        self.step_trace = torch.stack(steps_used).cpu()  # [R, N, B]
        self.best_loss = best_loss
        return best_x

    def _run(self, x0: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One restart from ``x``: (best iterate, its loss [B], best-loss trace [N + 1, B], steps [N, B])."""
        B, N = x0.shape[0], self.steps
        view = (-1,) + (1,) * (x0.dim() - 1)
        e = torch.as_tensor(self.eps, dtype=torch.float32, device=x0.device).flatten()
        eta = 2.0 * (e.expand(B) if e.numel() == 1 else e)  # [B], the initial step 2 eps
        loss, grad = self.loss_and_grad(x)
        loss = loss.float()
        best_x, best_loss, best_grad = x.clone(), loss.clone(), grad.clone()
        trace = [best_loss.clone()]
        etas = []
        increases = torch.zeros(B, device=x0.device)  # since the last checkpoint
        prev_loss = loss
        marks = set(checkpoints(N))
        last_mark, reduced_last = 0, torch.ones(B, dtype=torch.bool, device=x0.device)
        best_at_last = best_loss.clone()
        x_prev = x.clone()
        for k in range(N):
            etas.append(eta.clone())
            # z = P(x + eta sign(g)): the fused PGD step with a per-sample step size
            z = pgd_step(x, x0, grad, eta, self.eps, inplace=False)
            a = 1.0 if k == 0 else self.momentum
            x_new = self.project(x + a * (z - x) + (1.0 - a) * (x - x_prev), x0)
            x_prev, x = x, x_new
            loss, grad = self.loss_and_grad(x)
            loss = loss.float()
            increases += (loss > prev_loss).float()
            prev_loss = loss
            better = loss > best_loss
            best_x[better], best_grad[better] = x[better], grad[better]
            best_loss = torch.where(better, loss, best_loss)
            trace.append(best_loss.clone())
            t = k + 1
            if t in marks and t < N:
                cond1 = increases < self.rho * (t - last_mark)
                cond2 = ~reduced_last & (best_loss <= best_at_last)
                halve = cond1 | cond2
                eta = torch.where(halve, eta / 2, eta)
                x = torch.where(halve.view(view), best_x, x)
                grad = torch.where(halve.view(view), best_grad, grad)
                # the restored point's loss is the reference for the next interval's first comparison
                # (the authors' code compares with the loss of the iterate that was replaced)
                prev_loss = torch.where(halve, best_loss, prev_loss)
                reduced_last, best_at_last = halve, best_loss.clone()
                increases.zero_()
                last_mark = t
        return best_x, best_loss, torch.stack(trace), torch.stack(etas)
