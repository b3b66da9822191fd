"""The seen / unseen detection table on a finished run (its defence stage done).

    python tools/detector_generalisation.py RUN_DIR [--json OUT.json]

Reads RUN_DIR's config, catalogue cache, VBPR checkpoint and ``checkpoints/defense.pt`` and
runs the evaluate stage's own ``generalisation`` section (``vars_fast/evaluate/generalisation.py``:
the defence's held-out test items, the run's ``eval.*`` and ``attack.*`` sizes), without the rest
of the evaluation. Prints the rows as a Markdown table, adds them to RUN_DIR's metrics.json as
the evaluation does, and with ``--json`` also writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    import torch

    from vars_fast.evaluate.common import Evaluation
    from vars_fast.evaluate.generalisation import generalisation, markdown_table
    from vars_fast.pipeline import Context

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run = Path(args.run_dir)
    ctx = Context.open(run, {"run.progress": False, "eval.generalisation": True}, device="cpu",
                       log=logging.getLogger("generalisation"))
    cfg = ctx.cfg
    torch.manual_seed(cfg.run.seed)
    ev = Evaluation(ctx)
    t0 = time.perf_counter()
    generalisation(ev)
    rows = [r for r in ctx.run.rows("detection") if "seen" in r]
    print(f"{ev.test_items.numel()} test items, threshold {ev.defense.threshold:.4f}, detector_eps "
          f"{cfg.defense.detector_eps}, train_eps {cfg.defense.train_eps}, {time.perf_counter() - t0:.0f} s\n")
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
