"""The "evaluate" stage: every section in order, each timed into ``meta["evaluate"]``; the
arrays the figures need (distances, embeddings, example images) go to
``figures/eval_arrays.npz``, so ``vars_fast.report`` redraws every figure without models."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from vars_fast.evaluate.ablation import ablation
from vars_fast.evaluate.adaptive import adaptive
from vars_fast.evaluate.common import ARRAYS, Evaluation
from vars_fast.evaluate.detection import detection
from vars_fast.evaluate.embeddings import embeddings
from vars_fast.evaluate.generalisation import generalisation
from vars_fast.evaluate.oracle import oracle
from vars_fast.evaluate.ranking import ranking
from vars_fast.evaluate.targeted import targeted
from vars_fast.evaluate.transfer import transfer

SECTIONS: tuple[tuple[str, Callable[[Evaluation], None]], ...] = (
    ("ranking", ranking), ("oracle", oracle), ("detection", detection), ("generalisation", generalisation),
    ("ablation", ablation), ("targeted", targeted), ("adaptive", adaptive), ("embeddings", embeddings),
    ("transfer", transfer))


def run_all(ev: Evaluation) -> None:
    for name, fn in SECTIONS:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(ev)
        # CPU seconds beside wall seconds: on a shared machine the wall clock mostly measures
        # the neighbours
        ev.timings[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        ev.timings[f"{name}_cpu_s"] = round(time.process_time() - c0, 2)
        ev.log.info("evaluate %s: %.1f s wall, %.1f s cpu", name, ev.timings[f"{name}_s"],
                    ev.timings[f"{name}_cpu_s"])
    np.savez_compressed(ev.run.path / "figures" / ARRAYS, **ev.arrays)
    ev.run.update_meta(evaluate={"timings": ev.timings, "n_detect_items": int(ev.test_items.numel()),
                                 "table_eps": ev.cfg.eval.table_eps})


def run_stage(ctx) -> None:
    """Evaluate the trained defence in ``ctx.run``: every section of ``SECTIONS``."""
    torch.manual_seed(ctx.cfg.run.seed)
    run_all(Evaluation(ctx))
