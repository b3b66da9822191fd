"""End-to-end row: catalogue screening throughput (images/s), package vs a naive loop.

Providers:
* ``eager``    -- the loop a first implementation writes: PIL decode + resize in the main
  process, one batch at a time, then ``Defense.detect(x)`` and ``backbone.features(
  Defense.purify(x))`` (the denoiser runs twice) on the models as the checkpoint loads them
  (eval mode, NCHW, BatchNorms unfolded), autograd left on, no workers.
* ``package``  -- ``vars_fast.screen.screen``: DataLoader workers decode in parallel with the
  model, one denoiser pass per image, the screener's inference rewrites, two batches at a time
  on two model threads (one intra-op thread each), inference mode, Parquet shards + summary
  written.
* ``package-t1`` -- the same with one torch thread in the model process, hence one batch at a
  time (the decode workers take the other core).

The providers run one after the other (1 warm-up + 3 rounds each, about 5 minutes in all), and this VM's
speed drifts by tens of percent over minutes, so ``test_screen_paired`` also times the naive
loop and the package back to back, 3 pairs in alternating order, and records the per-pair
speed-ups (op ``screen-paired``): the drift-robust ratio.

Checkpoint: an untrained defence with the default widths (``DefenseConfig``) at 64 px and the
packaged EfficientNet-Lite0 (throughput does not depend on the weights' values).
``VARS_FAST_BENCH_SCREEN_ITEMS`` (default 2048) sets the catalogue size.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

# the untrained screening checkpoint is a test helper: it lives in tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from screen_fixtures import make_checkpoint  # noqa: E402
from vars_fast.data.synthetic import write_image_folder  # noqa: E402
from vars_fast.screen import screen  # noqa: E402
from vars_fast.screening.model import Screener  # noqa: E402

N_ITEMS = int(os.environ.get("VARS_FAST_BENCH_SCREEN_ITEMS", "2048"))  # fixed costs (plan, worker start, summary) amortised:
# at 512 items they were a third of the package run (1.41x vs 1.69x at 2048, 2026-11-27)
SIZE, BATCH = 64, 32
_runs = itertools.count()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("screen")
    paths = write_image_folder(base / "imgs", N_ITEMS, size=96, fmt="jpg")  # decode includes a real resize
    ck = make_checkpoint(base / "defense.pt", image_size=SIZE, calibrate=8)
    return base, sorted(paths), ck


def naive_models(ck: Path):
    """The checkpoint's models as loaded (eval mode, NCHW, BatchNorms unfolded), autograd left on."""
    from vars_fast.backbones import build_backbone
    from vars_fast.config import BackboneConfig
    from vars_fast.defense import load_defense

    d = load_defense(ck, torch.device("cpu"))
    known = set(BackboneConfig.__dataclass_fields__)
    bb = build_backbone(BackboneConfig(**{k: v for k, v in d.backbone.items() if k in known})).eval()
    for m in (d.denoiser, d.detector):
        m.eval()
    return d, bb


def naive_loop(d, bb, paths: list[Path]) -> int:
    from PIL import Image

    n = 0
    for s in range(0, len(paths), BATCH):
        imgs = []
        for p in paths[s:s + BATCH]:
            im = Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            imgs.append(np.asarray(im).transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(imgs)).float() / 255
        dist, flagged = d.detect(x)
        feat = bb.features(d.purify(x))
        n += int(flagged.sum()) + feat.shape[0] * 0
    return n


@pytest.mark.parametrize("provider", ["eager", "package", "package-t1"])
def test_screen_throughput(bench, setup, provider):
    base, paths, ck = setup
    threads = torch.get_num_threads()
    if provider == "eager":
        models = naive_models(ck)
        fn = lambda: naive_loop(*models, paths)  # noqa: E731
    else:
        screener = Screener.from_checkpoint(ck, "cpu")
        t = 1 if provider == "package-t1" else 0

        def fn():
            out = base / f"out{next(_runs)}"  # a fresh folder: a re-run would skip finished shards
            screen(str(base / "imgs"), str(ck), str(out), batch_size=BATCH, shard_size=256, workers=2,
                   screener=screener, threads=t, progress=False)
    try:
        res = bench.run(fn, rounds=3)  # + 1 warm-up; best of 3: the VM's speed drifts by tens of % over minutes
    finally:
        torch.set_num_threads(threads)
    bench.record(op="screen", shape=f"{N_ITEMS}x3x{SIZE}x{SIZE}", provider=provider,
                 items_per_s=N_ITEMS / bench.benchmark.stats.stats.min)
    del res


def test_screen_paired(bench, setup):
    """Naive loop and package timed back to back (naive first, then package first, ...): the
    speed-up of each pair is measured under the same machine speed."""
    import statistics
    import time

    base, paths, ck = setup
    models = naive_models(ck)
    screener = Screener.from_checkpoint(ck, "cpu")
    speedups: list[float] = []

    def naive() -> float:
        t = time.perf_counter()
        naive_loop(*models, paths)
        return time.perf_counter() - t

    def package() -> float:
        t = time.perf_counter()
        screen(str(base / "imgs"), str(ck), str(base / f"out{next(_runs)}"), batch_size=BATCH, shard_size=256,
               workers=2, screener=screener, progress=False)
        return time.perf_counter() - t

    def pair():
        if len(speedups) % 2 == 0:
            tn = naive()
            tp = package()
        else:
            tp = package()
            tn = naive()
        speedups.append(tn / tp)

    bench.run(pair, rounds=3)  # + 1 warm-up pair (first-use imports), left out below
    timed = speedups[1:]
    bench.record(op="screen-paired", shape=f"{N_ITEMS}x3x{SIZE}x{SIZE}", provider="naive/package pairs",
                 paired_speedup_median=statistics.median(timed), paired_speedup_min=min(timed),
                 paired_speedup_max=max(timed))
