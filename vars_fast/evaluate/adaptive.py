"""Beyond the paper: ``attacks.adaptive.AdaptivePGD`` through the defence on VBPR, once
against ``denoise`` and once (EOT) against ``denoise+rand``, with the detector hinge in the
attacker's loss.

* ``train`` objective (the uploader's threat model): every item of the catalogue gets an
  adaptive image (``eval.adaptive.items`` = 0), crafted from its training triples as the
  catalogue attack does (``attacks.untargeted.attack_items``). Ranking rows ``attack:
  "adaptive-pgd"`` per defence, a ``detect+withhold`` row for the combined system, and the
  detection rate of the adaptive images on the held-out test items (TPR at the validation
  threshold and at FPR <= 0.05).
* ``eval`` objective (the paper's protocol, ``attacks/oracle.py``): each user's whole
  evaluation list through the defence with ``attacks.oracle.list_loss`` as the recommender
  loss, on a seeded subset of ``eval.adaptive.oracle_users`` of the oracle users.

Every row records what the attacker spent: ``steps``, ``eot`` (draws per step), the items
(``n_adaptive_items``) or users (``n_users``) attacked, and ``detect_weight``. The cost of
the default preset's run is in docs/results/adaptive_cost.md.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from vars_fast.evaluate.common import Evaluation, det_json


def tpr_at_fpr(d_clean: torch.Tensor, d_adv: torch.Tensor, max_fpr: float = 0.05) -> tuple[float, float]:
    """(TPR, threshold) at the lowest threshold whose FPR on ``d_clean`` is <= ``max_fpr``:
    an image is flagged when its distance is above the threshold."""
    dc = d_clean.double().sort().values
    k = int(math.floor(max_fpr * dc.numel()))  # at most k clean distances may lie above it
    thr = float(dc[dc.numel() - 1 - k]) if dc.numel() else float("inf")
    return float((d_adv.double() > thr).float().mean()) if d_adv.numel() else float("nan"), thr


def _attacker(ev: Evaluation) -> dict:
    """The attacker's strength, as recorded in every adaptive row."""
    ecfg = ev.cfg.eval
    eps255 = float(ecfg.adaptive.eps or ecfg.table_eps)
    return {"eps255": eps255, "steps": int(ecfg.adaptive.steps or ev.cfg.attack.pgd_steps),
            "eot": int(ecfg.adaptive.eot), "detect_weight": float(ecfg.adaptive.detect_weight)}


def _make_attack(ev: Evaluation, spec: dict, rand: bool, gen: torch.Generator, n_items: int):
    """``(loss_fn, x, idx) -> x_adv``: AdaptivePGD with the EOT images per graph bounded for the device."""
    from vars_fast.attacks.adaptive import AdaptivePGD
    from vars_fast.attacks.pgd import default_alpha
    from vars_fast.memory_budget import adaptive_chunks

    eps = spec["eps255"] / 255.0
    _, max_images = adaptive_chunks(ev.cfg, ev.dev, n_items, spec["eot"] if rand else 1)

    def attack(fn, x, idx=None):
        return AdaptivePGD(fn, ev.defense, eps, alpha=default_alpha(eps, spec["steps"]), steps=spec["steps"],
                           eot=spec["eot"], rand=rand, detect_weight=spec["detect_weight"], generator=gen,
                           max_images=max_images)(x)

    return attack


def adaptive(ev: Evaluation) -> None:
    if not ev.cfg.eval.adaptive.enabled or "VBPR" not in ev.models:
        return
    spec = _attacker(ev)
    train_objective(ev, spec)
    eval_objective(ev, spec)


