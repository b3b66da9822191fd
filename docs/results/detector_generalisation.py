"""The seen / unseen detection table on a finished run (its defence stage done).

    python docs/results/detector_generalisation.py RUN_DIR [--json OUT.json]

Reads RUN_DIR's config, catalogue cache, VBPR checkpoint and ``checkpoints/defense.pt``, takes
the defence's held-out test items (seeded order, at most ``defense.n_detect_items``, as the
evaluate stage does) and prints ``vars_fast.evaluate.generalisation.generalisation_rows`` as a
Markdown table; the attack sizes follow the run's config (``attack.pgd_steps``,
``attack.triples_per_item``, ``eval.batch_size``). ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    from vars_fast.config import from_dict
    from vars_fast.evaluate.generalisation import generalisation_rows, markdown_table
    from vars_fast.pipeline import Context
    from vars_fast.run import RunFolder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run = Path(args.run_dir)
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    cfg.run.progress = False
    ctx = Context(cfg=cfg, run=RunFolder(run), device=torch.device("cpu"), log=logging.getLogger("generalisation"))
    defense, cat, rec = ctx.defense(), ctx.catalogue, ctx.recommender("VBPR")
    test = torch.as_tensor(defense.split["test"], dtype=torch.long)
    test = test[torch.randperm(test.numel(), generator=ctx.generator("evaluate:detect-items"))]
    items = test[: int(cfg.defense.n_detect_items)]
    t0 = time.perf_counter()
    rows = generalisation_rows(defense, rec, cat, items, ctx.generator("evaluate:generalisation"), cfg.defense,
                               pgd_eps=sorted({int(cfg.eval.table_eps), 16}), pgd_steps=cfg.attack.pgd_steps,
                               triples_per_item=cfg.attack.triples_per_item, triple_roles=cfg.attack.triple_roles,
                               batch_size=cfg.eval.batch_size, log=ctx.log)
    print(f"{items.numel()} test items, threshold {defense.threshold:.4f}, detector_eps {cfg.defense.detector_eps}, "
          f"train_eps {cfg.defense.train_eps}, {time.perf_counter() - t0:.0f} s\n")
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
