"""``python -m vars_fast.screen``: screen a catalogue of item images with a trained defence.

    python -m vars_fast.screen --input IMAGES/ --checkpoint runs/default-.../ --out screened/
    python -m vars_fast.screen --input manifest.csv --root /data/img --checkpoint defense.pt --out s/
    python -m vars_fast.screen --input 'shards/*.tar' --checkpoint defense.pt --out s/ --engine ray

Every input item gets one output row (Parquet shards ``part-*.parquet``): item_id, source,
status (ok | missing | unreadable | too_small | too_large | outside_root | duplicate_id |
bad_id), error, detector distance, flagged (distance > the checkpoint's threshold) and the
backbone feature of the *denoised* image -- the clean visual feature the recommender should
use. ``summary.json`` and ``score_histogram.png`` sum the run up.

Resumable: re-run the same command after a crash or ``kill -9``; finished shards are skipped
and the output is identical to an uninterrupted run (see vars_fast/screening/output.py).
Memory stays flat in the catalogue size: the item list lives in an on-disk plan (SQLite),
images stream through DataLoader workers one batch at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from vars_fast.cli import USER_ERRORS, add_debug_flag, user_errors_exit
from vars_fast.io import atomic_write_json, load_checkpoint
from vars_fast.screening.local import run_local
from vars_fast.screening.model import Screener, resolve_checkpoint
from vars_fast.screening.output import marker_path, summarise
from vars_fast.screening.plan import InputError, build_plan, plan_path, read_meta
from vars_fast.screening.ray_engine import run_ray
from vars_fast.screening.reader import MAX_BYTES
from vars_fast.utils import get_device, progress as bar, versions


def _run_settings(input_path: str, checkpoint: Optional[str], shard_size: int, id_col: str, path_col: str,
                  root: Optional[str], image_size: int) -> dict:
    """What an output folder's rows depend on (kept in ``<out>/_run.json``): a resumed run must
    match it key by key."""
    ck = None
    if checkpoint:
        p = resolve_checkpoint(checkpoint)
        st = p.stat()
        ck = {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"input": os.path.abspath(input_path), "root": os.path.abspath(root) if root else None,
            "columns": [id_col, path_col], "shard_size": shard_size, "checkpoint": ck,
            "image_size": image_size}


def done_shards(out: Path, n: int, shard_size: int) -> set[int]:
    """Shards with a marker whose row count matches the shard's size under this ``n`` (a shard
    cut short by an earlier ``--limit`` is redone) and whose Parquet file exists."""
    done = set()
    for k in range((n + shard_size - 1) // shard_size):
        m = marker_path(out, k)
        if m.is_file() and (out / f"part-{k:05d}.parquet").is_file():
            try:
                rows = json.loads(m.read_text())["rows"]
            except (ValueError, KeyError):
                continue  # a damaged marker: redo the shard
            if rows == min(n, (k + 1) * shard_size) - k * shard_size:
                done.add(k)
    return done


def _load_screener(checkpoint: Optional[str], engine: str, device: str, *, amp: bool,
                   channels_last: Optional[bool], compile: bool, write_denoised: bool) -> Any:
    """The models, or for the Ray engine (whose actors load the models) only what the driver
    needs of the checkpoint: threshold, image size, device."""
    if engine == "ray":
        ck = load_checkpoint(resolve_checkpoint(checkpoint))
        return SimpleNamespace(threshold=float(ck["threshold"]), image_size=int(ck["image_size"]), device=device)
    return Screener.from_checkpoint(checkpoint, get_device(device), amp=amp, channels_last=channels_last,
                                    compile=compile, keep_denoised=write_denoised)


def _open_out(out_dir: Path, input: str, settings: dict, *, id_col: str, path_col: str,
              root: Optional[str]) -> tuple[Path, dict]:
    """Check ``out_dir`` against ``settings`` (a folder of another run is refused), clear a killed
    run's temp files, and read (or build) the plan: returns (plan path, plan meta)."""
    run_file = out_dir / "_run.json"
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise ValueError(f"--out {out_dir} holds a screening run with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} vs {[settings[k] for k in diff]}); use a new --out")
    for stale in [*out_dir.glob(".part-*.tmp"), *out_dir.glob("_done/.part-*.tmp")]:
        stale.unlink(missing_ok=True)  # a killed run's half-written temp files (one job per --out)
    pf = plan_path(out_dir)
    if pf.is_file() and run_file.is_file():
        return pf, read_meta(pf)
    pf, meta = build_plan(out_dir, input, id_col=id_col, path_col=path_col, root=root)
    atomic_write_json(run_file, settings)
    return pf, meta


