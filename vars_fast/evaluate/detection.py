"""Table 4: FGSM at each ``eval.detect_eps`` on the defence's held-out test items
(``Defense.split["test"]``), ours (distance vs the stored threshold) vs ADDITION, and
Gaussian-noise rows (``attack: "gaussian", eps: sigma``) with the share judged clean."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vars_fast.evaluate.common import Evaluation, chunks, det_json, to_float


def fgsm_items(ev: Evaluation, rec, items: Tensor, eps) -> Tensor:
    """FGSM images uint8 for ``items``: the attack stage's catalogue when saved, else attacked
    now by the catalogue attack on these items alone."""
    adv = ev.load_attack(rec.name, "fgsm", eps)
    if adv is not None:
        return adv[items]
    from vars_fast.attacks.catalogue import attack_catalogue

    return attack_catalogue(rec, ev.cat, "fgsm", eps, ev.cfg.attack, ev.ctx.generator(f"evaluate:fgsm:{eps}"),
                            ev.dev, progress=False, batch_size=ev.bs, fast=False, items=items)


def addition(ev: Evaluation, rec):
    """The ADDITION baseline on ``rec``, purifying with the defence's denoiser."""
    from vars_fast.defense.addition import Addition

    ecfg = ev.cfg.eval
    g = ev.ctx.generator("evaluate:addition-users")
    users = torch.randperm(ev.cat.n_users, generator=g)[: int(ecfg.addition_users)]
    return Addition(rec, lambda x: ev.defense.purify(x), users=users, sigma=ecfg.addition_sigma,
                    change=ecfg.addition_change, generator=ev.ctx.generator("evaluate:addition-noise"))


@torch.no_grad()
def addition_change(ev: Evaluation, add, images: Tensor, items: Tensor) -> Tensor:
    return torch.cat([add.change(to_float(images[s:e], ev.dev), items[s:e]).cpu()
                      for s, e in chunks(images.shape[0], ev.bs)])


def detection(ev: Evaluation) -> None:
    """Ours vs ADDITION per eps, and the Gaussian-noise check."""
    from vars_fast.metrics import detection_metrics

    if ev.defense.detector is None or not math.isfinite(ev.defense.threshold):
        ev.log.warning("evaluate: the defence has no detector/threshold: detection rows skipped")
        return
    if "VBPR" not in ev.models:
        ev.log.warning("evaluate: no VBPR recommender: detection rows skipped")
        return
    ecfg = ev.cfg.eval
    rec, items, thr = ev.ctx.recommender("VBPR"), ev.test_items, float(ev.defense.threshold)
    add_thr = float(ecfg.addition_change)
    clean = ev.cat.images[items]
    d_clean = ev.d_clean()
    add = addition(ev, rec)
    val = torch.as_tensor((ev.defense.split or {}).get("val") or items.tolist(), dtype=torch.long)
    add.calibrate(to_float(ev.cat.images[val[:256]], ev.dev))  # reference energy from clean val items
    c_clean = addition_change(ev, add, clean, items)
    ev.arrays.update(d_clean=d_clean.numpy(), threshold=np.array(thr), addition_clean=c_clean.numpy())
    rows = []
    for eps in ecfg.detect_eps:
        adv = fgsm_items(ev, rec, items, eps)
        d_adv = ev.distances(adv)
        c_adv = addition_change(ev, add, adv, items)
        ev.arrays[f"d_fgsm_{eps}"] = d_adv.numpy()
        ev.arrays[f"addition_fgsm_{eps}"] = c_adv.numpy()
        base = {"attack": "fgsm", "eps": eps, "n_clean": int(d_clean.numel()), "n_adv": int(d_adv.numel())}
        rows.append({"detector": "ours", **base, **det_json(detection_metrics(d_clean, d_adv, thr))})
        rows.append({"detector": "addition", **base, **det_json(detection_metrics(c_clean, c_adv, add_thr))})
    x = to_float(clean, "cpu")
    g = ev.ctx.generator("evaluate:gaussian")
    for sigma in ecfg.noise_sigmas:
        noisy = (x + float(sigma) * torch.randn(x.shape, generator=g)).clamp(0, 1)
        d = ev.distances(noisy)
        c = addition_change(ev, add, noisy, items)
        ev.arrays[f"d_gauss_{sigma}"] = d.numpy()
        for det, score, t in (("ours", d, thr), ("addition", c, add_thr)):
            share = float((score <= t).float().mean())
            rows.append({"detector": det, "attack": "gaussian", "eps": sigma, "clean_rate": share,
                         "accuracy": share, "fpr": 1.0 - share, "threshold": t, "n_clean": int(score.numel())})
    ev.run.add_rows("detection", rows)
