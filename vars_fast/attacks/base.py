"""The Attack base class (torchattacks style) and the helpers every attack shares.

An attack is built around ``loss_fn(x [B,3,S,S]) -> per-sample loss [B]`` that it
*maximises* in [0,1] pixel space inside an L-inf ball of radius ``eps`` (pixel units:
``eps255 / 255``). The same FGSM / PGD therefore serve the untargeted catalogue attack
(BPR loss), the targeted attacks (score, feature distance, class logit), the defence's
on-the-fly training attacks and the adaptive attacker: only ``loss_fn`` changes.

Only input gradients are computed. ``Attack.loss_and_grad`` is the one place that calls
the loss; it takes ``torch.autograd.grad(loss, x)`` so that no ``.grad`` of any parameter
is touched, and ``frozen(...)`` additionally puts the models in eval mode with
``requires_grad_(False)`` so that autograd does not even record what weight gradients need.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from vars_fast.registry import ATTACKS

LossFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TargetedAttack:
    """A member of ``TARGETED`` (``attack.targets``): ``loss(batch) -> loss_fn`` for one batch of
    targets, maximised by the ``ATTACKS`` member ``optimiser``. ``batch`` carries ``rec``,
    ``backbone``, ``targets`` [T], ``users`` (INSA's), ``hook_feature`` (EXPA's) and
    ``target_class`` (TAaMR's). ``through``: what the loss differentiates, "recommender" (its
    encoder) or "backbone" (the ImageNet classifier; the attack stage then finds a target class)."""

    loss: Callable[[Any], LossFn]
    optimiser: str
    through: str = "recommender"

    @property
    def iterative(self) -> bool:
        """Whether the optimiser takes steps from a start (so a warm start means something)."""
        return bool(ATTACKS.meta(self.optimiser)["iterative"])


@dataclass(frozen=True)
class CatalogueLoss:
    """A member of ``ATTACK_LOSSES`` (``attack.loss``): the per-item objective of the catalogue
    attack. ``targets(rec, cat, per_item, generator, roles) -> ItemTriples`` draws what each
    item's loss is computed over (once per model, before the attack); ``item_loss(rec, x, users,
    items, s_other, sign) -> [B]`` is the loss of a batch of items as a function of their images
    (``untargeted.item_loss`` is the BPR one), given their rows of the targets and the other
    side's clean scores ``s_other`` (``untargeted.item_loss_fn`` computes them once per batch)."""

    targets: Callable[..., Any]
    item_loss: Callable[..., Tensor]


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode and ``requires_grad_(False)`` for the modules; both restored on exit."""
    saved = []
    for m in modules:
        if m is None:
            continue
        saved.append((m, m.training, [(p, p.requires_grad) for p in m.parameters()]))
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, params in reversed(saved):
            m.train(training)
            for p, rg in params:
                p.requires_grad_(rg)


def as_eps(eps: float | Tensor, x: Tensor) -> Tensor:
    """eps as a float tensor broadcastable to x: a scalar or one value per sample ([B])."""
    e = torch.as_tensor(eps, dtype=torch.float32, device=x.device)
    return e.reshape(-1, *([1] * (x.dim() - 1))) if e.dim() == 1 else e


def quantize_within(x_adv: Tensor, clean_u8: Tensor, eps255: float) -> Tensor:
    """Float adversarial images in [0,1] -> uint8 with ``|q - clean| <= eps255`` exactly.

    Plain rounding of ``x_adv * 255`` can land up to 0.5/255 outside the ball when
    ``eps255`` is not an integer (and float error can push an integer bound by one ulp).
    We round to nearest, then clip the integer perturbation to ``floor(eps255)``: the
    result moves toward the clean image only where the ball would be left.
    x_adv: float [B,3,S,S]; clean_u8: uint8 [B,3,S,S]; returns uint8 [B,3,S,S].
    """
    c = clean_u8.to(torch.int16)
    q = torch.round(x_adv.float() * 255.0).clamp_(0, 255).to(torch.int16)
    bound = int(float(eps255) + 1e-6)
    q = torch.minimum(torch.maximum(q, c - bound), c + bound)
    return q.clamp_(0, 255).to(torch.uint8)


class Attack:
    """Base class: ``attack(x) -> x_adv`` with ``x`` float [B,3,S,S] in [0,1].

    Args:
        loss_fn: ``x -> loss [B]`` to maximise (one value per sample; samples must not
            interact, so that a sample's gradient does not depend on its batch mates). A loss
            object with its own ``loss_and_grad(x) -> (loss [B], grad)`` (``adaptive.DefendedLoss``,
            which bounds the EOT images held in one graph) is differentiated through that.
        eps: L-inf radius in pixel units ([0,1] scale); a float or a [B] tensor.
        generator: a ``torch.Generator`` for the random parts (random start, EOT draws).
        eot: expectation over transformation (Athalye et al., 2018): for a stochastic
            ``loss_fn`` (each call draws fresh randomness, e.g. a random resize-pad from the
            loss's own generator), every evaluation averages the loss and its input gradient
            over ``eot`` calls, i.e. follows the gradient of the expected loss. 1: one call.
    Subclasses implement ``perturb(x) -> x_adv``.
    """

    def __init__(self, loss_fn: LossFn, eps: float | Tensor, generator: torch.Generator | None = None,
                 eot: int = 1):
        self.loss_fn = loss_fn
        self.eps = eps
        self.generator = generator
        if int(eot) < 1:
            raise ValueError(f"eot must be >= 1 (got {eot})")
        self.eot = int(eot)

    def loss_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The one place that calls the loss: (loss [B] detached, d loss.sum() / dx), both
        averaged over ``eot`` calls (one graph at a time)."""
        if self.eot == 1:
            return self._loss_and_grad_once(x)
        loss, grad = self._loss_and_grad_once(x)
        loss, grad = loss.float(), grad.clone()
        for _ in range(self.eot - 1):
            l_k, g_k = self._loss_and_grad_once(x)
            loss += l_k.float()
            grad += g_k
        return loss / self.eot, grad / self.eot

    @torch.no_grad()
    def eval_loss(self, x: Tensor) -> Tensor:
        """The loss [B] (no gradient), averaged over ``eot`` calls."""
        if self.eot == 1:
            return self.loss_fn(x).detach()
        return sum(self.loss_fn(x).detach().float() for _ in range(self.eot)) / self.eot

    def _loss_and_grad_once(self, x: Tensor) -> tuple[Tensor, Tensor]:
        own = getattr(self.loss_fn, "loss_and_grad", None)
        if own is not None:  # a loss that bounds its own graph (adaptive.DefendedLoss: EOT chunks)
            return own(x)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            loss = self.loss_fn(xr)
            if loss.dim() != 1 or loss.shape[0] != x.shape[0]:
                raise ValueError(f"loss_fn must return one loss per sample [B={x.shape[0]}], got {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss.float().sum(), xr)
        return loss.detach(), grad

    def perturb(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def craft(cls, loss_fn: LossFn, x: Tensor, eps: float | Tensor, *, steps: int = 1,
              alpha: float | Tensor | None = None, init: Optional[Tensor] = None, random_start: bool = False,
              generator: torch.Generator | None = None, keep_best: bool = False) -> Tensor:
        """The one call every caller makes (``ATTACKS[name].craft(...)``): ``x_adv`` for ``x``.
        Settings an optimiser has no use for (FGSM's steps, a start) are ignored."""
        raise NotImplementedError  # pragma: no cover - abstract

    @torch.no_grad()
    def __call__(self, x: Tensor, **kw) -> Tensor:
        if x.dtype == torch.uint8:
            raise TypeError("attacks work on float images in [0,1]; convert uint8 with x.float() / 255")
        return self.perturb(x.detach(), **kw)

    def __repr__(self) -> str:
        e = self.eps if not isinstance(self.eps, Tensor) else f"tensor{tuple(self.eps.shape)}"
        return f"{type(self).__name__}(eps={e})"
