"""The adaptive attacker: PGD that knows the defence (beyond the paper; Athalye et al., 2018,
"Obfuscated Gradients Give a False Sense of Security").

The attacker maximises, within the eps-ball,

    L(x) = 1/K sum_k L_rec(T_k(D(x)))  -  w * relu(d(x) - m * tau) / tau

* ``D`` the denoiser and ``T_k`` the random resize-pad of OURS-rand with draw k; the first
  term is the expectation over transformations (EOT): K draws per step, fresh each step,
  replayed explicitly into ``vars_fast.ops.random_resize_pad`` (``sizes``/``offsets``) so
  that the gradient goes through the very transformation that was applied. The denoiser
  runs once per step and is shared by the K draws (the randomness comes after it), so EOT
  costs K cheap recommender passes, not K denoiser passes.
* ``d(x) = ||z(x) - z(D(x))||`` the detector distance and ``tau`` its threshold: the hinge
  keeps the adversarial image under the threshold (times a margin m < 1), so that it is
  not flagged. The hard decision ``d > tau`` has no gradient; the hinge is its surrogate.
* Straight-through (BPDA): where a backend of the resize-pad has no autograd, its backward
  is taken as the identity (``y = u + (T(u) - u).detach()``).

``L_rec`` is any per-sample loss ``x -> [B]`` on the purified images, e.g. the item BPR loss
of the catalogue attack (``vars_fast.evaluate.adaptive`` builds it).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vars_fast.attacks.base import LossFn
from vars_fast.attacks.pgd import PGD
from vars_fast.ops import random_resize_pad


def rand_min_size(defense) -> int:
    """Smallest side r' of the random resize, ``ceil(rand_min_frac * r)`` (r' in [that, r));
    the same rule as ``Defense.rand_min_size``."""
    if hasattr(defense, "rand_min_size"):
        return int(defense.rand_min_size())
    r = int(defense.image_size)
    return max(1, min(r - 1, int(math.ceil(float(defense.rand_min_frac) * r))))


def draw_transforms(batch: int, out_size: int, min_size: int, generator: Optional[torch.Generator],
                    device) -> tuple[Tensor, Tensor]:
    """One resize-pad draw per sample: sizes [B] in [min_size, out_size), offsets [B, 2] (top, left)."""
    sizes = torch.randint(min_size, out_size, (batch,), generator=generator)
    u = torch.rand(batch, 2, generator=generator)
    offsets = torch.floor(u * (out_size - sizes + 1).unsqueeze(1).float()).long()
    return sizes.to(device), offsets.to(device)


def resize_pad_st(u: Tensor, out_size: int, min_size: int, sizes: Tensor, offsets: Tensor) -> Tensor:
    """Resize-pad u [B,3,S,S] with the given draws; straight-through when the op has no gradient."""
    y = random_resize_pad(u, out_size, min_size, sizes=sizes, offsets=offsets)[0]
    if u.requires_grad and not y.requires_grad:
        y = u + (y - u).detach()
    return y


class DefendedLoss:
    """``x -> [B]``: EOT-averaged recommender loss through the defence minus the detector hinge.

    Args:
        rec_loss: ``x_purified [B,3,S,S] -> [B]`` to maximise.
        defense: a ``Defense`` (``denoiser``, ``detector.embed``, ``threshold``,
            ``rand_min_frac``, ``image_size``).
        rand: attack OURS-rand (EOT over the resize-pad) instead of plain OURS.
        eot: draws per step (ignored without ``rand``).
        detect_weight: w; 0 drops the detector term (or when the defence has no detector).
        margin: m, target distance as a fraction of the threshold.
        max_images: bound on the transformed images held for the gradient at once (items x
            EOT draws per chunk, ``loss_and_grad``); None: all K draws in one graph.
            ``vars_fast.memory_budget.attack_images`` sizes it for the device.
    """

    def __init__(self, rec_loss: LossFn, defense, rand: bool = True, eot: int = 4, detect_weight: float = 1.0,
                 margin: float = 0.9, generator: Optional[torch.Generator] = None, max_images: Optional[int] = None):
        self.rec_loss, self.defense = rec_loss, defense
        self.max_images = None if max_images is None else max(1, int(max_images))
        self.rand, self.eot = bool(rand), max(1, int(eot)) if rand else 1
        self.detect_weight, self.margin = float(detect_weight), float(margin)
        self.generator = generator
        det = getattr(defense, "detector", None)
        self.use_detector = det is not None and self.detect_weight > 0 and math.isfinite(float(defense.threshold))

    def detector_penalty(self, x: Tensor, den: Tensor) -> Tensor:
        """relu(d(x) - m tau) / tau, [B]; d from the detector embeddings of x and D(x)."""
        det = self.defense.detector
        if hasattr(det, "distance"):  # the defence's own definition (unit-norm embeddings)
            d = det.distance(x, den).float()
        else:
            d = (det.embed(x) - det.embed(den)).float().norm(dim=1)
        tau = max(float(self.defense.threshold), 1e-8)
        return torch.relu(d - self.margin * tau) / tau

    def draws(self, batch: int, size: int, device) -> list[tuple[Tensor, Tensor]]:
        """The K resize-pad draws of one step, in the order the generator yields them."""
        lo = rand_min_size(self.defense)
        return [draw_transforms(batch, size, lo, self.generator, device) for _ in range(self.eot)]

    def _eot_loss(self, den: Tensor, draws: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Sum over ``draws`` of the recommender loss of the transformed ``den``, [B] (not yet / K)."""
        if not self.rand:
            return self.rec_loss(den).float()
        S, lo = den.shape[-1], rand_min_size(self.defense)
        loss = 0.0
        for sizes, offsets in draws:
            loss = loss + self.rec_loss(resize_pad_st(den, S, lo, sizes, offsets)).float()
        return loss

    def __call__(self, x: Tensor) -> Tensor:
        den = self.defense.denoiser(x)
        draws = self.draws(x.shape[0], x.shape[-1], x.device) if self.rand else [None]
        loss = self._eot_loss(den, draws) / len(draws)
        if self.use_detector:
            loss = loss - self.detect_weight * self.detector_penalty(x, den)
        return loss

    def loss_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(loss [B] detached, d loss.sum() / dx), holding at most ``max_images`` transformed
        images in the autograd graph at once.

        The gradient is taken in two stages: the EOT term's gradient with respect to the
        denoised images D(x) is accumulated over chunks of draws (each chunk's recommender graph
        is freed before the next is built), then pulled back through the denoiser (and the
        detector hinge) once. Same draws, same result as differentiating ``__call__`` up to
        float summation order; live images: B denoised + B x (draws per chunk)."""
        B = x.shape[0]
        per_chunk = self.eot if self.max_images is None else max(1, min(self.eot, self.max_images // max(B, 1)))
        if per_chunk >= self.eot:  # every draw fits: one graph, exactly as differentiating __call__
            return self._loss_and_grad_whole(x)
        draws = self.draws(B, x.shape[-1], x.device) if self.rand else [None]
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            den = self.defense.denoiser(xr)
            leaf = den.detach().requires_grad_(True)
            loss = torch.zeros(B, device=x.device, dtype=torch.float32)
            g_den = torch.zeros_like(leaf)
            for k in range(0, len(draws), per_chunk):
                part = _per_sample(self._eot_loss(leaf, draws[k:k + per_chunk]) / len(draws), B)
                (g,) = torch.autograd.grad(part.sum(), leaf)
                g_den += g
                loss += part.detach()
            objective = (den * g_den).sum()  # d/dx = J_D(x)^T g_den
            if self.use_detector:
                penalty = self.detect_weight * self.detector_penalty(xr, den)
                objective = objective - penalty.sum()
                loss -= penalty.detach()
            (grad,) = torch.autograd.grad(objective, xr)
        return loss, grad

    def _loss_and_grad_whole(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            loss = _per_sample(self(xr), x.shape[0])
            (grad,) = torch.autograd.grad(loss.float().sum(), xr)
        return loss.detach(), grad


def _per_sample(loss: Tensor, batch: int) -> Tensor:
    if loss.dim() != 1 or loss.shape[0] != batch:
        raise ValueError(f"rec_loss must return one loss per sample [B={batch}], got {tuple(loss.shape)}")
    return loss


class AdaptivePGD(PGD):
    """PGD on ``DefendedLoss``: ``AdaptivePGD(rec_loss, defense, eps, alpha=None, steps=10,
    eot=4, rand=True, detect_weight=1.0, margin=0.9, random_start=True, generator=None,
    max_images=None)(x)``.

    eps, alpha in pixel units; the result satisfies ||x_adv - x||_inf <= eps and lies in [0,1]
    (the projection is ``vars_fast.ops.pgd_step``, as for plain PGD). ``max_images`` bounds the
    EOT images in the graph at once (``DefendedLoss.loss_and_grad``); the caller bounds the
    items per call (``vars_fast.memory_budget.attack_images``).
    """

    def __init__(self, rec_loss: LossFn, defense, eps: float, alpha: float | None = None, steps: int = 10,
                 eot: int = 4, rand: bool = True, detect_weight: float = 1.0, margin: float = 0.9,
                 random_start: bool = True, generator: Optional[torch.Generator] = None,
                 max_images: Optional[int] = None):
        loss = DefendedLoss(rec_loss, defense, rand=rand, eot=eot, detect_weight=detect_weight,
                            margin=margin, generator=generator, max_images=max_images)
        super().__init__(loss, eps, alpha=alpha, steps=steps, random_start=random_start, generator=generator)

    def loss_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.loss_fn.loss_and_grad(x)


class UnflaggedLoss:
    """The attacker of a detector-gated platform (``detect+denoise``, ``detect+withhold``): an
    upload the detector does not flag reaches the recommender as it is, so the attacker hurts
    the raw image and stays under the threshold.

    The gradient is that of ``rec_loss(x) - w * relu(d(x) - m tau) / tau`` (the hinge of
    ``DefendedLoss``, without the denoiser in the recommender's path); the score it reports,
    which ``PGD(keep_best=True)`` keeps the best iterate by, is ``rec_loss(x)`` where the
    detector does not flag x (``d(x) <= tau``) and ``-inf`` where it does: the attack returns
    each image's most damaging unflagged iterate (its start when none is unflagged).
    """

    def __init__(self, rec_loss: LossFn, defense, detect_weight: float = 1.0, margin: float = 0.9):
        self.rec_loss, self.defense = rec_loss, defense
        self.detect_weight, self.margin = float(detect_weight), float(margin)
        self.tau = float(defense.threshold)

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(recommender loss of the raw x, detector distance d(x, D(x))), both [B]."""
        d = self.defense.detector.distance(x, self.defense.denoiser(x)).float()
        return _per_sample(self.rec_loss(x).float(), x.shape[0]), d

    def _score(self, loss: Tensor, d: Tensor) -> Tensor:
        return torch.where(d <= self.tau, loss, torch.full_like(loss, -math.inf))

    def __call__(self, x: Tensor) -> Tensor:
        loss, d = self._parts(x)
        return self._score(loss, d).detach()

    def loss_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tau = max(self.tau, 1e-8)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            loss, d = self._parts(xr)
            objective = loss - self.detect_weight * torch.relu(d - self.margin * tau) / tau
            (grad,) = torch.autograd.grad(objective.sum(), xr)
        return self._score(loss.detach(), d.detach()), grad
