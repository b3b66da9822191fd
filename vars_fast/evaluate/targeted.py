"""Table 6: the attack stage's targeted images, purified, with every user re-scored.

Only the prediction shift (Table 6's metric) is computed: the targets' HR@N would re-score
every user's negatives for each of the many (attack, eps, defence) cells.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from vars_fast.attacks.targeted import target_scores
from vars_fast.evaluate import deployments
from vars_fast.evaluate.common import Evaluation
from vars_fast.evaluate.section import Doc, Section, find, missing, table
from vars_fast.metrics import prediction_shift
from vars_fast.registry import SECTIONS, TARGETED

NAME = "targeted"  # the section: its registry name and the ``table`` of its rows


def targeted(ev: Evaluation) -> None:
    meta_path = ev.run.path / "attacks" / "targets.json"
    if not meta_path.is_file() or "VBPR" not in ev.models:
        ev.log.warning("evaluate: %s missing: targeted rows skipped", meta_path)
        return
    info = json.loads(meta_path.read_text())
    model = info.get("model", "VBPR")
    rec = ev.ctx.recommender(model)
    targets = torch.as_tensor(info["targets"], dtype=torch.long)
    with torch.no_grad():
        # the attack stage's reference: clean cached features (its "none" rows use the same)
        before = target_scores(rec, targets, rec.item_visual[targets.to(ev.dev)].float(), ev.cat.n_users)
    rows = []
    for attack in ev.cfg.attack.targets:
        for eps in ev.cfg.attack.target_eps:
            path = ev.run.attack_file(model, attack, eps)
            if not path.is_file():
                continue
            adv = torch.from_numpy(np.load(path))
            den, rnd = ev.purify_all(adv, desc=f"purify {attack} eps={eps}", tag=f"targeted:{attack}:{eps}")
            for dname, imgs in deployments.views(den, rnd):
                with torch.no_grad():
                    after = target_scores(rec, targets, ev.encode_all(ev.ctx.encoder(rec.name), imgs), ev.cat.n_users)
                rows.append({"attack": attack, "eps": eps, "defense": dname, "model": model,
                             "prediction_shift": float(prediction_shift(before, after))})
    ev.run.add_rows("targeted", rows, table=NAME)


def targeted_table(T: list[dict]) -> str:
    """Table 6: mean average prediction shift per eps, without and with the defence."""
    if not T:
        return missing("no targeted rows")
    eps = sorted({float(r["eps"]) for r in T})
    rows = []
    order = {n: i for i, n in enumerate(TARGETED.names())}
    for attack in sorted({r["attack"] for r in T}, key=lambda a: (order.get(a, len(order)), a)):
        for d in deployments.ordered():
            vals = [(find(T, attack=attack, defense=d, eps=e) or {}).get("prediction_shift") for e in eps]
            if any(v is not None for v in vals):
                label = attack.upper() + ("" if d == "none" else f" ({deployments.label(d)})")
                rows.append([label] + vals)
    return table(["attack/defense"] + [f"eps={e:g}" for e in eps], rows)


def report(doc: Doc) -> list[str]:
    return ["## Table 6: targeted attacks, mean average prediction shift (VBPR)", "",
            targeted_table(doc.rows("targeted")), ""]


SECTIONS.register(NAME, Section(order=60, run=targeted, report=report))
