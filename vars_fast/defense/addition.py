"""ADDITION (Wang et al., 2023, "ADDITION: Detecting Adversarial Examples With Image-Dependent
Noise Reduction", IEEE TDSC), adapted to a visually-aware recommender as in the paper's Table 4:
the detection baseline our detector is compared with.

ADDITION processes an input image in two trained stages and flags it when the model's output
changes too much between the image and its processed version:

1. **Noise injection.** A noise-level network ``N_phi`` reads the image's deep features and
   predicts a per-image Gaussian noise level, bounded to ``[sigma_min, sigma_max]``:
   ``sigma(x) = sigma_min + (sigma_max - sigma_min) * sigmoid(MLP((f(x) - mu) / s))``, with
   ``f`` the recommender's own image encoder (EfficientNet-Lite0 pooled features by default)
   and ``mu``/``s`` fitted on the clean training items. The injected image is
   ``z = clip(x + sigma(x) * n)``, ``n ~ N(0, I)``: noise strong enough to drown an adversarial
   perturbation, as weak as the image allows so that its details survive.
2. **Noise reduction.** A denoiser ``D_theta(z, sigma)`` removes the *total* noise (injected +
   adversarial) and returns an estimate of the benign image: ``A(x) = clip(D(z, sigma(x)))``.
   It is FFDNet-like (the noise level enters as a constant input map, the image is
   pixel-unshuffled 2x so that a few 3x3 conv layers see a wide context, the network predicts
   the residual noise); ``defense.addition.width`` x ``defense.addition.depth`` (48 x 5, 73k
   parameters) is small next to FFDNet/DnCNN-sized denoisers, to fit the 2-core default run.

The recommender criterion (the paper's Sec. 4.5): with ``s_u(x)`` user u's score of the item
when the item's image is x, over a fixed seeded set of users U,

    Delta(x', x) = sum_u |s_u(x') - s_u(x)| / sum_u |s_u(x)|        (relative L1 change)

and x is flagged when ``Delta(A(x), x) > change`` (0.2: "more than 20%"). The continuous
``Delta(A(x), x)`` is also the score of a ROC curve, and ``choose_threshold`` picks a
threshold on validation items by the rule the project uses for its own detector.

The losses below are this project's formulation of the two stages as the VARS paper describes
them; ADDITION's own text was not available to check them against (docs/results/addition.md,
which also holds the measurements behind the ``defense.addition.*`` defaults).

Training (``Addition.fit``), on the training items only, with adversarial training examples
x_adv made by the project's FGSM on the training-triple objective (``attacks.untargeted``) at
``defense.addition.train_eps``; every image view x~ is the clean x or its x_adv:

* stage 1, the denoiser, at noise levels drawn uniformly from the configured range:
  ``L_D = E ||D(clip(x~ + sigma n), sigma) - x||_1 + lambda_s E Delta(D(...), x)``
  (pixel reconstruction of the *clean* image, plus the recommender-guided term: the denoised
  view must score as the clean image does);
* stage 2, the noise-level network, with the noise reparameterised so that the loss is
  differentiable in sigma:
  ``L_N = E Delta(D(clip(x~ + sigma(x~) n), sigma(x~)), x) + lambda_sigma E (sigma(x~) - sigma_min) / (sigma_max - sigma_min)``.
  On a clean x, more noise only loses detail; on an x_adv, more noise drowns the perturbation:
  the network learns an image-dependent trade-off, and the second term prefers the smallest
  noise that is enough. With ``defense.addition.joint`` the denoiser keeps training in this
  stage on ``L_D`` at the predicted levels (``L_N`` plus the pixel term, over both networks):
  stage 1 asks D to remove an adversarial perturbation at *every* level, including the small
  ones that clean images end up with, which makes it smooth clean images too; at the
  predicted levels it can leave small-sigma (clean) inputs alone.

Checkpoint (``save`` / ``load``; atomic, loads with ``weights_only=True``)::

    {"format": "vars_fast.addition/1", "noise": {"kwargs", "state_dict"},
     "denoiser": {"kwargs", "state_dict"}, "users": [...], "change": float,
     "threshold": float, "extra": {...}}
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.registry import DEFENSES

FORMAT = "vars_fast.addition/1"


class NoiseLevelNet(nn.Module):
    """Noise-injection module: deep image features [B, F] -> noise level [B] in [sigma_min, sigma_max]."""

    def __init__(self, feature_dim: int, hidden: int = 64, sigma_min: float = 0.02, sigma_max: float = 0.2):
        super().__init__()
        if not 0.0 <= sigma_min < sigma_max:
            raise ValueError(f"noise range: need 0 <= sigma_min < sigma_max (got {sigma_min}, {sigma_max})")
        self._kwargs = {"feature_dim": int(feature_dim), "hidden": int(hidden), "sigma_min": float(sigma_min),
                        "sigma_max": float(sigma_max)}
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def kwargs(self) -> dict:
        return dict(self._kwargs)

    @torch.no_grad()
    def fit_normalisation(self, feats: Tensor) -> None:
        """Standardise inputs with the clean training items' feature statistics."""
        feats = feats.float().to(self.feat_mean.device)
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp_min(1e-6) if feats.shape[0] > 1 else torch.ones_like(self.feat_std))

    def forward(self, feats: Tensor) -> Tensor:
        h = (feats.float() - self.feat_mean) / self.feat_std
        return self.sigma_min + (self.sigma_max - self.sigma_min) * torch.sigmoid(self.mlp(h).squeeze(-1))


