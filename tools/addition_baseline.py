"""Fit the ADDITION baseline (Table 4) in a run folder that holds the recommender stage, and
choose its validation threshold, without the rest of the evaluation:

    python tools/addition_baseline.py RUN_DIR [--model VBPR] [--refit] [--threads N] [--set KEY=VALUE ...]

Writes RUN_DIR/checkpoints/addition_<model>.pt and RUN_DIR/addition.json (validation metrics,
threshold, training history); the evaluate stage measures the same detector on the test items
beside ours (``vars_fast.defense.addition.fit_in_run``).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--model", default="VBPR")
    p.add_argument("--refit", action="store_true", help="train again even when checkpoints/addition_<model>.pt exists")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the run's config (repeatable), e.g. --set defense.addition.noise_epochs=2")
    args = p.parse_args(argv)

    import torch  # after parsing: --help answers without torch

    from vars_fast.config import ConfigError, parse_set
    from vars_fast.defense.addition import check_config, fit_in_run
    from vars_fast.io import atomic_write_json
    from vars_fast.pipeline import Context

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ctx = Context.open(args.run_dir, parse_set(args.set))
        check_config(ctx.cfg.defense.addition)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir, log = ctx.run.path, ctx.log
    try:
        add, info = fit_in_run(ctx, args.model, refit=args.refit)
    except FileNotFoundError as e:
        log.error("addition: %s", e)
        return 1
    out = {"validation": info["validation"], "seconds": info["seconds"], "threshold": float(add.threshold),
           "history": add.extra.get("history", {})}
    atomic_write_json(run_dir / "addition.json", out)
    log.info("addition: wrote %s", run_dir / "addition.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
