"""The bounded VBPR's frontier: clean, certified and attacked HR@10 against the cap.

    python tools/bounded_frontier.py RUN_DIR [--caps 0.25,0.5,1,2,4] [--eps 8] [--steps 10]
                                     [--out docs/results/data/bounded_frontier_default.json] [--save CAP]
                                     [--model VBPR-bounded|AMR-bounded] [--record]

RUN_DIR is a finished run folder (its recommender stage at least: catalogue cache, VBPR and BPR
checkpoints). For each cap, VBPR-bounded trains on the run's catalogue and clean features with
the run's recommender settings (seed from the run), then is measured: clean HR@10, certified
HR@10 (any change of any image; recommenders/bounded.py) and HR@10 under APGD at ``--eps`` on
every item (BPR loss, ``--steps`` steps, one restart; the attack suite's light APGD).
``--model AMR-bounded`` fine-tunes each cap's VBPR-bounded with AMR and measures that. The
unconstrained VBPR's effective visual weights ‖Eᵀp_u + β′‖ are reported first: the grid should
span them. Writes one JSON (the rows and the run's BPR / VBPR clean HR@10) and prints a table.
``--save CAP`` also stores that cap's model in the run folder (``recommender_VBPR-bounded``, its
clean and certified robustness rows), so that ``python -m vars_fast evaluate RUN_DIR --section
suite --set 'eval.suite.models=[VBPR,VBPR-bounded]'`` attacks it with the suite. ``--record`` writes
every cap's clean, certified and attacked HR@10 to the run's ``robustness`` rows (table
``frontier``, ``variant: "cap=<c>"``), from which ``python -m vars_fast report RUN_DIR`` draws the
frontier table and figure (``vars_fast/evaluate/robustness.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--caps", default="0.25,0.5,1,2,4")
    ap.add_argument("--eps", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--save", type=float, default=None, help="store the model of this cap in the run folder")
    ap.add_argument("--model", default="VBPR-bounded",
                    help="the bounded model swept; one with a base (AMR-bounded) fine-tunes the base trained at each cap")
    ap.add_argument("--record", action="store_true",
                    help="write each cap's rows to the run's metrics.json (the report's frontier section)")
    args = ap.parse_args()

    # deferred: --help answers without torch
    import dataclasses

    import torch

    from vars_fast.attacks.apgd import APGD
    from vars_fast.attacks.untargeted import attack_items, sample_item_triples
    from vars_fast.metrics import ranking_metrics
    from vars_fast.pipeline import Context
    from vars_fast.recommenders import RECOMMENDERS, build_recommender, encode_catalogue, save_recommender
    from vars_fast.recommenders.bounded import certified_metrics
    from vars_fast.recommenders.stage import certificate

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ctx = Context.open(args.run_dir, {"run.progress": False}, device="cpu", log=logging.getLogger("frontier"))
    cfg, cat = ctx.cfg, ctx.catalogue
    vbpr, bpr = ctx.recommender("VBPR"), ctx.recommender("BPR")
    feats = vbpr.item_visual
    with torch.no_grad():
        w = (vbpr.P @ vbpr.E + (vbpr.beta_visual if vbpr.biases else 0)).norm(dim=1)
    spread = {q: float(w.quantile(q)) for q in (0.1, 0.5, 0.9, 1.0)}
    base = {"VBPR": ranking_metrics(vbpr, cat, topk=(10,))["HR@10"], "BPR": ranking_metrics(bpr, cat, topk=(10,))["HR@10"]}
    ctx.log.info("unconstrained VBPR ||w_u|| quantiles %s; clean HR@10 %s", spread, base)
    triples = sample_item_triples(cat, cfg.attack.triples_per_item, ctx.generator("frontier:triples"),
                                  cfg.attack.triple_roles)
    rows = []
    for cap in [float(c) for c in args.caps.split(",")]:
        t0 = time.process_time()
        rc = dataclasses.replace(cfg.recommender, bounded=dataclasses.replace(cfg.recommender.bounded, cap=cap))
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator("init:VBPR")))
        m = build_recommender("VBPR-bounded", cat.n_users, cat.n_items, rc, backbone=ctx.backbone, seed=seed)
        m.fit(cat, rc, ctx.generator("recommender:VBPR"), show_progress=False, features=feats)
        if args.model != m.name:  # a fine-tune of the bounded VBPR (its base), as the recommender stage trains it
            cls = RECOMMENDERS[args.model]
            if cls.base != m.name:
                raise SystemExit(f"--model {args.model}: not VBPR-bounded nor fine-tuned from it")
            m.eval()
            m = cls.from_trained(m, rc)
            m.fit(cat, rc, ctx.generator(f"recommender:{args.model}"), show_progress=False)
        m.eval().requires_grad_(False)
        gen = ctx.generator(f"frontier:apgd:{cap}")
        adv = attack_items(m, cat, torch.arange(cat.n_items),
                           lambda fn, x, idx: APGD(fn, args.eps / 255, steps=args.steps, generator=gen)(x),
                           triples, args.eps, "cpu", int(cfg.eval.batch_size), channels_last=True)
        with torch.no_grad():
            attacked = ranking_metrics(m, cat, visual=encode_catalogue(m, adv, progress=False), topk=(10,))["HR@10"]
            b = m.visual_bound(torch.arange(cat.n_users))
        row = {"cap": cap, "bound_mean": float(b.mean()), "clean": ranking_metrics(m, cat, topk=(10,))["HR@10"],
               "certified": certified_metrics(m, cat, topk=(10,))["HR@10"], f"apgd{args.steps}": attacked,
               "cpu_s": round(time.process_time() - t0, 1)}
        rows.append(row)
        ctx.log.info("cap %g: %s", cap, row)
        if args.record:
            ctx.run.add_rows("robustness", frontier_rows(m.name, row, args.eps, args.steps), table="frontier")
        if args.save is not None and cap == args.save:
            save_recommender(m, ctx.run.checkpoint(f"recommender_{m.name}"), split_key=cat.meta.get("split_key"))
            pair, stats = certificate(m, cat, ranking_metrics(m, cat, topk=tuple(cfg.eval.topk)), tuple(cfg.eval.topk))
            ctx.run.add_rows("robustness", pair, table="suite")
            ctx.run.update_meta(bounded={m.name: stats})
    out = {"run": str(args.run_dir), "preset": cfg.preset, "model": args.model, "eps": args.eps, "apgd_steps": args.steps,
           "unconstrained_w_quantiles": spread, "clean": base, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print("| cap | mean ‖w_u‖ | clean HR@10 | certified HR@10 | APGD HR@10 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cap']:g} | {r['bound_mean']:.3f} | {r['clean']:.4f} | {r['certified']:.4f} | "
              f"{r[f'apgd{args.steps}']:.4f} |")


def frontier_rows(model: str, row: dict, eps: float, steps: int) -> list[dict]:
    """One cap's point as robustness rows (evaluate/robustness.py reads them)."""
    base = {"model": model, "defense": "bounded", "objective": "train", "cap": row["cap"],
            "variant": f"cap={row['cap']:g}", "bound_mean": row["bound_mean"]}
    return [{**base, "attack": "clean", "eps": 0, "certified": False, "HR@10": row["clean"]},
            {**base, "attack": "any", "eps": None, "certified": True, "HR@10": row["certified"]},
            {**base, "attack": "apgd", "eps": eps, "certified": False, "loss": "bpr", "steps": steps, "restarts": 1,
             "HR@10": row[f"apgd{steps}"]}]


if __name__ == "__main__":
    main()