def _run_engine(engine: str, screener: Any, checkpoint: Optional[str], pf: Path, meta: dict, out_dir: Path,
                shard_size: int, batch_size: int, done: set[int], on_batch, *, workers: int, device: str,
                amp: bool, channels_last: Optional[bool], compile: bool, write_denoised: bool, max_bytes: int,
                ray_actors: int, batch_threads: int) -> tuple[dict, int]:
    """Screen the shards not in ``done`` with ``engine``; returns (its stats, the batch threads used)."""
    if engine == "local":
        if batch_threads <= 0:
            cpu = screener.device.type == "cpu"
            batch_threads = torch.get_num_threads() if cpu and not compile else 1
        return run_local(screener, pf, meta, out_dir, shard_size, batch_size, done, workers=workers,
                         write_images=write_denoised, max_bytes=max_bytes, on_batch=on_batch,
                         batch_threads=batch_threads), batch_threads
    if engine == "ray":
        return run_ray(checkpoint, pf, meta, out_dir, shard_size, batch_size, done, device=device, amp=amp,
                       channels_last=channels_last, compile=compile, write_images=write_denoised,
                       max_bytes=max_bytes, on_batch=on_batch, actors=ray_actors, screener=screener), batch_threads
    raise ValueError(f"--engine {engine!r}: choose local or ray")


