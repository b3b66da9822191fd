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

from vars_fast.attacks.adaptive import AdaptivePGD, UnflaggedLoss
from vars_fast.attacks.base import frozen, quantize_within
from vars_fast.attacks.oracle import eval_lists, list_loss, list_ranking
from vars_fast.attacks.pgd import PGD, default_alpha
from vars_fast.attacks.stage import load_oracle_users
from vars_fast.attacks.untargeted import attack_items, sample_item_triples
from vars_fast.evaluate import deployments
from vars_fast.evaluate.common import Evaluation, det_json
from vars_fast.evaluate.oracle import _list_features
from vars_fast.evaluate.ranking import floor_line
from vars_fast.evaluate.section import Doc, Section, find, missing, table
from vars_fast.memory_budget import adaptive_chunks
from vars_fast.metrics import detection_metrics
from vars_fast.registry import DEPLOYMENTS, SECTIONS

NAME = "adaptive"  # the section: its registry name and the ``table`` of its rows


def threshold_at_fpr(d_clean: torch.Tensor, max_fpr: float = 0.05) -> float:
    """The lowest threshold whose FPR on ``d_clean`` is <= ``max_fpr`` (an image is flagged when
    its distance is above the threshold)."""
    dc = d_clean.double().sort().values
    k = int(math.floor(max_fpr * dc.numel()))  # at most k clean distances may lie above it
    return float(dc[dc.numel() - 1 - k]) if dc.numel() else float("inf")


def rate_above(d: torch.Tensor, thr: float) -> float:
    return float((d.double() > thr).float().mean()) if d.numel() else float("nan")


def tpr_at_fpr(d_clean: torch.Tensor, d_adv: torch.Tensor, max_fpr: float = 0.05) -> tuple[float, float]:
    """(TPR, threshold) at the lowest threshold whose FPR on ``d_clean`` is <= ``max_fpr``."""
    thr = threshold_at_fpr(d_clean, max_fpr)
    return rate_above(d_adv, thr), thr


def attacker_spec(ev: Evaluation) -> dict:
    """The attacker's strength, as recorded in every adaptive row."""
    ecfg = ev.cfg.eval
    eps255 = float(ecfg.adaptive.eps or ecfg.table_eps)
    return {"eps255": eps255, "steps": int(ecfg.adaptive.steps or ev.cfg.attack.pgd_steps),
            "eot": int(ecfg.adaptive.eot), "detect_weight": float(ecfg.adaptive.detect_weight)}


def _make_attack(ev: Evaluation, spec: dict, rand: bool, gen: torch.Generator, n_items: int):
    """``(loss_fn, x, idx) -> x_adv``: AdaptivePGD with the EOT images per graph bounded for the device."""
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
    spec = attacker_spec(ev)
    train_objective(ev, spec)
    eval_objective(ev, spec)


def _purifier_attackers() -> list[tuple[str, bool]]:
    """(deployment, EOT over the resize-pad) for each purifying deployment: its own attacker
    goes through D, and through the random resize-pad when that is what it ranks."""
    return [(n, DEPLOYMENTS[n].view == "rnd") for n in deployments.purifying()]


def _unflagged_attack(ev: Evaluation, spec: dict, gen: torch.Generator):
    """``(loss_fn, x, idx) -> x_adv``: the gated platform's attacker (``UnflaggedLoss``): PGD on
    the raw image under the detector hinge, each image's most damaging unflagged iterate kept."""
    eps = spec["eps255"] / 255.0

    def attack(fn, x, idx=None):
        loss = UnflaggedLoss(fn, ev.defense, detect_weight=spec["detect_weight"])
        return PGD(loss, eps, alpha=default_alpha(eps, spec["steps"]), steps=spec["steps"], random_start=True,
                   generator=gen, keep_best=True)(x)

    return attack