class NoiseReducer(nn.Module):
    """Noise-reduction module: (noisy image z [B,3,H,W], noise level [B]) -> image estimate.

    FFDNet-style: 2x pixel-unshuffle (12 channels at half resolution) plus a constant
    noise-level map, ``depth`` 3x3 convolutions, a predicted residual that is subtracted from
    z. Unclamped (training needs the gradient everywhere); ``Addition.process`` clamps."""

    def __init__(self, width: int = 48, depth: int = 5):
        super().__init__()
        if depth < 2 or width < 1:
            raise ValueError(f"denoiser: need depth >= 2 and width >= 1 (got {depth}, {width})")
        self._kwargs = {"width": int(width), "depth": int(depth)}
        layers: list[nn.Module] = [nn.Conv2d(13, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 12, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def kwargs(self) -> dict:
        return dict(self._kwargs)

    def forward(self, z: Tensor, sigma: Tensor) -> Tensor:
        H, W = z.shape[-2:]
        zp = F.pad(z, (0, W % 2, 0, H % 2), mode="replicate") if (H % 2 or W % 2) else z
        u = F.pixel_unshuffle(zp, 2)
        m = sigma.to(u).view(-1, 1, 1, 1).expand(u.shape[0], 1, u.shape[2], u.shape[3])
        r = F.pixel_shuffle(self.body(torch.cat([u, m], 1)), 2)
        return (zp - r)[..., :H, :W]


def _pack(module: nn.Module) -> dict:
    return {"kwargs": module.kwargs(), "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}


def relative_change(s_new: Tensor, s_ref: Tensor) -> Tensor:
    """Delta = sum_u |s_new - s_ref| / sum_u |s_ref| per row of [B, U] score tables -> [B]."""
    return (s_new - s_ref).abs().sum(-1) / s_ref.abs().sum(-1).clamp_min(1e-8)


@DEFENSES.register("addition", label="ADDITION", baseline=True)
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
            x = images[s:s + batch_size].to(self.device)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            out.append(self.score_change(x, items[s:s + batch_size]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def choose_threshold(self, c_clean: Tensor, c_adv: Tensor, rule: str = "youden") -> float:
        """Set and return ``threshold`` from validation score changes (clean vs adversarial),
        by ``vars_fast.metrics.choose_threshold`` (the rule the project's detector uses)."""
        from vars_fast.metrics import choose_threshold

        self.threshold = float(choose_threshold(c_clean, c_adv, rule=rule))
        return self.threshold

    # ------------------------------------------------------------------ training
    def fit(self, cat, items: Sequence[int], cfg, generator: torch.Generator, *, log=None,
            batch_size: Optional[int] = None) -> dict:
        """Train both modules on ``items`` (training items) of catalogue ``cat``; ``cfg`` is the
        ``AdditionConfig`` (``defense.addition``). Returns the training history (also kept in
        ``extra["history"]``): per-epoch mean losses and the seconds each part took."""
        from vars_fast.attacks.base import frozen

        check_config(cfg)
        items = torch.as_tensor(list(items), dtype=torch.long)
        if items.numel() < 2:
            raise ValueError(f"ADDITION.fit: need at least 2 training items (got {items.numel()})")
        # the recommender is only differentiated through, never updated
        with frozen(self.rec, getattr(self.rec, "backbone", None)):
            return self._fit(cat, items, cfg, generator, log, int(batch_size or cfg.batch_size))

    def _fit(self, cat, items: Tensor, cfg, generator: torch.Generator, log, bs: int) -> dict:
        dev = self.device
        t0 = time.perf_counter()
        clean = cat.images[items]
        with torch.no_grad():
            feats = torch.cat([self.rec.encode(_to_float(clean[s:s + 64], dev)).float()
                               for s in range(0, len(items), 64)])
        self.noise_net.fit_normalisation(feats)
        adv, adv_eps = fgsm_examples(self.rec, cat, items, cfg.train_eps, generator, dev,
                                     triples_per_item=int(cfg.triples_per_item))
        t_adv = time.perf_counter() - t0
        hist: dict = {"denoiser": [], "noise": [], "sigma_clean": [], "sigma_adv": [],
                      "adv_eps": [float(e) for e in cfg.train_eps]}
        lam_s, lam_sig = float(cfg.lambda_score), float(cfg.lambda_sigma)
        smin, smax = self.noise_net.sigma_min, self.noise_net.sigma_max

        # stage 1: the denoiser at noise levels drawn over the whole range
        t1 = time.perf_counter()
        self.denoiser.train()
        opt = torch.optim.Adam(self.denoiser.parameters(), lr=float(cfg.lr))
        for _ in range(int(cfg.denoiser_epochs)):
            tot, n = 0.0, 0
            for idx in _batches(items.numel(), bs, generator):
                x, xv, it = self._views(clean, adv, items, idx, dev)
                sigma = smin + (smax - smin) * torch.rand(xv.shape[0], generator=generator).to(dev)
                z = (xv + sigma.view(-1, 1, 1, 1) * torch.randn(xv.shape, generator=generator).to(dev)).clamp(0, 1)
                out = self.denoiser(z, sigma)
                with torch.no_grad():
                    s_ref = self.scores(x, it)
                loss = (out - x).abs().mean() + lam_s * relative_change(self.scores(out, it), s_ref).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot, n = tot + float(loss.detach()) * x.shape[0], n + x.shape[0]
            hist["denoiser"].append(tot / max(n, 1))
            if log is not None:
                log.info("addition denoiser epoch %d: loss %.4f", len(hist["denoiser"]), hist["denoiser"][-1])
        self.denoiser.eval().requires_grad_(False)
        t_den = time.perf_counter() - t1

        # stage 2: the noise-level network through the denoiser (reparameterised noise); the
        # denoiser too when joint (module docstring)
        t2 = time.perf_counter()
        self.noise_net.train()
        joint = bool(cfg.joint)
        params = list(self.noise_net.mlp.parameters())
        if joint:
            self.denoiser.train().requires_grad_(True)
            params += list(self.denoiser.parameters())
        opt = torch.optim.Adam(params, lr=float(cfg.lr))
        for _ in range(int(cfg.noise_epochs)):
            tot, n, sc, sa = 0.0, 0, [], []
            for idx in _batches(items.numel(), bs, generator):
                x, xv, it = self._views(clean, adv, items, idx, dev)
                half = x.shape[0] // 2
                with torch.no_grad():
                    fv = self.rec.encode(xv)
                    s_ref = self.scores(x, it)
                sigma = self.noise_net(fv)
                z = (xv + sigma.view(-1, 1, 1, 1) * torch.randn(xv.shape, generator=generator).to(dev)).clamp(0, 1)
                out = self.denoiser(z, sigma)
                loss = (relative_change(self.scores(out, it), s_ref).mean()
                        + lam_sig * ((sigma - smin) / (smax - smin)).mean())
                if joint:
                    loss = loss + (out - x).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot, n = tot + float(loss.detach()) * x.shape[0], n + x.shape[0]
                sc.append(sigma[:half].detach().cpu())
                sa.append(sigma[half:].detach().cpu())
            hist["noise"].append(tot / max(n, 1))
            hist["sigma_clean"].append(float(torch.cat(sc).mean()))
            hist["sigma_adv"].append(float(torch.cat(sa).mean()))
            if log is not None:
                log.info("addition noise epoch %d: loss %.4f, mean sigma clean %.4f adv %.4f", len(hist["noise"]),
                         hist["noise"][-1], hist["sigma_clean"][-1], hist["sigma_adv"][-1])
        self.noise_net.eval().requires_grad_(False)
        self.denoiser.eval().requires_grad_(False)
        hist["seconds"] = {"adversarial_examples": round(t_adv, 2), "denoiser": round(t_den, 2),
                           "noise": round(time.perf_counter() - t2, 2)}
        hist["train_items"] = int(items.numel())
        self.extra["history"] = hist
        return hist

    def _views(self, clean: Tensor, adv: Tensor, items: Tensor, idx: Tensor, dev) -> tuple[Tensor, Tensor, Tensor]:
        """A batch of training views: (clean x repeated [2b], views [clean; adversarial] [2b], items [2b])."""
        x = _to_float(clean[idx], dev)
        xv = torch.cat([x, _to_float(adv[idx], dev)])
        return torch.cat([x, x]), xv, items[idx].repeat(2)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, extra: Optional[dict] = None) -> None:
        """Atomic save of both modules, the users, the criterion and the chosen threshold."""
        from vars_fast.io import save_checkpoint

        save_checkpoint({"format": FORMAT, "noise": _pack(self.noise_net), "denoiser": _pack(self.denoiser),
                         "users": self.users.tolist(), "change": self.change, "threshold": self.threshold,
                         "seed": self.seed, "extra": {**self.extra, **(extra or {})}}, path)

    @classmethod
    def load(cls, path: str | Path, rec, device: torch.device | str = "cpu") -> "Addition":
        """Rebuild a saved ADDITION around the recommender ``rec`` (weights_only load)."""
        from vars_fast.io import load_checkpoint

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
    from vars_fast.config import ConfigError

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


def fgsm_examples(rec, cat, items: Tensor, eps_list: Sequence[float], generator: torch.Generator, device,
                  triples_per_item: int = 4, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """FGSM images (uint8 [n,3,S,S]) of ``items`` with the project's untargeted attack on the
    training-triple objective (``attacks.untargeted``); item k gets the eps ``eps_list[k % len]``
    of a seeded shuffle, so every eps is equally represented. Returns (images, eps per item)."""
    from vars_fast.attacks.base import frozen, quantize_within
    from vars_fast.attacks.untargeted import item_loss_fn, sample_item_triples
    from vars_fast.attacks.fgsm import FGSM

    tr = sample_item_triples(cat, triples_per_item, generator)
    eps = torch.tensor([float(e) for e in eps_list])[torch.randperm(items.numel(), generator=generator) % len(eps_list)]
    out = torch.empty((items.numel(),) + tuple(cat.images.shape[1:]), dtype=torch.uint8)
    with frozen(rec, getattr(rec, "backbone", None)):
        for s in range(0, items.numel(), batch_size):
            it = items[s:s + batch_size]
            fn = item_loss_fn(rec, it.to(device), tr.users[it].to(device), tr.others[it].to(device),
                              tr.sign[it].to(device))
            e = eps[s:s + batch_size]
            x_adv = FGSM(fn, (e / 255.0).to(device))(cat.item_batch(it, device))
            for k in range(it.numel()):  # quantise each image inside its own radius
                out[s + k] = quantize_within(x_adv[k:k + 1].cpu(), cat.images[it[k:k + 1]], float(e[k]))[0]
    return out, eps


def _to_float(x: Tensor, device) -> Tensor:
    x = x.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _batches(n: int, bs: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    for s in range(0, n, bs):
        yield perm[s:s + bs]


# ---------------------------------------------------------------------- a run folder's Table 4 rows

def fit_in_run(ctx, model: str = "VBPR", refit: bool = False) -> tuple[Addition, dict]:
    """ADDITION for recommender ``model`` of a run folder, trained and thresholded as ours is.

    Items: the defence's seeded split (``defense.training.split_items`` with the defence
    stage's generator tag), so ADDITION trains on the defence's training items and chooses its
    threshold on the same validation items. The threshold: ``defense.threshold_rule`` on
    validation score changes, clean vs FGSM at ``defense.detector_eps`` (the attack ours is
    calibrated on). Loads ``checkpoints/addition_<model>.pt`` when present (unless ``refit``),
    else fits and saves it. Returns (the detector, {"validation", "split", "seconds"})."""
    from vars_fast.defense.training import split_items
    from vars_fast.metrics import detection_metrics

    cfg, cat, dev, log = ctx.cfg, ctx.catalogue, ctx.device, ctx.log
    dcfg, acfg = cfg.defense, cfg.defense.addition
    t0 = time.perf_counter()
    split = split_items(cat, ctx.generator("defense-split"), dcfg.train_item_frac, dcfg.val_item_frac)
    rec = ctx.recommender(model)
    path = ctx.run.checkpoint(f"addition_{model}")
    if path.is_file() and not refit:
        add = Addition.load(path, rec, dev)
        log.info("addition: loaded %s", path)
        return add, {"validation": add.extra.get("validation", {}), "split": split,
                     "seconds": {"fit": 0.0, "threshold": 0.0}}
    users = torch.randperm(cat.n_users, generator=ctx.generator("evaluate:addition-users"))
    add = build_addition(rec, users[: int(acfg.users)], acfg, change=float(acfg.change),
                         seed=int(torch.randint(0, 2**31, (1,), generator=ctx.generator("addition-noise"))),
                         device=dev)
    add.fit(cat, split["train"], acfg, ctx.generator("addition-fit"), log=log)
    t_fit = time.perf_counter() - t0

    bs = int(cfg.eval.batch_size)
    val = torch.as_tensor(split["val"], dtype=torch.long)
    c_val = add.score_change_all(cat.images[val], val, bs)
    adv_val, _ = fgsm_examples(rec, cat, val, [float(e) for e in dcfg.detector_eps],
                               ctx.generator("addition-val"), dev, triples_per_item=int(dcfg.triples_per_item))
    a_val = add.score_change_all(adv_val, val, bs)
    thr = add.choose_threshold(c_val, a_val, rule=dcfg.threshold_rule)
    validation = {"rule": dcfg.threshold_rule, "eps": list(dcfg.detector_eps), "n": int(val.numel()),
                  **detection_metrics(c_val, a_val, thr)}
    add.save(path, extra={"validation": validation})
    log.info("addition: validation threshold %.4f (%s): FPR %.3f TPR %.3f AUC %.4f", thr, dcfg.threshold_rule,
             validation["fpr"], validation["tpr"], validation["auc"])
    return add, {"validation": validation, "split": split,
                 "seconds": {"fit": round(t_fit, 1), "threshold": round(time.perf_counter() - t0 - t_fit, 1)}}


def main(argv: Optional[list[str]] = None) -> int:
    """python -m vars_fast.defense.addition RUN_DIR: fit ADDITION in a run folder that holds the
    recommender stage and choose its validation threshold; writes RUN_DIR/addition.json (the
    evaluate stage measures it on the test items beside ours, Table 4)."""
    import argparse
    import logging

    from vars_fast.config import ConfigError, apply_overrides, from_dict, load_yaml, parse_set, validate
    from vars_fast.io import atomic_write_json
    from vars_fast.pipeline import Context
    from vars_fast.run import RunFolder
    from vars_fast.utils import get_device, setup_logging

    p = argparse.ArgumentParser(prog="python -m vars_fast.defense.addition", description=main.__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--model", default="VBPR")
    p.add_argument("--refit", action="store_true", help="train again even when checkpoints/addition_<model>.pt exists")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the run's config (repeatable), e.g. --set defense.addition.noise_epochs=2")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        print(f"error: {run_dir}/config.yaml not found (not a run folder)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = from_dict(load_yaml(run_dir / "config.yaml"))
        apply_overrides(cfg, parse_set(args.set))
        validate(cfg)
        check_config(cfg.defense.addition)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = setup_logging(str(run_dir / "log.txt"))
    ctx = Context(cfg=cfg, run=RunFolder(run_dir), device=get_device(cfg.run.device), log=log)
    try:
        add, info = fit_in_run(ctx, args.model, refit=args.refit)
        out = {"validation": info["validation"], "seconds": info["seconds"], "threshold": float(add.threshold),
               "history": add.extra.get("history", {})}
    except FileNotFoundError as e:
        logging.getLogger().error("addition: %s", e)
        return 1
    atomic_write_json(run_dir / "addition.json", out)
    log.info("addition: wrote %s", run_dir / "addition.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
