"""The Ray Data screening engine (``--engine ray``; ``pip install vars_fast[ray]``).

Same shard plan, same batches, same output files as the local engine, so results are the
same and a run started by one engine can be resumed by the other:

    from_items(model-batch descriptors of unfinished shards)        read
      .map_batches(_decode, batch_size=1)       CPU tasks: plan rows -> bytes -> decode_image
      .map_batches(ScreenActor, batch_size=1,   an actor pool: each actor loads the models once
                   compute=ActorPoolStrategy)   (num_gpus=1 per actor on CUDA)
      .iter_batches() in input order            -> ShardBuffer -> part-*.parquet + marker

One descriptor is one model batch of the local engine (never crossing a shard), so each
actor sees exactly the batches the local engine runs: identical results, not just close.
Rows travel between stages as one row per batch with packed ``bytes`` columns (uint8 images,
float32 outputs), which Arrow moves without per-pixel Python objects. The driver writes the
shards (atomic Parquet + marker) because it alone sees a shard's batches complete, in order.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from vars_fast.io import load_checkpoint
from vars_fast.screening.local import decode_batch, pending_batches
from vars_fast.screening.model import Screener, resolve_checkpoint
from vars_fast.screening.output import ShardBuffer, write_denoised
from vars_fast.screening.plan import PlanReader
from vars_fast.screening.reader import MAX_BYTES


def _decode(batch: dict, plan_file: str, root: str, size: int, max_bytes: int) -> dict:
    """One descriptor -> one row: metadata as JSON, the ok images as raw uint8 bytes."""
    desc = (int(batch["shard"][0]), int(batch["start"][0]), int(batch["stop"][0]), bool(batch["last"][0]))
    b = decode_batch(PlanReader(plan_file), root, size, desc, max_bytes)
    meta = {k: b[k] for k in ("shard", "last", "pos", "item_id", "source", "status", "error")}
    return {"meta": np.array([json.dumps(meta)], dtype=object),
            "images": np.array([b["images"].numpy().tobytes()], dtype=object),
            "n_ok": np.array([b["images"].shape[0]], dtype=np.int64)}


class ScreenActor:
    """Loads the defence and backbone once per actor; screens one packed batch per call."""

    def __init__(self, checkpoint: str, device: str, amp: bool, channels_last: bool | None, compile: bool,
                 keep_denoised: bool, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.s = Screener.from_checkpoint(checkpoint, torch.device(device), amp=amp, channels_last=channels_last,
                                          compile=compile, keep_denoised=keep_denoised)

    def __call__(self, batch: dict) -> dict:
        size, n = self.s.image_size, int(batch["n_ok"][0])
        imgs = np.frombuffer(batch["images"][0], dtype=np.uint8).reshape(n, 3, size, size)
        dist, flagged, feat, den = self.s(imgs.copy())
        return {"meta": batch["meta"], "n_ok": batch["n_ok"],
                "distance": np.array([dist.astype(np.float32).tobytes()], dtype=object),
                "flagged": np.array([flagged.astype(np.bool_).tobytes()], dtype=object),
                "feature": np.array([feat.astype(np.float32).tobytes()], dtype=object),
                "feature_dim": np.array([feat.shape[1] if feat.ndim == 2 else 0], dtype=np.int64),
                "denoised": np.array([den.tobytes() if den is not None else b""], dtype=object)}


def run_ray(checkpoint: str, plan_file: Path, meta: dict, out: Path, shard_size: int, batch_size: int,
            done: set[int], device: str = "cpu", amp: bool = False, channels_last: bool | None = None,
            compile: bool = False, write_images: bool = False, max_bytes: int = MAX_BYTES,
            on_batch: Optional[Callable[[int], None]] = None, actors: int = 1, screener=None) -> dict:
    """Screen every unfinished shard with Ray Data; returns {"items", "ok", "seconds"}.

    Uses the running Ray instance (``ray.init`` first to choose resources), else starts a
    local one. ``checkpoint`` must be a path the actors can read (same machine or shared FS).
    """
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError("--engine ray needs Ray Data: pip install 'vars_fast[ray]' (or 'ray[data]')") from e
    if checkpoint is None:
        raise ValueError("--engine ray needs --checkpoint (the actors load the models themselves)")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards are assembled from batches in input order
    ctx.enable_progress_bars = False
    n, root = meta["n"], meta["root"]
    size = int(screener.image_size) if screener is not None else _image_size(checkpoint)
    descs = [{"shard": k, "start": s, "stop": e, "last": last}
             for k, s, e, last in pending_batches(n, shard_size, batch_size, done)]
    t0 = time.perf_counter()
    if not descs:
        return {"items": 0, "ok": 0, "seconds": 0.0}
    on_gpu = device in ("cuda", "auto") and ray.cluster_resources().get("GPU", 0) > 0
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = 0 if on_gpu else max(1, int(cpus // max(1, actors)))
    ds = (ray.data.from_items(descs, override_num_blocks=len(descs))
          .map_batches(_decode, batch_size=1, batch_format="numpy", num_cpus=1,
                       fn_kwargs={"plan_file": str(plan_file), "root": root, "size": size, "max_bytes": max_bytes})
          .map_batches(ScreenActor, batch_size=1, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if on_gpu else 0,
                       num_cpus=0 if on_gpu else max(1, threads) / 2,  # leave room for decode tasks
                       fn_constructor_kwargs={"checkpoint": str(resolve_checkpoint(checkpoint)),
                                              "device": "cuda" if on_gpu else "cpu", "amp": amp,
                                              "channels_last": channels_last, "compile": compile,
                                              "keep_denoised": write_images, "threads": threads}))
    buf: Optional[ShardBuffer] = None
    items = ok = 0
    t_shard = time.perf_counter()
    for row in ds.iter_rows():
        m = json.loads(row["meta"])
        k, dim = int(row["n_ok"]), int(row["feature_dim"])
        dist = np.frombuffer(row["distance"], dtype=np.float32)
        flagged = np.frombuffer(row["flagged"], dtype=np.bool_)
        feat = np.frombuffer(row["feature"], dtype=np.float32).reshape(k, dim) if k else np.zeros((0, 0), np.float32)
        if buf is None:
            buf, t_shard = ShardBuffer(m["shard"]), time.perf_counter()
        buf.add(m["pos"], m["item_id"], m["source"], m["status"], m["error"], dist, flagged, feat)
        if write_images and k:
            den = np.frombuffer(row["denoised"], dtype=np.uint8).reshape(k, 3, size, size)
            write_denoised(out, [i for i, s in zip(m["item_id"], m["status"]) if s == "ok"], den)
        items += len(m["pos"])
        ok += k
        if m["last"]:
            buf.write(out, time.perf_counter() - t_shard)
            buf = None
        if on_batch:
            on_batch(len(m["pos"]))
    return {"items": items, "ok": ok, "seconds": time.perf_counter() - t0}


def _image_size(checkpoint: str) -> int:
    return int(load_checkpoint(resolve_checkpoint(checkpoint))["image_size"])
