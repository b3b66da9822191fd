"""The recommender interface (Cornac style: construct, ``fit``, ``score``) and the BPR training loop.

Every model scores ``ŷ_ui`` for users ``[B]`` against items ``[B]`` or candidate lists
``[B, C]``. Visual models read their item representation from ``item_visual`` (the clean
catalogue, ``[N, F]``) unless a ``visual`` tensor is passed in, which is how attacks and
defences inject features of perturbed or denoised images (``score`` is differentiable in it).

Training (Rendle et al. 2009, Eq. 1-2 of the paper): each epoch draws one triple (u, i, j)
per training interaction with ``Catalogue.sample_triples`` from a seeded generator; Adam on
mean ``-ln σ(ŷ_ui - ŷ_uj)`` plus λ_Θ‖·‖² on the embedding rows the batch touches (and the
shared dense weights once per batch). Every global batch goes through ``ddp.shard`` and
gradients through ``ddp.sync_grads``, so the same loop runs under torchrun.

How long to train comes from the data, not from a fixed epoch count: with a ``Holdout``
(one interaction per user carved from the *training* interactions, never the test split,
ranked against items that are not training positives of the user), the loop validates
after every epoch, trains at ``lr`` until the holdout's AUC stops improving for ``patience`` epochs,
drops to ``lr_low`` from the best weights so far and stops at the next plateau (or at
``epochs``), then restores the best weights. Without a holdout it is the paper's schedule:
``lr`` for ``lr_drop_frac`` of the epochs, then ``lr_low``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.data import Catalogue
from vars_fast.distributed import ddp
from vars_fast.utils import progress as progress_bar


class Recommender(nn.Module):
    """Base class. Subclasses set ``name``/``uses_images``, implement ``_score`` and
    ``from_config``, and register in ``RECOMMENDERS`` (``recommender.models``)."""

    name = "base"
    uses_images = False
    # scores from precomputed backbone features f_i (VBPR, AMR): sized by feature_dim, fitted with features=
    uses_features = False
    selectable = False  # trained by fit_bpr: per-catalogue selection applies (recommenders/selection.py)
    base: Optional[str] = None  # the model this one fine-tunes (AMR: VBPR), trained before it (from_trained)
    train_order = 100  # the recommender stage trains models in increasing train_order

    @classmethod
    def from_config(cls, n_users: int, n_items: int, rc, backbone: Optional[nn.Module] = None,
                    feature_dim: Optional[int] = None) -> "Recommender":
        """An untrained model from a ``RecommenderConfig`` (``build_recommender`` seeds it)."""
        raise NotImplementedError(f"{cls.name} cannot be built from a config")

    @classmethod
    def from_trained(cls, base: "Recommender", rc) -> "Recommender":
        """A model that starts from the trained ``base`` model (``cls.base``)."""
        raise NotImplementedError(f"{cls.name} does not start from a trained model")

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


@dataclass
class Holdout:
    """Validation interactions carved from the training interactions (never the test split).

    ``train`` [T - V, 2] is what the model trains on; ``users`` [V] / ``items`` [V] are the
    held-out pairs, each ranked against ``negatives`` [V, C], items that are not training
    positives of the user (the test item may be among them: the split is not looked at).
    """
    train: Tensor
    users: Tensor
    items: Tensor
    negatives: Tensor

    @torch.no_grad()
    def per_user(self, model: "Recommender", metric: str = "auc") -> Tensor:
        """[V] per held-out pair: ``auc``, the share of negatives scored below the positive (ties
        half); ``mrr``, 1 / (1 + rank) with ties against the positive, as the test's HR@N counts.

        NOTE: AUC is the smooth stopping signal (NDCG@10 of 600 held-out items moves by ~0.01
        between epochs from noise alone, docs/results/recommender_tuning.md). On the longtail
        preset it also followed the test's HR@10 best over epochs and settings; MRR, dominated
        by the first few ranks, did not (docs/results/longtail.md)."""
        was_training = model.training
        model.eval()
        dev = model.device
        s = model.score_catalogue(self.users.to(dev), self.candidates().to(dev)).float().cpu()
        model.train(was_training)
        return _per_user(s, metric)

    def candidates(self) -> Tensor:
        """[V, 1 + C]: each held-out item, then its negatives."""
        return torch.cat([self.items[:, None], self.negatives], 1)

    def popularity(self, fold: "TrainFold", metric: str = "auc") -> float:
        """The score of ranking by the fold's purchase counts: the floor a model must clear."""
        counts = torch.bincount(fold.train[:, 1], minlength=fold.n_items).float()
        return float(_per_user(counts[self.candidates()], metric).mean())

    def score(self, model: "Recommender", metric: str = "auc") -> float:
        return float(self.per_user(model, metric).mean())

    def auc(self, model: "Recommender") -> float:
        return self.score(model, "auc")

    def chance(self, metric: str) -> tuple[float, float]:
        """(value of a random scorer, its standard error over these held-out pairs)."""
        c, v = self.negatives.shape[1] + 1, max(1, len(self.users))
        if metric == "auc":  # a uniform rank: mean 1/2, per-pair sd ~ 1/sqrt(12)
            return 0.5, (1.0 / 12.0) ** 0.5 / v ** 0.5
        r = 1.0 / torch.arange(1, c + 1, dtype=torch.float64)
        return float(r.mean()), float(r.std()) / v ** 0.5


