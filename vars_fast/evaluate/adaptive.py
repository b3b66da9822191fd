"""Beyond the paper: ``attacks.adaptive.AdaptivePGD`` through the defence on VBPR, once
against ``denoise`` and once (EOT) against ``denoise+rand``; ranking rows
``attack: "adaptive-pgd"`` and the detection rate of the adaptive images.

Every adaptive step is a denoiser forward and backward per item, so a seeded subset of
``eval.adaptive_items`` items is attacked adaptively and the rest keep their non-adaptive PGD
image: a mixed attacker, at least as strong as plain PGD on the other items. Held-out test
items come first in that subset, so that the detection rate is measured on items the
detector never saw.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from vars_fast.evaluate.common import Evaluation, det_json


def adaptive(ev: Evaluation) -> None:
    from vars_fast.attacks.adaptive import AdaptivePGD
    from vars_fast.attacks.catalogue import attack_items, sample_item_triples
    from vars_fast.attacks.pgd import default_alpha
    from vars_fast.metrics import detection_metrics

    ecfg, acfg = ev.cfg.eval, ev.cfg.attack
    if not ecfg.adaptive or "VBPR" not in ev.models:
        return
    rec = ev.ctx.recommender("VBPR")
    eps255 = float(ecfg.adaptive_eps or ecfg.table_eps)
    eps, steps = eps255 / 255.0, int(ecfg.adaptive_steps or acfg.pgd_steps)
    N = ev.cat.n_items
    n_ad = min(int(ecfg.adaptive_items) or N, N)
    g = ev.ctx.generator("evaluate:adaptive-items")
    is_test = torch.zeros(N, dtype=torch.bool)
    is_test[ev.test_items] = True
    rest = (~is_test).nonzero().squeeze(1)
    pool = torch.cat([ev.test_items, rest[torch.randperm(rest.numel(), generator=g)]])
    chosen = torch.sort(pool[:n_ad]).values
    det_items = chosen[is_test[chosen]]
    base = ev.load_attack("VBPR", "pgd", int(eps255)) if n_ad < N else None
    base = base.clone() if base is not None else ev.cat.images.clone()
    tr = sample_item_triples(ev.cat, acfg.triples_per_item, ev.ctx.generator("evaluate:adaptive-triples"),
                             acfg.triple_roles)
    has_det = ev.defense.detector is not None and math.isfinite(ev.defense.threshold)
    d_clean = ev.d_clean() if has_det else None
    rows, det_rows = [], []
    freeze = (ev.defense.denoiser,) + ((ev.defense.detector,) if has_det else ())
    for dname, rand in (("denoise", False), ("denoise+rand", True)):
        gen = ev.ctx.generator(f"evaluate:adaptive:{dname}")

        def attack(fn, x, idx, rand=rand, gen=gen):
            return AdaptivePGD(fn, ev.defense, eps, alpha=default_alpha(eps, steps), steps=steps,
                               eot=ecfg.adaptive_eot, rand=rand, detect_weight=ecfg.adaptive_detect_weight,
                               generator=gen)(x)

        out = base.clone()
        out[chosen] = attack_items(rec, ev.cat, chosen, attack, tr, eps255, ev.dev, ev.bs, freeze=freeze,
                                   desc=f"adaptive-pgd vs {dname}", progress=ev.cfg.run.progress)
        np.save(ev.run.attack_file("VBPR", f"adaptive-pgd-{'rand' if rand else 'det'}", eps255), out.numpy())
        den, rnd = ev.purify_all(out, desc=f"purify adaptive {dname}", tag=f"adaptive:{dname}")
        extra = {"n_adaptive_items": int(chosen.numel()), "eot": ecfg.adaptive_eot if rand else 1, "steps": steps}
        rows.append({"model": "VBPR", "defense": dname, "attack": "adaptive-pgd", "eps": int(eps255),
                     **ev.rank(rec, rnd if rand else den), **extra})
        if has_det and det_items.numel():
            d_adv = ev.distances(out[det_items])
            ev.arrays[f"d_adaptive_{dname}"] = d_adv.numpy()
            m = det_json(detection_metrics(d_clean, d_adv, float(ev.defense.threshold)))
            det_rows.append({"detector": "ours", "attack": "adaptive-pgd", "eps": int(eps255), "variant": dname,
                             "detection_rate": m["tpr"], "n_adv": int(det_items.numel()), **m})
    ev.run.add_rows("ranking", rows)
    ev.run.add_rows("detection", det_rows)