def train_objective(ev: Evaluation, spec: dict) -> None:
    from vars_fast.attacks.untargeted import attack_items, sample_item_triples
    from vars_fast.metrics import detection_metrics

    ecfg, acfg = ev.cfg.eval, ev.cfg.attack
    rec, enc = ev.ctx.recommender("VBPR"), ev.ctx.encoder("VBPR")
    eps255 = spec["eps255"]
    N = ev.cat.n_items
    n_ad = min(int(ecfg.adaptive.items) or N, N)
    if n_ad < N:  # a seeded subset (cost studies): held-out test items first, for the detection rate
        is_test = torch.zeros(N, dtype=torch.bool)
        is_test[ev.test_items] = True
        rest = (~is_test).nonzero().squeeze(1)
        g = ev.ctx.generator("evaluate:adaptive-items")
        chosen = torch.sort(torch.cat([ev.test_items, rest[torch.randperm(rest.numel(), generator=g)]])[:n_ad]).values
        base = ev.load_attack("VBPR", "pgd", int(eps255))
        base = base.clone() if base is not None else ev.cat.images.clone()
    else:
        chosen, base = torch.arange(N), ev.cat.images
    det_items = chosen[torch.isin(chosen, ev.test_items)]
    tr = sample_item_triples(ev.cat, acfg.triples_per_item, ev.ctx.generator("evaluate:adaptive-triples"),
                             acfg.triple_roles)
    has_det = ev.defense.detector is not None and math.isfinite(ev.defense.threshold)
    d_clean = ev.d_clean() if has_det else None
    freeze = (ev.defense.denoiser,) + ((ev.defense.detector,) if has_det else ())
    record = {"n_adaptive_items": int(chosen.numel()), "steps": spec["steps"], "detect_weight": spec["detect_weight"]}
    rows, det_rows, withheld = [], [], []
    for dname, rand in (("denoise", False), ("denoise+rand", True)):
        attack = _make_attack(ev, spec, rand, ev.ctx.generator(f"evaluate:adaptive:{dname}"), ev.bs)
        out = base.clone()
        out[chosen] = attack_items(enc, ev.cat, chosen, attack, tr, eps255, ev.dev, ev.bs, freeze=freeze,
                                   channels_last=True, desc=f"adaptive-pgd vs {dname}",
                                   progress=ev.cfg.run.progress)
        np.save(ev.run.attack_file("VBPR", f"adaptive-pgd-{'rand' if rand else 'det'}", eps255), out.numpy())
        den, rnd = ev.purify_all(out, desc=f"purify adaptive {dname}", tag=f"adaptive:{dname}")
        extra = {**record, "eot": spec["eot"] if rand else 1}
        rows.append({"model": "VBPR", "defense": dname, "attack": "adaptive-pgd", "eps": int(eps255),
                     **ev.rank(rec, rnd if rand else den), **extra})
        if has_det:
            withheld.append({"model": "VBPR", "defense": "detect+withhold", "attack": "adaptive-pgd",
                             "eps": int(eps255), "against": dname, **ev.rank_withheld(rec, out, den), **extra})
        if has_det and det_items.numel():
            d_adv = ev.distances(out[det_items])
            ev.arrays[f"d_adaptive_{dname}"] = d_adv.numpy()
            m = det_json(detection_metrics(d_clean, d_adv, float(ev.defense.threshold)))
            tpr05, thr05 = tpr_at_fpr(d_clean, d_adv, 0.05)
            det_rows.append({"detector": "ours", "attack": "adaptive-pgd", "eps": int(eps255), "variant": dname,
                             "detection_rate": m["tpr"], "tpr_at_fpr05": tpr05, "threshold_fpr05": thr05,
                             "n_adv": int(det_items.numel()), **extra, **m})
    if withheld:  # the combined system against the stronger of the two adaptive attackers
        rows.append(min(withheld, key=lambda r: r["HR@10"]))
    ev.run.add_rows("ranking", rows)
    ev.run.add_rows("detection", det_rows)


def eval_objective(ev: Evaluation, spec: dict) -> None:
    """Adaptive PGD on whole evaluation lists (``list_loss`` through the defence)."""
    from vars_fast.attacks.base import frozen, quantize_within
    from vars_fast.attacks.oracle import eval_lists, list_loss, list_ranking
    from vars_fast.attacks.stage import load_oracle_users
    from vars_fast.evaluate.oracle import _list_features

    cfg = ev.cfg
    n_sub = int(cfg.eval.adaptive.oracle_users)
    if n_sub < 0 or "eval" not in cfg.attack.objective or "VBPR" not in cfg.eval.oracle_models:
        return
    users = load_oracle_users(ev.run)
    if users is None:
        ev.log.warning("evaluate: attacks/oracle_users.json missing: adaptive eval-objective rows skipped")
        return
    if 0 < n_sub < users.numel():
        pick = torch.randperm(users.numel(), generator=ev.ctx.generator("evaluate:adaptive-oracle-users"))[:n_sub]
        users = users[pick].sort().values
    rec, enc = ev.ctx.recommender("VBPR"), ev.ctx.encoder("VBPR")
    lists = eval_lists(ev.cat, users)
    U, L = lists.shape
    B = max(1, ev.bs // L)  # whole lists per call: a user's candidates share one objective
    base = {"model": "VBPR", "objective": "eval", "n_users": int(U), "steps": spec["steps"],
            "detect_weight": spec["detect_weight"], "users": "adaptive_oracle_users"}
    rows = []
    den_c, rnd_c = ev.clean_purified()
    for dname, imgs in zip(("denoise", "denoise+rand"), (den_c, rnd_c)):
        feats = ev.encode_all(enc, imgs).cpu()[lists]
        rows.append({**base, "defense": dname, "attack": "clean-adaptive-subset", "eps": 0,
                     **list_ranking(rec, ev.cat, users, feats, ev.topk)})
    freeze = (enc, getattr(enc, "backbone", None), ev.defense.denoiser, ev.defense.detector)
    for dname, rand in (("denoise", False), ("denoise+rand", True)):
        attack = _make_attack(ev, spec, rand, ev.ctx.generator(f"evaluate:adaptive-eval:{dname}"), B * L)
        out = torch.empty((U, L) + tuple(ev.cat.images.shape[1:]), dtype=torch.uint8)
        with frozen(*[m for m in freeze if m is not None]):
            for s in range(0, U, B):
                li = lists[s:s + B]
                x = ev.cat.item_batch(li.reshape(-1), ev.dev).contiguous(memory_format=torch.channels_last)
                u_dev, li_dev = users[s:s + B].to(ev.dev), li.to(ev.dev)
                x_adv = attack(lambda t: list_loss(enc, t, u_dev, li_dev), x)
                clean = ev.cat.images[li.reshape(-1)]
                out[s:s + B] = quantize_within(x_adv.cpu(), clean, spec["eps255"]).view(li.shape[0], L,
                                                                                        *clean.shape[1:])
        den, rnd = _list_features(ev, rec, out, f"VBPR:adaptive-eval:{dname}")
        rows.append({**base, "defense": dname, "attack": "adaptive-pgd", "eps": int(spec["eps255"]),
                     "eot": spec["eot"] if rand else 1,
                     **list_ranking(rec, ev.cat, users, rnd if rand else den, ev.topk)})
    ev.run.add_rows("ranking", rows)
    ev.log.info("evaluate adaptive (eval objective): %d users, %d rows", U, len(rows))
