"""python -m vars_fast evaluate RUN_DIR [--section NAME ...]: re-run the evaluate stage, or some
of its sections, on a finished run folder, then rewrite its report.md.

    python -m vars_fast evaluate runs/quick --section adaptive --set eval.adaptive.steps=20

Each section's rows replace its earlier rows (row identity, ``vars_fast.run``); the other
sections' rows, arrays and timings stay. ``--set`` overrides are saved to the folder's
config.yaml, so that the config and the rows agree.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from vars_fast.cli import add_debug_flag, user_errors_exit
from vars_fast.config import parse_set, save_yaml
from vars_fast.errors import ConfigError
from vars_fast.evaluate.stage import ordered, run_stage
from vars_fast.pipeline import Context
from vars_fast.report import write_report
from vars_fast.train import configure_process
from vars_fast.utils import seed_everything


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vars_fast evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_dir", help="a run folder (python -m vars_fast train --out DIR made it)")
    p.add_argument("--section", action="append", default=[], metavar="NAME",
                   help=f"a section to re-run (repeatable or comma-separated; default: all): {', '.join(ordered())}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set eval.adaptive.eot=16")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="compute device (run.device)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-report", action="store_true", help="leave report.md as it is")
    add_debug_flag(p)
    return p


def sections_from(items: list[str]) -> Optional[list[str]]:
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        return None
    computing = ordered()
    for n in names:
        if n not in computing:
            raise ConfigError(f"--section: {n!r} is not a section that computes rows (choose from {', '.join(computing)})")
    return names


@user_errors_exit()
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sections = sections_from(args.section)
    overrides = parse_set(args.set)
    if args.device:
        overrides["run.device"] = args.device
    if args.no_progress:
        overrides["run.progress"] = False
    ctx = Context.open(args.run_dir, overrides)
    if overrides:
        save_yaml(ctx.cfg, ctx.run.path / "config.yaml")
        ctx.run.update_meta(config=ctx.cfg.to_dict())
    configure_process(ctx.cfg)
    seed_everything(ctx.cfg.run.seed)
    ctx.log.info("evaluate %s: %s", ctx.run.path, ", ".join(sections or ordered()))
    run_stage(ctx, sections)
    if not args.no_report:
        ctx.log.info("report: %s", write_report(ctx.run.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