def _attacked_items(ev: Evaluation, eps255: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(items to attack, the catalogue their adaptive images go into): every item, or with
    ``eval.adaptive.items`` a seeded subset (cost studies), the held-out test items first for
    the detection rate, the others keeping their plain PGD image."""
    N = ev.cat.n_items
    n_ad = min(int(ev.cfg.eval.adaptive.items) or N, N)
    if n_ad >= N:
        return torch.arange(N), ev.cat.images
    is_test = torch.zeros(N, dtype=torch.bool)
    is_test[ev.test_items] = True
    rest = (~is_test).nonzero().squeeze(1)
    g = ev.ctx.generator("evaluate:adaptive-items")
    chosen = torch.sort(torch.cat([ev.test_items, rest[torch.randperm(rest.numel(), generator=g)]])[:n_ad]).values
    base = ev.load_attack("VBPR", "pgd", int(eps255))
    return chosen, (base.clone() if base is not None else ev.cat.images.clone())


def _detection_row(ev: Evaluation, d_adv: torch.Tensor, attacker: str, eps255: float, extra: dict) -> dict:
    """How the detector sees one attacker's images: at the deployed threshold, and at the
    threshold whose FPR on the clean *validation* items is <= 0.05 (its FPR on the clean test
    items beside it)."""
    d_clean = ev.d_clean()
    m = det_json(detection_metrics(d_clean, d_adv, float(ev.defense.threshold)))
    thr05 = threshold_at_fpr(ev.d_val(), 0.05)
    return {"detector": "ours", "attack": "adaptive-pgd", "eps": int(eps255), "variant": attacker,
            "detection_rate": m["tpr"], "tpr_at_fpr05": rate_above(d_adv, thr05), "threshold_fpr05": thr05,
            "threshold_fpr05_from": "validation", "fpr05_on_test": rate_above(d_clean, thr05),
            "n_adv": int(d_adv.numel()), **extra, **m}


def train_objective(ev: Evaluation, spec: dict) -> None:
    """Every item's adaptive image (the uploader's threat model), per attacker: through D
    (``denoise``), with EOT over the resize-pad (``denoise+rand``) and, with a detector, raw
    and unflagged (``unflagged``, the gated platforms' own attacker). Each deployment's row is
    ranked on its own attacker's images; a detector-gated deployment's row is the strongest
    of the attackers against it (``against`` names it)."""
    rec, enc = ev.ctx.recommender("VBPR"), ev.ctx.encoder("VBPR")
    eps255 = spec["eps255"]
    chosen, base = _attacked_items(ev, eps255)
    det_items = chosen[torch.isin(chosen, ev.test_items)]
    tr = sample_item_triples(ev.cat, ev.cfg.attack.triples_per_item, ev.ctx.generator("evaluate:adaptive-triples"),
                             ev.cfg.attack.triple_roles)
    has_det = ev.has_detector
    freeze = (ev.defense.denoiser,) + ((ev.defense.detector,) if has_det else ())
    record = {"n_adaptive_items": int(chosen.numel()), "steps": spec["steps"], "detect_weight": spec["detect_weight"]}
    attackers = _purifier_attackers() + ([("unflagged", None)] if has_det else [])
    rows, det_rows, gated = [], [], {}
    for name, rand in attackers:
        gen = ev.ctx.generator(f"evaluate:adaptive:{name}")
        attack = _unflagged_attack(ev, spec, gen) if rand is None else _make_attack(ev, spec, rand, gen, ev.bs)
        out = base.clone()
        out[chosen] = attack_items(enc, ev.cat, chosen, attack, tr, eps255, ev.dev, ev.bs, freeze=freeze,
                                   channels_last=True, desc=f"adaptive-pgd vs {name}", progress=ev.cfg.run.progress)
        tag = name if rand is None else ("rand" if rand else "det")
        np.save(ev.run.attack_file("VBPR", f"adaptive-pgd-{tag}", eps255), out.numpy())
        den, rnd = ev.purify_all(out, desc=f"purify adaptive {name}", tag=f"adaptive:{name}")
        extra = {**record, "eot": spec["eot"] if rand else 1}
        base_row = {"model": "VBPR", "attack": "adaptive-pgd", "eps": int(eps255)}
        if rand is not None:  # the purifying deployment this attacker was built for
            rows.append({**base_row, "defense": name, **ev.rank(rec, rnd if rand else den), **extra})
        for dep in (deployments.ordered(detector=True) if has_det else []):
            r = {**base_row, "defense": dep, "against": name, **DEPLOYMENTS[dep].rank(ev, rec, out, den, rnd),
                 **extra}
            if dep not in gated or r["HR@10"] < gated[dep]["HR@10"]:
                gated[dep] = r
        if has_det and det_items.numel():
            d_adv = ev.distances(out[det_items])
            ev.arrays[f"d_adaptive_{name}"] = d_adv.numpy()
            det_rows.append(_detection_row(ev, d_adv, name, eps255, extra))
    ev.run.add_rows("ranking", rows + list(gated.values()), table=NAME)
    ev.run.add_rows("detection", det_rows, table=NAME)


def eval_objective(ev: Evaluation, spec: dict) -> None:
    """Adaptive PGD on whole evaluation lists (``list_loss`` through the defence)."""
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
    for dname, imgs in deployments.views(den_c, rnd_c):
        feats = ev.encode_all(enc, imgs).cpu()[lists]
        rows.append({**base, "defense": dname, "attack": "clean-adaptive-subset", "eps": 0,
                     **list_ranking(rec, ev.cat, users, feats, ev.topk)})
    freeze = (enc, getattr(enc, "backbone", None), ev.defense.denoiser, ev.defense.detector)
    for dname, rand in _purifier_attackers():
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
    ev.run.add_rows("ranking", rows, table=NAME)
    ev.log.info("evaluate adaptive (eval objective): %d users, %d rows", U, len(rows))


def adaptive_table(R: list[dict], A: list[dict], D: list[dict]) -> str:
    """The adaptive rows (``A``, train objective) beside the same defence's clean and plain-PGD
    rows (``R``) and the detection rate of the adaptive images (``D``)."""
    A = [r for r in A if r.get("attack") == "adaptive-pgd"]
    if not A:
        return missing("no adaptive-attack rows (eval.adaptive.enabled off or not run)")
    rows = []
    for r in A:
        e = r["eps"]
        clean = find(R, model=r["model"], defense=r["defense"], attack="clean", eps=0) or {}
        plain = find(R, model=r["model"], defense=r["defense"], attack="pgd", eps=e) or {}
        det = find(D, detector="ours", attack="adaptive-pgd", eps=e, variant=r.get("against", r["defense"])) or {}
        name = deployments.label(r["defense"]) + (f" (vs {r['against']} attacker)" if "against" in r else "")
        rows.append([r["model"], name, e, clean.get("HR@10"), plain.get("HR@10"), r.get("HR@10"), r.get("NDCG@10"),
                     det.get("tpr"), det.get("tpr_at_fpr05"), r.get("flagged"), r.get("n_adaptive_items"),
                     r.get("steps"), r.get("eot"), r.get("detect_weight")])
    return table(["model", "defence", "eps", "HR@10 clean", "HR@10 PGD (non-adaptive)", "HR@10 adaptive-PGD",
                  "NDCG@10 adaptive", "TPR (deployed threshold)", "TPR at val. FPR<=0.05", "flagged share",
                  "items attacked", "steps", "EOT draws", "detector weight"], rows)


def adaptive_eval_table(rows: list[dict]) -> str:
    """The adaptive attacker on the eval objective's lists (a seeded subset of the oracle users)."""
    A = [r for r in rows if r.get("attack") == "adaptive-pgd"]
    if not A:
        # off by design in the default preset (its cost: docs/results/adaptive_cost.md), so not a gap
        return ("Not run in this configuration: `eval.adaptive.oracle_users = -1` (the default; "
                "`--preset full` runs it) or no `eval` objective.")
    out = []
    for r in A:
        clean = find(rows, model=r["model"], defense=r["defense"], attack="clean-adaptive-subset", eps=0) or {}
        out.append([r["model"], deployments.label(r["defense"]), r["eps"], r.get("n_users"),
                    clean.get("HR@10"), r.get("HR@10"), r.get("steps"), r.get("eot"), r.get("detect_weight")])
    return table(["model", "defence", "eps", "users", "HR@10 clean (same users)", "HR@10 adaptive-PGD",
                  "steps", "EOT draws", "detector weight"], out)


def report(doc: Doc) -> list[str]:
    R, D = doc.rows("ranking", "ranking"), doc.rows("detection", "adaptive")
    A, A_eval = doc.rows("ranking", "adaptive", objective="train"), doc.rows("ranking", "adaptive", objective="eval")
    return ["## Adaptive attacker (beyond the paper)", "",
            "PGD through the denoiser (and, for OURS-rand, expectation over the random resize-pad) with a "
            "hinge keeping the detector distance under its threshold; see `vars_fast/attacks/adaptive.py`.", "",
            adaptive_table(R, A, D), "", floor_line(doc.rows("ranking", "ranking")), "",
            "Each purifying defence is attacked through itself. The detector-gated platforms (OURS-gated: "
            "denoise only flagged uploads; OURS-withhold: withhold them, the item keeps its clean feature, "
            "`eval.withhold_fallback`) also face their own attacker, `unflagged`: PGD on the raw upload "
            "under the detector hinge, keeping each image's most damaging iterate that stays under the "
            "deployed threshold, the path an unflagged upload really takes. Their row is the strongest of "
            "the attackers (`vs ...`). The FPR <= 0.05 threshold is chosen on the clean validation items.", "",
            "### On the eval objective's lists", "", adaptive_eval_table(A_eval), ""]


SECTIONS.register(NAME, Section(order=70, run=adaptive, report=report))
