"""Run the transfer section alone on a run folder that holds A's VBPR and defence, print its
per-part CPU seconds and write report.md (docs/results/transfer.md gives the commands).

    python tools/transfer_measure.py RUN [--set section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import time


def main(run: str, sets: list[str]) -> None:
    import torch

    from vars_fast.config import parse_set
    from vars_fast.evaluate.common import Evaluation
    from vars_fast.evaluate.transfer import transfer
    from vars_fast.pipeline import Context
    from vars_fast.report import write_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ctx = Context.open(run, {**parse_set(sets), "eval.transfer.enabled": True}, device="cpu",
                       log=logging.getLogger("transfer"))
    cfg = ctx.cfg
    torch.manual_seed(cfg.run.seed)
    ev = Evaluation(ctx)
    t0, c0 = time.perf_counter(), time.process_time()
    transfer(ev)
    ev.timings.update(transfer_s=round(time.perf_counter() - t0, 1), transfer_cpu_s=round(time.process_time() - c0, 1))
    print(json.dumps(ev.timings))
    write_report(run, figures=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run folder with A's VBPR and defence")
    ap.add_argument("--set", action="append", default=[], metavar="section.key=value", help="config override")
    args = ap.parse_args()
    main(args.run, args.set)
