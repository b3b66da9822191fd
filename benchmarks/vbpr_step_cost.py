"""What a VBPR training step costs on the sparse preset, change by change, side by side.

    python benchmarks/vbpr_step_cost.py RUN_DIR [--old OLD_VBPR_PY] [--rounds 6] [--steps 40]

RUN_DIR is a finished ``recommender`` stage of the sparse preset (its split and clean
features are read, nothing is trained to completion). Each variant trains its own model from
the same init on the same triples; the variants take turns, ``--rounds`` times, so that a
change in the machine's load hits all of them alike. ``--old`` is a copy of an earlier
``vars_fast/recommenders/vbpr.py`` (e.g. ``git show 86f3f7c:vars_fast/recommenders/vbpr.py``)
to set its loss and validation scoring beside today's. Prints milliseconds per step (batch
``recommender.batch_size``) and per validation (the holdout AUC of early stopping), median
and minimum over the rounds, at one torch thread as the recommender stage trains.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crosscheck_cornac import load_split_and_features  # noqa: E402

from vars_fast.recommenders.base import holdout_split  # noqa: E402
from vars_fast.recommenders.vbpr import VBPR  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--old", type=Path, help="an earlier vbpr.py to compare with")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    cfg, cat, feats = load_split_and_features(args.run)
    rc = cfg.recommender
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    fold, val = holdout_split(cat, rc.val_negatives, g)
    triples = fold.sample_triples(int(fold.train.shape[0]), g)
    classes = {"today": VBPR}
    if args.old:
        spec = importlib.util.spec_from_file_location("vbpr_old", args.old)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        classes["old"] = mod.VBPR

    def variant(cls, fused: bool, to_none: bool):
        torch.manual_seed(0)
        m = cls(cat.n_users, cat.n_items, feats.shape[1], k=rc.k, reg=rc.weight_decay)
        m.set_item_visual(torch.from_numpy(feats))
        m.fit_feature_norm(m.item_visual)
        opt = torch.optim.Adam(list(m.parameters()), lr=rc.lr, fused=fused)

        def step(b):
            loss = m.loss(b)
            opt.zero_grad(set_to_none=to_none)
            loss.backward()
            opt.step()
        return m, step

    variants = {}
    if "old" in classes:
        variants["old loss, Adam foreach, grads zeroed"] = variant(classes["old"], False, False)
        variants["old loss, Adam fused, grads zeroed"] = variant(classes["old"], True, False)
    variants["one gather per table, Adam foreach, grads zeroed"] = variant(VBPR, False, False)
    variants["one gather per table, Adam fused, grads zeroed"] = variant(VBPR, True, False)
    variants["one gather per table, Adam fused, grads to None (today)"] = variant(VBPR, True, True)
    b = rc.batch_size
    step_ms = {k: [] for k in variants}
    val_ms = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (m, step) in variants.items():
            t = time.perf_counter()
            for s in range(0, b * args.steps, b):
                step(triples[s:s + b])
            step_ms[name].append((time.perf_counter() - t) / args.steps * 1e3)
            t = time.perf_counter()
            val.auc(m)
            val_ms[name].append((time.perf_counter() - t) * 1e3)
    print(f"sparse preset: {cat.n_items} items, batch {b}, 1 thread, {args.rounds} rounds x {args.steps} steps")
    print("| variant | ms / step (median, min) | ms / validation (median, min) |")
    print("|---|---|---|")
    for name in variants:
        print(f"| {name} | {statistics.median(step_ms[name]):.2f}, {min(step_ms[name]):.2f} | "
              f"{statistics.median(val_ms[name]):.0f}, {min(val_ms[name]):.0f} |")


if __name__ == "__main__":
    main()
