"""Detection of the adaptive attacker by a run's trained defence, with a fixed attacker:
the evaluation's own adaptive section (``vars_fast/evaluate/adaptive.py``, train objective)
on the run folder, its detection rows printed and written as JSON.

    python benchmarks/adaptive_detection.py RUN_DIR [--set eval.adaptive.steps=10 ...] [--out FILE]

The run folder needs the recommender and defence checkpoints. The attacker is the run's
``eval.adaptive.*`` settings with the ``--set`` overrides; comparing two defences means the
same overrides on both folders (docs/results/adaptive_hardening.md). The section writes its
rows into the run's metrics.json as the evaluation does.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch


def main() -> None:
    from vars_fast.config import parse_set
    from vars_fast.evaluate import Evaluation
    from vars_fast.evaluate.adaptive import attacker_spec, train_objective
    from vars_fast.pipeline import Context

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ctx = Context.open(a.run_dir, {**parse_set(a.set), "run.progress": False}, device="cpu",
                       log=logging.getLogger("adaptive"))
    cfg = ctx.cfg
    torch.manual_seed(cfg.run.seed)
    ev = Evaluation(ctx)
    spec = attacker_spec(ev)
    train_objective(ev, spec)
    rows = ctx.run.rows("detection", attack="adaptive-pgd")
    keep = ("variant", "eps", "steps", "eot", "detect_weight", "n_adv", "threshold", "tpr", "fpr", "tpr_at_fpr05",
            "threshold_fpr05", "auc")
    out = {"run": str(a.run_dir), "overrides": a.set, "rows": [{k: r.get(k) for k in keep} for r in rows]}
    print(json.dumps(out, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
