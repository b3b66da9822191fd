"""The local engine: a torch DataLoader whose workers read + decode + resize one model batch
each (in parallel, in input order), while the main process runs the models and writes shards.

On CPU the models run batch-parallel: ``batch_threads`` Python threads each run whole batches
with one intra-op thread (torch releases the GIL inside its ops), instead of one batch at a time
with ``batch_threads`` OpenMP threads that meet at a barrier after every op. Results are
consumed in submission order, so shards are written exactly as in the sequential loop
(throughput of both layouts: docs/results/defaults.md).

Memory is bounded by (workers x prefetch + batch_threads + 1) batches plus one shard of
output rows (and, with batch threads, the freed memory of their malloc arenas, trimmed after
every shard); the list of pending batches is a generator over the plan, never materialised.
"""
from __future__ import annotations

import ctypes
import functools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vars_fast.screening.output import ShardBuffer, write_denoised
from vars_fast.screening.plan import PlanReader
from vars_fast.screening.reader import MAX_BYTES, load_row


def pending_batches(n: int, shard_size: int, batch_size: int, done: set[int]) -> Iterator[tuple]:
    """``(shard, start, stop, last_of_shard)`` for every model batch of every unfinished shard.
    Batches never cross a shard boundary, so a shard's batches are the same on every run (and
    so are its results, bit for bit, on the same machine)."""
    n_shards = (n + shard_size - 1) // shard_size
    for k in range(n_shards):
        if k in done:
            continue
        end = min(n, (k + 1) * shard_size)
        for s in range(k * shard_size, end, batch_size):
            e = min(end, s + batch_size)
            yield k, s, e, e == end


def decode_batch(reader: PlanReader, root: str, size: int, desc: tuple, max_bytes: int = MAX_BYTES) -> dict:
    """Plan rows ``desc[1]:desc[2]`` -> metadata lists + uint8 [m,3,S,S] of the m ok images."""
    shard, start, stop, last = desc
    out = {"shard": shard, "last": last, "pos": list(range(start, stop)), "item_id": [], "source": [],
           "status": [], "error": []}
    imgs = []
    for row in reader.rows(start, stop):
        arr, status, err = load_row(row, root, size, max_bytes)
        out["item_id"].append(row.item_id)
        out["source"].append(row.source)
        out["status"].append(status)
        out["error"].append(err)
        if arr is not None:
            imgs.append(arr)
    out["images"] = torch.from_numpy(np.stack(imgs)) if imgs else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return out


class _Batches(Dataset):
    def __init__(self, plan_file: str, root: str, size: int, max_bytes: int):
        self.reader, self.root, self.size, self.max_bytes = PlanReader(plan_file), root, size, max_bytes

    def __getitem__(self, desc: tuple) -> dict:
        return decode_batch(self.reader, self.root, self.size, desc, self.max_bytes)


def _identity(b):
    return b


class _Lazy(Sampler):
    def __init__(self, make: Callable[[], Iterator[tuple]]):
        self.make = make

    def __iter__(self):
        return self.make()


@functools.cache
def _libc():
    """glibc, or None where it is absent."""
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        return lib
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Return the free memory of every malloc arena to the OS (glibc ``malloc_trim``).

    Each model thread allocates from its own glibc arena, and freed activation memory inside
    an arena is not returned to the OS, so without this call once per shard the process's RSS
    grows with the number of items (docs/results/defaults.md). A no-op where glibc is absent."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def run_local(screener, plan_file: Path, meta: dict, out: Path, shard_size: int, batch_size: int,
              done: set[int], workers: int = 2, write_images: bool = False, max_bytes: int = MAX_BYTES,
              on_batch: Optional[Callable[[int], None]] = None, batch_threads: int = 1) -> dict:
    """Screen every unfinished shard; returns {"items", "ok", "seconds"} for this run.
    ``batch_threads`` > 1: that many batches in flight, each on one intra-op thread (CPU)."""
    n, root, size = meta["n"], meta["root"], screener.image_size
    loader = DataLoader(_Batches(str(plan_file), root, size, max_bytes),
                        sampler=_Lazy(lambda: pending_batches(n, shard_size, batch_size, done)),
                        batch_size=None, num_workers=workers, collate_fn=_identity,
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        pin_memory=screener.device.type == "cuda")
    buf: Optional[ShardBuffer] = None
    items = ok = 0
    t0 = t_shard = time.perf_counter()

    def finish(b: dict, result: tuple) -> None:
        nonlocal buf, items, ok, t_shard
        if buf is None:
            buf, t_shard = ShardBuffer(b["shard"]), time.perf_counter()
        dist, flagged, feat, den = result
        buf.add(b["pos"], b["item_id"], b["source"], b["status"], b["error"], dist, flagged, feat)
        if write_images and den is not None:
            write_denoised(out, [i for i, s in zip(b["item_id"], b["status"]) if s == "ok"], den)
        items += len(b["pos"])
        ok += len(dist)
        if b["last"]:
            buf.write(out, time.perf_counter() - t_shard)
            buf = None
            if batch_threads > 1:
                _trim_heap()
        if on_batch:
            on_batch(len(b["pos"]))

    if batch_threads <= 1:
        for b in loader:
            finish(b, screener(b["images"]))
        return {"items": items, "ok": ok, "seconds": time.perf_counter() - t0}
    intra = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(batch_threads, thread_name_prefix="screen-model")
    inflight: deque = deque()
    try:
        for b in loader:
            inflight.append((b, pool.submit(screener, b["images"])))
            if len(inflight) > batch_threads:  # keep every thread busy, no more
                b0, fut = inflight.popleft()
                finish(b0, fut.result())
        while inflight:
            b0, fut = inflight.popleft()
            finish(b0, fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(intra)
    return {"items": items, "ok": ok, "seconds": time.perf_counter() - t0}
