"""python -m vars_fast.train: the whole pipeline, stage by stage, into one run folder.

    python -m vars_fast.train                       # the embedded default (synthetic, CPU)
    python -m vars_fast.train --preset quick        # a few minutes on 2 cores
    python -m vars_fast.train --preset paper --set data.source=amazon --set data.interactions=...
    python -m vars_fast.train --out runs/x --stages defense,evaluate   # re-run stages in a folder

Stages read what earlier stages wrote into the run folder, so any stage can be re-run alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from vars_fast.cli import add_debug_flag, user_errors_exit
from vars_fast.config import apply_overrides, from_dict, load_yaml, make_config, parse_set, save_yaml, validate
from vars_fast.registry import STAGES

# The pipeline: STAGES in registration order. Each member imports its stage when it runs
# (deferred on purpose): this module is the registry's home of STAGES, which the config imports
# to check run.stages, and --help answers from it; neither should load every stage.
# main_only: rank 0 runs it alone under DDP (the inference stages), the other ranks wait at a
# barrier.


@STAGES.register("recommender", main_only=False)
def _recommender(ctx) -> None:
    from vars_fast.recommenders.stage import run_stage  # deferred (above)
    run_stage(ctx)


@STAGES.register("attack", main_only=True)
def _attack(ctx) -> None:
    from vars_fast.attacks.stage import run_stage  # deferred (above)
    run_stage(ctx)


@STAGES.register("defense", main_only=False)
def _defense(ctx) -> None:
    from vars_fast.defense.stage import run_stage  # deferred (above)
    run_stage(ctx)


@STAGES.register("evaluate", main_only=True)
def _evaluate(ctx) -> None:
    from vars_fast.evaluate import run_stage  # deferred (above)
    run_stage(ctx)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vars_fast train",
        description="Train and evaluate attacks and the denoise+detect defence on a visually-aware recommender.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--preset", help="quick | default | full | paper (default: default, or the config file's preset)")
    p.add_argument("--config", help="YAML file with config sections (data:, recommender:, ...)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set attack.eps=[8,16]")
    p.add_argument("--out", help="run folder (default: runs/<preset>-<timestamp>); an existing folder is reused")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="compute device (run.device)")
    p.add_argument("--seed", type=int, help="global seed (run.seed)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_debug_flag(p)
    return p


def resolve_config(args: argparse.Namespace):
    overrides = parse_set(args.set)
    if args.device:
        overrides["run.device"] = args.device
    if args.seed is not None:
        overrides["run.seed"] = args.seed
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        STAGES.check(stages, "--stages")
        overrides["run.stages"] = stages
    if args.no_progress:
        overrides["run.progress"] = False

    # Re-running stages in an existing run folder: start from its saved config.
    if args.out and (Path(args.out) / "config.yaml").is_file() and not args.preset and not args.config:
        cfg = from_dict(load_yaml(Path(args.out) / "config.yaml"))
        apply_overrides(cfg, overrides)
        validate(cfg)
        return cfg
    return make_config(args.preset, args.config, overrides)


@user_errors_exit()
def main(argv: list[str] | None = None) -> int:
    """A ``ConfigError`` or ``FileNotFoundError`` from any stage ends the run with ``error: <message>``
    on stderr and exit code 2 (``vars_fast.cli``)."""
    args = build_parser().parse_args(argv)
    return run(resolve_config(args), args.out)


def configure_process(cfg) -> None:
    """What a run sets for the whole process: the ops backend, progress bars, torch threads."""
    import torch  # deferred: --help answers without torch

    if cfg.run.backend != "auto":
        os.environ["VARS_FAST_BACKEND"] = cfg.run.backend
    if not cfg.run.progress:
        os.environ["VARS_FAST_PROGRESS"] = "0"
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def run(cfg, out: str | None = None) -> int:
    # deferred: torch and the pipeline load when a run starts, not at import, so that --help
    # answers without them
    from vars_fast.distributed import ddp
    from vars_fast.pipeline import Context
    from vars_fast.utils import get_device, seed_everything, versions

    configure_process(cfg)
    try:
        device = get_device(cfg.run.device)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # a group the caller had already joined is theirs to leave
    joined_here = not ddp.is_distributed() and ddp.init_from_env(device)

    name = cfg.run.name or f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(out) if out else Path(cfg.run.out) / name
    ctx = Context.open(path, cfg=cfg, device=device)
    run_folder, log = ctx.run, ctx.log
    if ddp.is_main():
        save_yaml(cfg, path / "config.yaml")
        run_folder.update_meta(config=cfg.to_dict(), versions=versions())
    seed_everything(cfg.run.seed)
    # every stage reads the data: read it before the first log line, so that bad input (a missing
    # file, absent columns, too few interactions) ends the run in one line, before any work
    _ = ctx.catalogue
    log.info("run folder %s (preset %s, device %s%s)", path, cfg.preset, device,
             f", {ddp.world_size()} ranks" if ddp.is_distributed() else "")

    timings = dict(run_folder.load_metrics().get("meta", {}).get("timings", {}))
    for stage, run_stage in STAGES.items():
        if stage not in cfg.run.stages:
            continue
        main_only = STAGES.meta(stage)["main_only"]
        if main_only and not ddp.is_main():
            ddp.barrier()  # inference stages run on rank 0 only
            continue
        log.info("stage %s: start", stage)
        t0 = time.perf_counter()
        run_stage(ctx)
        dt = time.perf_counter() - t0
        # re-read: the stage may have written its own entries (train_<model>_s, ...), which
        # replace those of an earlier run in the same folder
        timings = {**timings, **run_folder.load_metrics().get("meta", {}).get("timings", {}),
                   f"stage_{stage}_s": round(dt, 2)}
        if ddp.is_main():
            run_folder.update_meta(timings=timings)
        log.info("stage %s: done in %.1f s", stage, dt)
        if main_only:
            ddp.barrier()

    if ddp.is_main():
        from vars_fast.report import write_report  # deferred: matplotlib, only at the end of a run

        write_report(path)
        log.info("report: %s", path / "report.md")
    if joined_here:
        ddp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
