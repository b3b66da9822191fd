"""ADDITION's training (``Addition.fit``; the losses are in the package docstring): FGSM
training examples, then stage 1, the denoiser at noise levels drawn over the whole range, then
stage 2, the noise-level network through the denoiser (and the denoiser too when
``defense.addition.joint``)."""
from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from vars_fast.attacks.base import frozen, quantize_within
from vars_fast.attacks.fgsm import FGSM
from vars_fast.attacks.untargeted import item_loss_fn, sample_item_triples
from vars_fast.defense.addition.networks import relative_change
from vars_fast.utils import index_batches, to_float


class _TrainingSet(NamedTuple):
    """The training items with their clean and FGSM images (uint8, on the CPU)."""
    items: Tensor
    clean: Tensor
    adv: Tensor

    def batches(self, batch_size: int, generator: torch.Generator):
        """Positions into ``items``, one seeded shuffle per epoch."""
        return index_batches(range(self.items.numel()), batch_size, generator)

    def views(self, idx: Tensor, dev) -> tuple[Tensor, Tensor, Tensor]:
        """A batch of training views: (clean x repeated [2b], views [clean; adversarial] [2b], items [2b])."""
        x = to_float(self.clean[idx], dev)
        xv = torch.cat([x, to_float(self.adv[idx], dev)])
        return torch.cat([x, x]), xv, self.items[idx].repeat(2)


def train_addition(add, cat, items: Tensor, cfg, generator: torch.Generator, log, bs: int) -> dict:
    """Train ``add``'s two modules on ``items`` (the recommender already frozen by the caller);
    returns the history, also kept in ``add.extra["history"]``."""
    dev = add.device
    t0 = time.perf_counter()
    clean = cat.images[items]
    with torch.no_grad():
        feats = torch.cat([add.rec.encode(to_float(clean[s:s + 64], dev)).float()
                           for s in range(0, len(items), 64)])
    add.noise_net.fit_normalisation(feats)
    adv, _ = fgsm_examples(add.rec, cat, items, cfg.train_eps, generator, dev,
                           triples_per_item=int(cfg.triples_per_item))
    data = _TrainingSet(items, clean, adv)
    t_adv = time.perf_counter() - t0
    hist: dict = {"denoiser": [], "noise": [], "sigma_clean": [], "sigma_adv": [],
                  "adv_eps": [float(e) for e in cfg.train_eps]}
    t1 = time.perf_counter()
    _train_denoiser(add, data, cfg, generator, log, bs, hist)
    t_den = time.perf_counter() - t1
    t2 = time.perf_counter()
    _train_noise_net(add, data, cfg, generator, log, bs, hist)
    hist["seconds"] = {"adversarial_examples": round(t_adv, 2), "denoiser": round(t_den, 2),
                       "noise": round(time.perf_counter() - t2, 2)}
    hist["train_items"] = int(items.numel())
    add.extra["history"] = hist
    return hist


def _train_denoiser(add, data: _TrainingSet, cfg, generator: torch.Generator, log, bs: int, hist: dict) -> None:
    """Stage 1: the denoiser at noise levels drawn uniformly over the whole range; appends the
    epochs' mean losses to ``hist["denoiser"]``."""
    dev, lam_s = add.device, float(cfg.lambda_score)
    smin, smax = add.noise_net.sigma_min, add.noise_net.sigma_max
    add.denoiser.train()
    opt = torch.optim.Adam(add.denoiser.parameters(), lr=float(cfg.lr))
    for _ in range(int(cfg.denoiser_epochs)):
        tot, n = 0.0, 0
        for idx in data.batches(bs, generator):
            x, xv, it = data.views(idx, dev)
            sigma = smin + (smax - smin) * torch.rand(xv.shape[0], generator=generator).to(dev)
            z = (xv + sigma.view(-1, 1, 1, 1) * torch.randn(xv.shape, generator=generator).to(dev)).clamp(0, 1)
            out = add.denoiser(z, sigma)
            with torch.no_grad():
                s_ref = add.scores(x, it)
            loss = (out - x).abs().mean() + lam_s * relative_change(add.scores(out, it), s_ref).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, n = tot + float(loss.detach()) * x.shape[0], n + x.shape[0]
        hist["denoiser"].append(tot / max(n, 1))
        if log is not None:
            log.info("addition denoiser epoch %d: loss %.4f", len(hist["denoiser"]), hist["denoiser"][-1])
    add.denoiser.eval().requires_grad_(False)


def _train_noise_net(add, data: _TrainingSet, cfg, generator: torch.Generator, log, bs: int, hist: dict) -> None:
    """Stage 2: the noise-level network through the denoiser (reparameterised noise); the
    denoiser too when ``joint`` (package docstring). Appends to ``hist["noise"]`` and the mean
    predicted sigma of the clean and the adversarial views."""
    dev, lam_sig, joint = add.device, float(cfg.lambda_sigma), bool(cfg.joint)
    smin, smax = add.noise_net.sigma_min, add.noise_net.sigma_max
    add.noise_net.train()
    params = list(add.noise_net.mlp.parameters())
    if joint:
        add.denoiser.train().requires_grad_(True)
        params += list(add.denoiser.parameters())
    opt = torch.optim.Adam(params, lr=float(cfg.lr))
    for _ in range(int(cfg.noise_epochs)):
        tot, n, sc, sa = 0.0, 0, [], []
        for idx in data.batches(bs, generator):
            x, xv, it = data.views(idx, dev)
            half = x.shape[0] // 2
            with torch.no_grad():
                fv = add.rec.encode(xv)
                s_ref = add.scores(x, it)
            sigma = add.noise_net(fv)
            z = (xv + sigma.view(-1, 1, 1, 1) * torch.randn(xv.shape, generator=generator).to(dev)).clamp(0, 1)
            out = add.denoiser(z, sigma)
            loss = (relative_change(add.scores(out, it), s_ref).mean()
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
    add.noise_net.eval().requires_grad_(False)
    add.denoiser.eval().requires_grad_(False)


def fgsm_examples(rec, cat, items: Tensor, eps_list: Sequence[float], generator: torch.Generator, device,
                  triples_per_item: int = 4, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """FGSM images (uint8 [n,3,S,S]) of ``items`` with the project's untargeted attack on the
    training-triple objective (``attacks.untargeted``); item k gets the eps ``eps_list[k % len]``
    of a seeded shuffle, so every eps is equally represented. Returns (images, eps per item)."""
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
