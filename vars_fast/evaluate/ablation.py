"""Table 5: PGD at ``eval.table_eps`` on VBPR through the ``no-detector`` and
``no-perceptual`` checkpoints (ranking rows carry ``variant``), plus PGD detection accuracy."""
from __future__ import annotations

import math

from vars_fast.evaluate.common import RANK_DEFENSES, Evaluation, det_json


def ablation(ev: Evaluation) -> None:
    from vars_fast.defense import load_defense
    from vars_fast.metrics import detection_metrics

    eps = ev.cfg.eval.table_eps
    if "VBPR" not in ev.models:
        return
    adv = ev.load_attack("VBPR", "pgd", eps)
    if adv is None:
        return
    rec = ev.ctx.recommender("VBPR")
    rows, det_rows = [], []
    variants = [("full", ev.defense)]
    for v in ("no-detector", "no-perceptual"):
        path = ev.run.checkpoint(f"defense_{v}")
        if path.is_file():
            variants.append((v, ev.fast_defense(load_defense(path, device=ev.dev))))
        else:
            ev.log.warning("evaluate: %s missing: ablation %s skipped", path, v)
    items = ev.test_items
    for v, d in variants:
        if v != "full":  # the full model's ranking rows are the main ones (no variant key)
            den, rnd = ev.purify_all(adv, defense=d, desc=f"ablation {v}", tag=f"ablation:{v}")
            for dname, imgs in zip(RANK_DEFENSES, (den, rnd)):
                rows.append({"model": "VBPR", "defense": dname, "attack": "pgd", "eps": eps, "variant": v,
                             **ev.rank(rec, imgs)})
        if d.detector is not None and math.isfinite(d.threshold):
            dc = ev.d_clean() if d is ev.defense else ev.distances(ev.cat.images[items], d)
            m = detection_metrics(dc, ev.distances(adv[items], d), float(d.threshold))
            det_rows.append({"detector": "ours", "attack": "pgd", "eps": eps, "variant": v, **det_json(m)})
    ev.run.add_rows("ranking", rows)
    ev.run.add_rows("detection", det_rows)
