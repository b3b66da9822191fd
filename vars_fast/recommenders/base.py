"""The recommender interface (Cornac style: construct, ``fit``, ``score``) and the BPR training loop.

Every model scores ``ŷ_ui`` for users ``[B]`` against items ``[B]`` or candidate lists
``[B, C]``. Visual models read their item representation from ``item_visual`` (the clean
catalogue, ``[N, F]``) unless a ``visual`` tensor is passed in, which is how attacks and
defences inject features of perturbed or denoised images (``score`` is differentiable in it).

Training (Rendle et al. 2009, Eq. 1-2 of the paper): each epoch draws one triple (u, i, j)
per training interaction with ``Catalogue.sample_triples`` from a seeded generator; Adam on
mean ``-ln σ(ŷ_ui - ŷ_uj)`` plus λ_Θ‖·‖² on the embedding rows the batch touches (and the
shared dense weights once per batch); lr for ``lr_drop_frac`` of the epochs, then ``lr_low``.
Every global batch goes through ``ddp.shard`` and gradients through ``ddp.sync_grads``, so
the same loop runs under torchrun.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.distributed import ddp
from vars_fast.utils import progress as progress_bar


class Recommender(nn.Module):
    """Base class. Subclasses set ``name``/``uses_images`` and implement ``_score``."""

    name = "base"
    uses_images = False

    def __init__(self, n_users: int, n_items: int, **kwargs):
        super().__init__()
        self.n_users, self.n_items = int(n_users), int(n_items)
        # constructor kwargs, stored in checkpoints (numbers / str / bool only: weights_only load)
        self.kwargs = {"n_users": self.n_users, "n_items": self.n_items, **kwargs}
        # not persistent: saved explicitly as "item_visual" (it is data, not a parameter)
        self.register_buffer("item_visual", None, persistent=False)

    @property
    def device(self) -> torch.device:
        t = next(itertools.chain(self.parameters(), self.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    def set_item_visual(self, feats: Optional[Tensor]) -> None:
        """Cache the clean catalogue's visual representation ``[N, F]`` (detached)."""
        self.item_visual = None if feats is None else feats.detach().to(self.device, torch.float32)

    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B,3,S,S]`` in [0,1] -> visual representation ``[B, F]`` (differentiable)."""
        raise NotImplementedError(f"{self.name} does not use images")

    def _visual(self, items: Tensor, visual: Optional[Tensor]) -> Optional[Tensor]:
        if not self.uses_images:
            return None
        if visual is not None:
            return visual
        if self.item_visual is None:
            raise RuntimeError(f"{self.name}: item_visual is not set (call set_item_visual or fit first)")
        return self.item_visual[items]

    def score(self, users: Tensor, items: Tensor, visual: Optional[Tensor] = None) -> Tensor:
        """ŷ for users ``[B]`` and items ``[B]`` or ``[B, C]``; ``visual`` shaped ``items.shape + (F,)``."""
        if items.dim() == 2:
            users = users[:, None].expand_as(items)
        return self._score(users, items, self._visual(items, visual))

    def _score(self, users: Tensor, items: Tensor, visual: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def score_catalogue(self, users: Tensor, items: Tensor, visual_all: Optional[Tensor] = None) -> Tensor:
        """Like ``score`` but ``visual_all`` is a whole-catalogue [N, F] table that ``items`` index
        (None: ``item_visual``). Models override it to project each item once, not per (user, item)."""
        if visual_all is None or not self.uses_images:
            return self.score(users, items)
        return self.score(users, items, visual_all[items])

    def reg(self, triples: Tensor) -> Tensor:
        """λ_Θ‖Θ‖² on what the batch touches (subclasses); 0 for parameter-free models."""
        return triples.new_zeros((), dtype=torch.float32)


def bpr_loss(rec: Recommender, triples: Tensor, visual_i: Optional[Tensor] = None,
             visual_j: Optional[Tensor] = None) -> Tensor:
    """Mean of ``-ln σ(ŷ_ui - ŷ_uj)`` over triples ``[B, 3]`` (Eq. 2 without the L2 term)."""
    u, i, j = triples.unbind(1)
    return F.softplus(rec.score(u, j, visual_j) - rec.score(u, i, visual_i)).mean()


def sq(*ts: Tensor) -> Tensor:
    """Sum over the last dim of squares, summed over the given tensors: per-row ‖·‖² [B]."""
    return sum(t.pow(2).sum(-1) if t.dim() > 1 else t.pow(2) for t in ts)


def train_bpr(model: nn.Module, cat, loss_fn: Callable[[Tensor], Tensor], *, epochs: int, lr: float,
              lr_low: float, lr_drop_frac: float, batch_size: int, generator: torch.Generator,
              params=None, desc: str = "train", show_progress: bool = True, log=None,
              threads: int = 0) -> list[float]:
    """The shared BPR loop; ``loss_fn(triples [b,3] on the model's device) -> scalar``.

    Returns the mean loss of each epoch. Deterministic given ``generator`` (and the model's init).
    ``threads > 0`` caps torch's CPU threads for the loop (restored afterwards).
    """
    with cpu_threads(threads):
        return _train_bpr(model, cat, loss_fn, epochs, lr, lr_low, lr_drop_frac, batch_size, generator,
                          params, desc, show_progress, log)


@contextlib.contextmanager
def cpu_threads(n: int):
    """Temporarily ``torch.set_num_threads(n)`` (n <= 0: leave it).

    NOTE: the embedding models' ops are tiny ([1024, 64] gathers, a [700, 1280] x [1280, 64]
    matmul); on a busy 2-core machine two OpenMP threads made a BPR step 30x slower
    (1.14 s vs 0.036 s measured, load average 17), because every op waits for the other thread.
    """
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train_bpr(model, cat, loss_fn, epochs, lr, lr_low, lr_drop_frac, batch_size, generator, params, desc,
               show_progress, log) -> list[float]:
    device = next(model.parameters()).device
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    n = int(cat.train.shape[0])
    drop_at = math.ceil(lr_drop_frac * epochs)
    history: list[float] = []
    bar = progress_bar(range(epochs), desc=desc, total=epochs, enabled=show_progress, unit="epoch")
    model.train()
    for epoch in bar:
        for g in opt.param_groups:
            g["lr"] = lr if epoch < drop_at else lr_low
        triples = cat.sample_triples(n, generator).to(device)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            local = ddp.shard(triples[start:start + batch_size])
            if local.numel() == 0:
                continue
            loss = loss_fn(local)
            opt.zero_grad(set_to_none=False)  # zeros, not None: every rank all-reduces every grad
            loss.backward()
            ddp.sync_grads(model, n_local=local.shape[0])
            opt.step()
            total += float(loss.detach()) * local.shape[0]
            count += local.shape[0]
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}", lr=opt.param_groups[0]["lr"])
        if log is not None and (epoch == epochs - 1 or epoch % max(1, epochs // 4) == 0):
            log.info("%s epoch %d/%d loss %.4f", desc, epoch + 1, epochs, history[-1])
    model.eval()
    return history


@torch.no_grad()
def batched_encode(fn: Callable[[Tensor], Tensor], images_uint8: Tensor, batch_size: int = 128,
                   device: torch.device | str = "cpu", show_progress: bool = True, desc: str = "encode",
                   channels_last: bool = False) -> Tensor:
    """Apply ``fn`` to uint8 images ``[N,3,S,S]`` in batches (as floats in [0,1]) -> ``[N, F]`` on CPU."""
    out = []
    n = images_uint8.shape[0]
    for s in progress_bar(range(0, n, batch_size), desc=desc, total=math.ceil(n / batch_size),
                          enabled=show_progress, unit="batch"):
        x = images_uint8[s:s + batch_size].to(device).float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(fn(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def encode_catalogue(rec: Recommender, images_uint8: Tensor, batch_size: int = 128,
                     device: torch.device | str | None = None, progress: bool = True) -> Tensor:
    """``rec.encode`` over a whole uint8 catalogue ``[N,3,S,S]`` -> ``[N, F]`` float32 on CPU."""
    was_training = rec.training
    rec.eval()
    out = batched_encode(rec.encode, images_uint8, batch_size, device or rec.device, progress,
                         desc=f"encode {rec.name}")
    rec.train(was_training)
    return out
