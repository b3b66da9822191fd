"""The "evaluate" stage: every registered section (``vars_fast.registry.SECTIONS``) in order,
each timed into ``meta["evaluate"]``; the arrays the figures need (distances, embeddings, example
images) go to ``figures/eval_arrays.npz``, so ``vars_fast.report`` redraws every figure without
models. ``python -m vars_fast evaluate RUN --section X`` re-runs one section on an existing run."""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from vars_fast.evaluate.common import ARRAYS, Evaluation
from vars_fast.registry import SECTIONS


def ordered(names: Optional[Sequence[str]] = None) -> list[str]:
    """The registered sections that compute rows, in their order (``names``: only those)."""
    if names is not None:
        SECTIONS.check(list(names))
    return [n for n, s in sorted(SECTIONS.items(), key=lambda kv: kv[1].order)
            if s.run is not None and (names is None or n in names)]


def run_all(ev: Evaluation, names: Optional[Sequence[str]] = None) -> None:
    for name in ordered(names):
        t0, c0 = time.perf_counter(), time.process_time()
        SECTIONS[name].run(ev)
        # CPU seconds beside wall seconds: on a shared machine the wall clock mostly measures
        # the neighbours
        ev.timings[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        ev.timings[f"{name}_cpu_s"] = round(time.process_time() - c0, 2)
        ev.log.info("evaluate %s: %.1f s wall, %.1f s cpu", name, ev.timings[f"{name}_s"],
                    ev.timings[f"{name}_cpu_s"])
    path = ev.run.path / "figures" / ARRAYS
    if names is not None and path.is_file():  # one section re-run: keep the others' arrays
        with np.load(path) as z:
            ev.arrays = {**{k: z[k] for k in z.files}, **ev.arrays}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **ev.arrays)
    old = ev.run.load_metrics().get("meta", {}).get("evaluate", {}).get("timings", {}) if names is not None else {}
    ev.run.update_meta(evaluate={"timings": {**old, **ev.timings}, "n_detect_items": int(ev.test_items.numel()),
                                 "table_eps": ev.cfg.eval.table_eps})


def run_stage(ctx, sections: Optional[Sequence[str]] = None) -> None:
    """Evaluate the trained defence in ``ctx.run``: every registered section, or ``sections``."""
    torch.manual_seed(ctx.cfg.run.seed)
    run_all(Evaluation(ctx), sections)
