"""``Addition``: ADDITION's detector for item images (the package docstring has the method),
its ``defense.addition`` config check and its checkpoint.

Checkpoint (``save`` / ``load``; atomic, loads with ``weights_only=True``)::

    {"format": "vars_fast.addition/1", "noise": {"kwargs", "state_dict"},
     "denoiser": {"kwargs", "state_dict"}, "users": [...], "change": float,
     "threshold": float, "extra": {...}}
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from vars_fast.attacks.base import frozen
from vars_fast.config import ConfigError
from vars_fast.defense.addition.fit import train_addition
from vars_fast.defense.addition.networks import NoiseLevelNet, NoiseReducer, relative_change
from vars_fast.io import load_checkpoint, pack_module, save_checkpoint
from vars_fast.metrics import choose_threshold
from vars_fast.registry import DEFENSES
from vars_fast.utils import to_float

FORMAT = "vars_fast.addition/1"


@DEFENSES.register("addition", label="ADDITION", baseline=True,
                   thresholds={"criterion": "the paper's 20% score-change criterion"})
class Addition:
    """ADDITION detector for item images (module docstring).

    Args:
        rec: a trained recommender (``encode`` images -> features, ``score``).
        users: LongTensor [U], the users whose scores the criterion compares.
        noise_net, denoiser: the two modules (fresh ones for ``fit``, or loaded).
        change: the paper's criterion; flag when ``Delta(A(x), x) > change`` (0.2 = 20%).
        threshold: a threshold chosen on validation data (``choose_threshold``); NaN until then.
        seed: seeds the injected noise; each call of ``process`` draws it afresh from this seed,
            so an image's result does not depend on what was processed before.
    """

    def __init__(self, rec, users: Tensor, noise_net: NoiseLevelNet, denoiser: NoiseReducer,
                 change: float = 0.2, threshold: float = float("nan"), seed: int = 0,
                 extra: Optional[dict] = None):
        if not change > 0:
            raise ValueError(f"ADDITION criterion: change must be > 0 (got {change})")
        self.rec = rec
        self.users = torch.as_tensor(users, dtype=torch.long).flatten()
        if self.users.numel() == 0:
            raise ValueError("ADDITION needs at least one user to compare scores over")
        self.noise_net, self.denoiser = noise_net.eval(), denoiser.eval()
        self.change, self.threshold, self.seed = float(change), float(threshold), int(seed)
        self.extra = dict(extra or {})

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "Addition":
        self.noise_net.to(device)
        self.denoiser.to(device)
        return self

    # ------------------------------------------------------------------ the pipeline
    def scores(self, x: Tensor, items: Tensor, feats: Optional[Tensor] = None) -> Tensor:
        """Scores [B, U] of the users for items ``items`` [B] shown with images x [B,3,S,S]
        (``feats``: their ``rec.encode`` features, when already computed). Differentiable in x."""
        f = self.rec.encode(x) if feats is None else feats
        users = self.users.to(f.device)
        U, B = users.shape[0], f.shape[0]
        it = items.to(f.device).long().view(1, B).expand(U, B)
        return self.rec.score(users, it, visual=f.unsqueeze(0).expand(U, B, f.shape[-1])).float().t()

    def noise_level(self, x: Tensor, feats: Optional[Tensor] = None) -> Tensor:
        """Stage 1's per-image noise level sigma(x) [B] (features taken without gradient)."""
        if feats is None:
            with torch.no_grad():
                feats = self.rec.encode(x)
        return self.noise_net(feats.detach())

    def _noise(self, x: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(x.shape, generator=g).to(x)

    def process(self, x: Tensor, feats: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """A(x): inject the image-dependent noise, reduce it -> (A(x) [B,3,S,S] in [0,1], sigma [B])."""
        sigma = self.noise_level(x, feats)
        z = (x + sigma.view(-1, 1, 1, 1) * self._noise(x)).clamp(0.0, 1.0)
        return self.denoiser(z, sigma).clamp(0.0, 1.0), sigma

    @torch.no_grad()
    def score_change(self, x: Tensor, items: Tensor) -> Tensor:
        """Delta(A(x), x) [B]: relative change of the users' scores after ADDITION's processing."""
        x = x.to(self.device).float()
        f = self.rec.encode(x)
        x2, _ = self.process(x, f)
        return relative_change(self.scores(x2, items), self.scores(x, items, feats=f))

    def detect(self, x: Tensor, items: Tensor, threshold: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """(score change [B], flagged bool [B]); flagged when the change exceeds ``threshold``
        (default: the paper's criterion ``change``)."""
        c = self.score_change(x, items)
        return c, c > (self.change if threshold is None else float(threshold))

    @torch.no_grad()
    def score_change_all(self, images: Tensor, items: Tensor, batch_size: int = 64) -> Tensor:
        """``score_change`` over uint8 or float images [N,3,S,S] in batches -> [N] on CPU."""
        out = []
        for s in range(0, images.shape[0], batch_size):
            x = to_float(images[s:s + batch_size], self.device)
            out.append(self.score_change(x, items[s:s + batch_size]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def choose_threshold(self, c_clean: Tensor, c_adv: Tensor, rule: str = "youden") -> float:
        """Set and return ``threshold`` from validation score changes (clean vs adversarial),
        by ``vars_fast.metrics.choose_threshold`` (the rule the project's detector uses)."""
        self.threshold = float(choose_threshold(c_clean, c_adv, rule=rule))
        return self.threshold

    # ------------------------------------------------------------------ training
    def fit(self, cat, items: Sequence[int], cfg, generator: torch.Generator, *, log=None,
            batch_size: Optional[int] = None) -> dict:
        """Train both modules on ``items`` (training items) of catalogue ``cat``; ``cfg`` is the
        ``AdditionConfig`` (``defense.addition``). Returns the training history (also kept in
        ``extra["history"]``): per-epoch mean losses and the seconds each part took."""
        check_config(cfg)
        items = torch.as_tensor(list(items), dtype=torch.long)
        if items.numel() < 2:
            raise ValueError(f"ADDITION.fit: need at least 2 training items (got {items.numel()})")
        # the recommender is only differentiated through, never updated
        with frozen(self.rec, getattr(self.rec, "backbone", None)):
            return train_addition(self, cat, items, cfg, generator, log, int(batch_size or cfg.batch_size))

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, extra: Optional[dict] = None) -> None:
        """Atomic save of both modules, the users, the criterion and the chosen threshold."""
        save_checkpoint({"format": FORMAT, "noise": pack_module(self.noise_net),
                         "denoiser": pack_module(self.denoiser),
                         "users": self.users.tolist(), "change": self.change, "threshold": self.threshold,
                         "seed": self.seed, "extra": {**self.extra, **(extra or {})}}, path)

    @classmethod
    def load(cls, path: str | Path, rec, device: torch.device | str = "cpu") -> "Addition":
        """Rebuild a saved ADDITION around the recommender ``rec`` (weights_only load)."""
        ck = load_checkpoint(path)
        if not isinstance(ck, dict) or ck.get("format") != FORMAT:
            raise ValueError(f"{path}: not an ADDITION checkpoint (format {FORMAT!r} expected)")
        noise = NoiseLevelNet(**ck["noise"]["kwargs"])
        noise.load_state_dict(ck["noise"]["state_dict"])
        den = NoiseReducer(**ck["denoiser"]["kwargs"])
        den.load_state_dict(ck["denoiser"]["state_dict"])
        add = cls(rec, torch.tensor(ck["users"], dtype=torch.long), noise.requires_grad_(False),
                  den.requires_grad_(False), change=ck["change"], threshold=ck["threshold"], seed=ck["seed"],
                  extra=ck.get("extra"))
        return add.to(device)


def check_config(cfg) -> None:
    """The ``defense.addition`` fields ADDITION reads (an ``AdditionConfig``); a ConfigError
    names the bad key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"defense.addition.{key}: {msg} (got {getattr(cfg, key)!r})")

    need(0.0 <= cfg.sigma_min < cfg.sigma_max <= 1.0, "sigma_max", "need 0 <= sigma_min < sigma_max <= 1")
    need(len(cfg.train_eps) > 0 and all(float(e) > 0 for e in cfg.train_eps),
         "train_eps", "must be a non-empty list of positive /255 radii")
    for key in ("width", "hidden", "batch_size", "triples_per_item"):
        need(int(getattr(cfg, key)) >= 1, key, "must be >= 1")
    need(int(cfg.depth) >= 2, "depth", "must be >= 2")
    for key in ("denoiser_epochs", "noise_epochs"):
        need(int(getattr(cfg, key)) >= 0, key, "must be >= 0")
    for key in ("lr", "lambda_score", "lambda_sigma"):
        need(float(getattr(cfg, key)) >= 0 and math.isfinite(float(getattr(cfg, key))), key, "must be finite and >= 0")


def build_addition(rec, users: Tensor, cfg, change: float = 0.2, seed: int = 0, device="cpu") -> Addition:
    """A fresh (untrained) ADDITION for ``rec`` from the ``defense.addition.*`` fields."""
    check_config(cfg)
    with torch.no_grad():
        fdim = int(rec.encode(torch.zeros(1, 3, 32, 32, device=rec.device)).shape[-1])
    noise = NoiseLevelNet(fdim, int(cfg.hidden), float(cfg.sigma_min), float(cfg.sigma_max))
    den = NoiseReducer(int(cfg.width), int(cfg.depth))
    return Addition(rec, users, noise, den, change=change, seed=seed).to(device)