def screen(input: str, checkpoint: Optional[str], out: str, *, limit: Optional[int] = None, batch_size: int = 64,
           workers: int = 2, device: str = "cpu", shard_size: int = 1024, compile: bool = False, amp: bool = False,
           channels_last: Optional[bool] = None, write_denoised: bool = False, engine: str = "local",
           root: Optional[str] = None, id_col: str = "item_id", path_col: str = "path",
           max_bytes: int = MAX_BYTES, progress: bool = True, screener: Any = None,
           ray_actors: int = 1, threads: int = 0, batch_threads: int = 0) -> dict:
    """Run (or resume) a screening job; returns the summary dict (also ``<out>/summary.json``).

    ``screener``: a ready :class:`vars_fast.screening.model.Screener` (tests, benchmarks);
    default: built from ``checkpoint``. ``batch_threads`` (local engine): batches run in
    parallel, each on one intra-op thread; 0: as many as torch threads on CPU without
    ``compile``, else 1 (``screening.local``).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be >= 1")
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if screener is None:
        screener = _load_screener(checkpoint, engine, device, amp=amp, channels_last=channels_last,
                                  compile=compile, write_denoised=write_denoised)
    if write_denoised and hasattr(screener, "keep_denoised"):
        screener.keep_denoised = True
    settings = _run_settings(input, checkpoint, shard_size, id_col, path_col, root, screener.image_size)
    pf, meta = _open_out(out_dir, input, settings, id_col=id_col, path_col=path_col, root=root)
    n = meta["n"] if limit is None else min(meta["n"], int(limit))
    meta = dict(meta, n=n)
    n_shards = (n + shard_size - 1) // shard_size
    done = done_shards(out_dir, n, shard_size)
    todo = n - sum(min(n, (k + 1) * shard_size) - k * shard_size for k in done)
    pbar = bar(total=todo, desc="screen", unit="img", enabled=progress)
    try:
        stats, batch_threads = _run_engine(
            engine, screener, checkpoint, pf, meta, out_dir, shard_size, batch_size, done, pbar.update,
            workers=workers, device=device, amp=amp, channels_last=channels_last, compile=compile,
            write_denoised=write_denoised, max_bytes=max_bytes, ray_actors=ray_actors, batch_threads=batch_threads)
    finally:
        pbar.close()
    ips = stats["items"] / stats["seconds"] if stats["items"] and stats["seconds"] > 0 else None
    prev = out_dir / "summary.json"
    if ips is None and prev.is_file():  # nothing left to do: keep the throughput of the run that did it
        ips = json.loads(prev.read_text()).get("images_per_s")
    config = {"input": os.path.abspath(input), "checkpoint": settings["checkpoint"], "out": str(out_dir),
              "limit": limit, "batch_size": batch_size, "workers": workers, "device": str(screener.device),
              "shard_size": shard_size, "compile": compile, "amp": amp,
              "channels_last": getattr(screener, "channels_last", channels_last),
              "folded_batchnorms": getattr(screener, "folded", None),
              "engine": engine, "image_size": screener.image_size, "input_kind": meta["kind"],
              "root": meta["root"], "max_bytes": max_bytes, "resumed_shards": len(done),
              "items_this_run": stats["items"], "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(),
              "batch_threads": batch_threads if engine == "local" else None}
    run_versions = versions("pyarrow", "pillow", *(["ray"] if engine == "ray" else []))
    return summarise(out_dir, n_shards, screener.threshold, config, run_versions, ips, stats["seconds"])


@user_errors_exit(USER_ERRORS + (InputError, KeyError, ValueError))
def main(argv: Optional[list[str]] = None) -> int:
    """Bad input (no such path, a manifest without its columns, a checkpoint that is not a
    defence, settings that clash with ``--out``) ends in ``error: <message>`` and exit code 2."""
    ap = argparse.ArgumentParser(prog="python -m vars_fast screen", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="image folder, manifest .csv/.parquet, .tar shard(s) or a glob")
    ap.add_argument("--checkpoint", required=True, help="run folder (checkpoints/defense.pt) or defense.pt")
    ap.add_argument("--out", required=True, help="output folder (re-run the same command to resume)")
    ap.add_argument("--root", default=None, help="catalogue root for manifest paths (default: the manifest's folder)")
    ap.add_argument("--id-col", default="item_id")
    ap.add_argument("--path-col", default="path")
    ap.add_argument("--limit", type=int, default=None, help="screen only the first N items of the input order")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader decode workers (0: decode in-process)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--shard-size", type=int, default=1024, help="items per output shard (the resume unit)")
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="files above this are too_large")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="NHWC models and batches (default: on)")
    ap.add_argument("--write-denoised", action="store_true", help="also write <out>/denoised/<id>.png")
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    ap.add_argument("--ray-actors", type=int, default=1, help="model actors for --engine ray")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the model process (0: torch's default; 1 is best on a busy machine)")
    ap.add_argument("--batch-threads", type=int, default=0,
                    help="batches run in parallel on CPU, one intra-op thread each (0: one per torch thread)")
    ap.add_argument("--no-progress", action="store_true")
    add_debug_flag(ap)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    s = screen(a.input, a.checkpoint, a.out, limit=a.limit, batch_size=a.batch_size, workers=a.workers,
               device=a.device, shard_size=a.shard_size, compile=a.compile, amp=a.amp,
               channels_last=a.channels_last, write_denoised=a.write_denoised, engine=a.engine, root=a.root,
               id_col=a.id_col, path_col=a.path_col, max_bytes=a.max_bytes, progress=not a.no_progress,
               ray_actors=a.ray_actors, threads=a.threads, batch_threads=a.batch_threads)
    ips = s["images_per_s"]
    print(f"screened {s['rows']} items in {time.perf_counter() - t0:.1f}s "
          f"({'%.1f img/s' % ips if ips else 'nothing left to do'}); status {s['counts']}; "
          f"flagged {s['flagged']}/{s['ok']} ({100 * s['flagged_rate']:.1f}%) -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
