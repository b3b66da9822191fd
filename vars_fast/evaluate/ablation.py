"""Table 5: PGD at ``eval.table_eps`` on VBPR through the ``no-detector`` and
``no-perceptual`` checkpoints (ranking rows carry ``variant``), plus PGD detection accuracy."""
from __future__ import annotations

import math

from vars_fast.defense import load_defense
from vars_fast.evaluate import deployments
from vars_fast.evaluate.common import Evaluation, det_json
from vars_fast.evaluate.section import Doc, Section, find, missing, table
from vars_fast.metrics import detection_metrics
from vars_fast.registry import DEFENSE_VARIANTS, SECTIONS

NAME = "ablation"  # the section: its registry name and the ``table`` of its rows


def ablation(ev: Evaluation) -> None:
    eps = ev.cfg.eval.table_eps
    if "VBPR" not in ev.models:
        return
    adv = ev.load_attack("VBPR", "pgd", eps)
    if adv is None:
        return
    rec = ev.ctx.recommender("VBPR")
    rows, det_rows = [], []
    variants = [("full", ev.defense)]
    for v in [v for v in ev.cfg.defense.ablations if v != "full"]:
        path = ev.run.checkpoint(f"defense_{v}")
        if path.is_file():
            variants.append((v, ev.fast_defense(load_defense(path, device=ev.dev))))
        else:
            ev.log.warning("evaluate: %s missing: ablation %s skipped", path, v)
    items = ev.test_items
    for v, d in variants:
        if v != "full":  # the full model's ranking rows are the main ones (no variant key)
            den, rnd = ev.purify_all(adv, defense=d, desc=f"ablation {v}", tag=f"ablation:{v}")
            for dname, imgs in deployments.views(den, rnd):
                rows.append({"model": "VBPR", "defense": dname, "attack": "pgd", "eps": eps, "variant": v,
                             **ev.rank(rec, imgs)})
        if d.detector is not None and math.isfinite(d.threshold):
            dc = ev.d_clean() if d is ev.defense else ev.distances(ev.cat.images[items], d)
            m = detection_metrics(dc, ev.distances(adv[items], d), float(d.threshold))
            det_rows.append({"detector": "ours", "attack": "pgd", "eps": eps, "variant": v, **det_json(m)})
    ev.run.add_rows("ranking", rows, table=NAME)
    ev.run.add_rows("detection", det_rows, table=NAME)


def ablation_table(R: list[dict], D: list[dict], eps: float) -> str:
    """Table 5: PGD at eps on VBPR: accuracy, NDCG@10, HR@10 per variant (the full model's
    ranking rows are the ranking section's, without a variant)."""
    rows = []
    for v in DEFENSE_VARIANTS.names():
        label = DEFENSE_VARIANTS.meta(v).get("label", v)
        rv = None if v == "full" else v
        rr = find(R, model="VBPR", defense="denoise+rand", attack="pgd", eps=eps, variant=rv)
        rd = find(R, model="VBPR", defense="denoise", attack="pgd", eps=eps, variant=rv)
        det = find(D, detector="ours", attack="pgd", eps=eps, variant=v)
        if rr is None and rd is None and det is None:
            continue
        rows.append([label, (det or {}).get("accuracy"), (rr or {}).get("NDCG@10"), (rr or {}).get("HR@10"),
                     (rd or {}).get("NDCG@10"), (rd or {}).get("HR@10")])
    if not rows:
        return missing("no ablation rows")
    return table(["variant", "accuracy", "NDCG@10 (rand)", "HR@10 (rand)", "NDCG@10", "HR@10"], rows)


def report(doc: Doc) -> list[str]:
    R, D = doc.rows("ranking", "ranking", "ablation"), doc.rows("detection", "ablation")
    return [f"## Table 5: ablation (PGD, VBPR, eps = {doc.eps:g})", "", ablation_table(R, D, doc.eps), ""]


SECTIONS.register(NAME, Section(order=50, run=ablation, report=report))
