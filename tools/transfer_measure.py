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

    from vars_fast.config import apply_overrides, from_dict, load_yaml, parse_set
    from vars_fast.evaluate.common import Evaluation
    from vars_fast.evaluate.transfer import transfer
    from vars_fast.pipeline import Context
    from vars_fast.report import write_report
    from vars_fast.run import RunFolder

    cfg = from_dict(load_yaml(f"{run}/config.yaml"))
    apply_overrides(cfg, parse_set(sets))
    cfg.eval.transfer.enabled = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ctx = Context(cfg=cfg, run=RunFolder(run), device=torch.device("cpu"), log=logging.getLogger("transfer"))
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