def _per_user(s: Tensor, metric: str) -> Tensor:
    """Scores [V, 1 + C] (the positive first) -> the per-pair metric [V] (``Holdout.per_user``)."""
    pos, neg = s[:, :1], s[:, 1:]
    if metric == "auc":
        return ((neg < pos).float() + 0.5 * (neg == pos).float()).mean(1)
    if metric == "mrr":
        return 1.0 / (1.0 + (neg >= pos).sum(1).float())
    raise ValueError(f"recommender.val_metric: unknown metric {metric!r} (auc | mrr)")


class TrainFold:
    """What the training loop sees of a catalogue: the training pairs minus a holdout, the
    images, and the *full* training-positive set for negative sampling (a held-out item is
    never drawn as a negative of its user). It has no test items and no test negatives."""

    sample_triples = Catalogue.sample_triples  # reads only .train, .n_items, .is_train_positive

    def __init__(self, cat, train: Tensor):
        self.n_users, self.n_items, self.train = int(cat.n_users), int(cat.n_items), train
        self.images, self.item_batch, self.is_train_positive = cat.images, cat.item_batch, cat.is_train_positive


def holdout_split(cat, n_negatives: int, generator: torch.Generator, min_train: int = 3) -> tuple[TrainFold, Holdout]:
    """``(fold, holdout)``: one training interaction of each user with ``>= min_train`` of them
    is held out and ranked against ``n_negatives`` items that are not training positives of
    the user; ``fold`` trains on the rest. Reads ``cat.train`` (and images for the fold), never
    the test split."""
    train = cat.train
    counts = torch.bincount(train[:, 0], minlength=int(cat.n_users))
    order = torch.argsort(train[:, 0], stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    users = torch.nonzero(counts >= min_train).flatten()
    pick = order[offsets[users] + (torch.rand(len(users), generator=generator) * counts[users]).long()]
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[pick] = False
    fold = TrainFold(cat, train[keep])
    negatives = torch.randint(0, fold.n_items, (len(users), n_negatives), generator=generator)
    for _ in range(1000):
        bad = cat.is_train_positive(users[:, None].expand_as(negatives), negatives)
        nb = int(bad.sum())
        if nb == 0:
            break
        negatives[bad] = torch.randint(0, fold.n_items, (nb,), generator=generator)
    else:
        raise RuntimeError("holdout_split: could not sample validation negatives (a user has most items)")
    return fold, Holdout(train=fold.train, users=users, items=train[pick, 1], negatives=negatives)


def fit_bpr(model: "Recommender", cat, cfg, loss_fn: Callable[[Tensor], Tensor], generator: torch.Generator, *,
            epochs: int, lr: float, lr_low: float, batch_size: int, show_progress: bool = True, log=None,
            params=None, holdout: Optional[tuple["TrainFold", Holdout]] = None,
            record: Optional[dict] = None) -> list[float]:
    """``train_bpr`` with the config's stopping rule: early stopping on a training holdout when
    ``cfg.early_stopping`` (``cfg.epochs`` is then a cap), else the fixed schedule.

    ``holdout``: a ``(fold, holdout)`` pair to use instead of carving one (model selection
    gives every trial the same one); ``record`` receives the validation curve (``train_bpr``).
    When the best validation score is within noise of a random scorer's (``Holdout.chance``),
    the holdout cannot tell a trained model from an untrained one: the weights go back to
    their initial values and train on every training pair with the fixed schedule instead of
    keeping an epoch picked by noise (on a long-tail catalogue BPR's holdout AUC peaks at
    chance in epoch 2, docs/results/longtail.md)."""
    kw = dict(loss_fn=loss_fn, lr=lr, lr_low=lr_low, batch_size=batch_size, params=params, desc=model.name,
              show_progress=show_progress, log=log, threads=cfg.threads)
    if not cfg.early_stopping:
        return train_bpr(model, cat, epochs=epochs, lr_drop_frac=cfg.lr_drop_frac, generator=generator, **kw)
    start = generator.get_state()  # a fallback trains exactly what the fixed schedule would
    fold, val = holdout if holdout is not None else holdout_split(cat, cfg.val_negatives, generator)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    record = {} if record is None else record
    metric = cfg.val_metric
    hist = train_bpr(model, fold, epochs=epochs, lr_drop_frac=cfg.lr_drop_frac, generator=generator,
                     validate=lambda: val.score(model, metric), patience=cfg.patience, record=record, **kw)
    chance, se = val.chance(metric)
    record.update(metric=metric, chance=chance, informative=bool(record["best"] > chance + 3 * se),
                  popularity=val.popularity(fold, metric))
    model.fit_record = record  # the stage compares it with popularity (recommenders/stage.py)
    if record["informative"] or holdout is not None:  # a selection trial: the caller decides
        return hist
    if log is not None:
        log.warning("%s: the holdout cannot rank it (best val %s %.4f, a random scorer %.4f ± %.4f): trained "
                    "with the fixed schedule (%d epochs) instead of early stopping on noise", model.name,
                    metric.upper(), record["best"], chance, se, epochs)
    model.load_state_dict(init)
    generator.set_state(start)
    record["fallback"] = "fixed schedule"
    return train_bpr(model, cat, epochs=epochs, lr_drop_frac=cfg.lr_drop_frac, generator=generator, **kw)


def train_bpr(model: nn.Module, cat, loss_fn: Callable[[Tensor], Tensor], *, epochs: int, lr: float,
              lr_low: float, lr_drop_frac: float, batch_size: int, generator: torch.Generator,
              params=None, desc: str = "train", show_progress: bool = True, log=None,
              threads: int = 0, validate: Optional[Callable[[], float]] = None, patience: int = 3,
              record: Optional[dict] = None) -> list[float]:
    """The shared BPR loop; ``loss_fn(triples [b,3] on the model's device) -> scalar``.

    ``validate() -> float`` (higher is better; computed from training data only) switches on
    early stopping (see the module docstring); ``lr_drop_frac`` is then unused. Returns the
    mean loss of each epoch run. Deterministic given ``generator`` (and the model's init).
    ``threads > 0`` caps torch's CPU threads for the loop (restored afterwards). ``record``
    (with ``validate``) receives ``val`` (the score after each epoch), ``best``,
    ``best_epoch`` and ``drop_epoch`` (0-based; the first epoch at ``lr_low``, None if none).
    """
    with cpu_threads(threads):
        return _train_bpr(model, cat, loss_fn, epochs, lr, lr_low, lr_drop_frac, batch_size, generator,
                          params, desc, show_progress, log, validate, patience, record)


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


class _Plateau:
    """Early stopping with one learning-rate drop: ``step(score)`` -> "keep" | "drop" | "stop"."""

    def __init__(self, patience: int, can_drop: bool):
        self.patience, self.can_drop = max(1, int(patience)), can_drop
        self.best, self.best_epoch, self.best_state, self.stale = -math.inf, -1, None, 0

    def step(self, score: float, epoch: int, model: nn.Module) -> str:
        if score > self.best:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return "keep"
        self.stale += 1
        if self.stale < self.patience:
            return "keep"
        self.stale = 0
        if self.can_drop:
            self.can_drop = False
            return "drop"
        return "stop"


def _train_bpr(model, cat, loss_fn, epochs, lr, lr_low, lr_drop_frac, batch_size, generator, params, desc,
               show_progress, log, validate=None, patience=3, record=None) -> list[float]:
    device = next(model.parameters()).device
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    # fused: one kernel per step over every tensor instead of a handful of foreach passes (-20 to
    # -30% of a VBPR step on the sparse preset, docs/results/recommender_tuning.md); same update
    # to rounding
    opt = torch.optim.Adam(params, lr=lr, fused=all(p.device.type in ("cpu", "cuda") for p in params))
    n = int(cat.train.shape[0])
    drop_at = math.ceil(lr_drop_frac * epochs) if validate is None else epochs
    plateau = _Plateau(patience, can_drop=lr_low < lr) if validate is not None else None
    cur_lr, distributed = lr, ddp.is_distributed()
    history: list[float] = []
    curve: list[float] = []
    drop_epoch = None
    bar = progress_bar(range(epochs), desc=desc, total=epochs, enabled=show_progress, unit="epoch")
    model.train()
    for epoch in bar:
        if epoch == drop_at:
            cur_lr = lr_low
        for g in opt.param_groups:
            g["lr"] = cur_lr
        triples = cat.sample_triples(n, generator).to(device)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            local = ddp.shard(triples[start:start + batch_size])
            if local.numel() == 0:
                continue
            loss = loss_fn(local)
            opt.zero_grad(set_to_none=not distributed)  # zeros, not None: every rank all-reduces every grad
            loss.backward()
            ddp.sync_grads(model, n_local=local.shape[0])
            opt.step()
            total += float(loss.detach()) * local.shape[0]
            count += local.shape[0]
        history.append(total / max(count, 1))
        action, score = "keep", None
        if plateau is not None:
            score = validate()  # identical on every rank: the weights are identical after sync
            curve.append(score)
            action = plateau.step(score, epoch, model)
            if action == "drop":
                cur_lr, drop_epoch = lr_low, epoch + 1
        bar.set_postfix(loss=f"{history[-1]:.4f}", lr=cur_lr, **({} if score is None else {"val": f"{score:.4f}"}))
        last = action == "stop" or epoch == epochs - 1
        if log is not None and (last or action == "drop" or epoch % max(1, epochs // 4) == 0):
            log.info("%s epoch %d/%d loss %.4f%s", desc, epoch + 1, epochs, history[-1],
                     "" if score is None else f" val {score:.4f}" + (" (lr drop)" if action == "drop" else ""))
        if action == "stop":
            break
    if plateau is not None and plateau.best_state is not None:
        model.load_state_dict(plateau.best_state)
        if log is not None:
            log.info("%s: best val score %.4f at epoch %d of %d", desc, plateau.best, plateau.best_epoch + 1,
                     len(history))
    if record is not None and plateau is not None:
        record.update(val=curve, best=plateau.best, best_epoch=plateau.best_epoch, drop_epoch=drop_epoch)
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
