"""Per-catalogue model selection: hyperparameters chosen on the catalogue's own training holdout.

One schedule does not fit every catalogue. Adam 1e-2 with λ 3e-2 was chosen on synthetic
presets; on a real long-tail purchase log it stopped VBPR at epoch 3 and lost a quarter of
its HR@10 (docs/results/longtail.md). So, as Elliot does per data set, a bounded number of
settings (``recommender.select.trials``, drawn without replacement from the grid
``select.lr`` × ``select.weight_decay`` × ``select.k``, the config's own setting first) each
train with early stopping on one shared holdout (``base.holdout_split``: one training purchase
per user, never the test split), scored by ``select.metric``. The best setting is retrained
on every training pair for its best epoch count, with its learning-rate drop where it
happened, so that the held-out purchases are not lost (on a long-tail log, a held-out
purchase is often an item's only one).

When no setting beats a random scorer on the holdout by three standard errors, the holdout
cannot rank anything and the config's fixed schedule is used, with a warning.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from vars_fast.recommenders.base import Recommender, holdout_split
from vars_fast.registry import SOURCES


def enabled(rc, source: str) -> bool:
    """``recommender.select.mode``: on, off, or auto: on unless the source generates its catalogue
    (the embedded generator: the fixed schedule was chosen on it, recommender_tuning.md)."""
    return rc.select.mode == "on" or (rc.select.mode == "auto" and SOURCES.meta(source)["images"] != "generated")


def candidates(rc, generator: torch.Generator) -> list[dict]:
    """The config's own (lr, weight_decay, k), then ``select.trials - 1`` others from the grid,
    in a seeded random order (an empty grid list means the config's value)."""
    own = {"lr": float(rc.lr), "weight_decay": float(rc.weight_decay), "k": int(rc.k)}
    grid = [{"lr": float(lr), "weight_decay": float(wd), "k": int(k)}
            for lr in (rc.select.lr or [rc.lr]) for wd in (rc.select.weight_decay or [rc.weight_decay])
            for k in (rc.select.k or [rc.k])]
    rest = [g for g in grid if g != own]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return [own] + [rest[i] for i in order][:max(0, int(rc.select.trials) - 1)]


def _setting(rc, c: dict, **kw):
    """``rc`` with setting ``c``; lr_low keeps its ratio to lr."""
    return dataclasses.replace(rc, lr=c["lr"], lr_low=rc.lr_low * c["lr"] / rc.lr, weight_decay=c["weight_decay"],
                               k=c["k"], **kw)


def select_and_fit(name: str, build: Callable[[object], Recommender], cat, rc, generator: torch.Generator,
                   log, show_progress: bool = True, **fit_kw) -> Recommender:
    """Select on the holdout, then train the chosen setting on all of ``cat.train``.

    ``build(rc)`` returns an untrained model for a ``RecommenderConfig`` (same init seed every
    time); ``fit_kw`` go to ``fit`` (VBPR's ``features``). The returned model carries
    ``selection``: the metric, the popularity and chance levels on the holdout, every trial
    with its validation curve, the chosen setting and the seconds spent."""
    t_all = time.perf_counter()
    fold, val = holdout_split(cat, rc.val_negatives, generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # every trial sees the same triples
    metric = rc.select.metric
    chance, se = val.chance(metric)
    trials = []
    for c in candidates(rc, generator):
        t = time.perf_counter()
        rc_t = _setting(rc, c, early_stopping=True, val_metric=metric)
        record: dict = {}
        build(rc_t).fit(cat, rc_t, torch.Generator().manual_seed(seed), show_progress=False, log=None,
                        holdout=(fold, val), record=record, **fit_kw)
        trials.append({**c, "val": record["best"], "best_epoch": record["best_epoch"] + 1,
                       "drop_epoch": record["drop_epoch"], "curve": [round(x, 5) for x in record["val"]],
                       "seconds": round(time.perf_counter() - t, 1)})
        log.info("%s select: lr %g, weight_decay %g, k %d -> val %s %.4f at epoch %d of %d (%.1fs)", name, c["lr"],
                 c["weight_decay"], c["k"], metric.upper(), record["best"], record["best_epoch"] + 1,
                 len(record["val"]), trials[-1]["seconds"])
    best = max(trials, key=lambda r: r["val"])
    report = {"metric": metric, "chance": chance, "chance_se": se, "popularity": val.popularity(fold, metric),
              "holdout_users": len(val.users), "trials": trials}
    if best["val"] <= chance + 3 * se:
        log.warning("%s select: no setting ranks the holdout better than chance (best %s %.4f, random %.4f ± %.4f): "
                    "the config's fixed schedule (%d epochs)", name, metric.upper(), best["val"], chance, se, rc.epochs)
        rc_f, report["chosen"] = dataclasses.replace(rc, early_stopping=False), None
    else:
        n, drop = best["best_epoch"], best["drop_epoch"]
        # drop_at = ceil(frac * n) = drop exactly; no drop within n epochs when it came later or never
        frac = 1.0 if drop is None or drop >= n else (drop - 0.5) / n
        rc_f = _setting(rc, best, early_stopping=False, epochs=n, lr_drop_frac=frac)
        report["chosen"] = {k: best[k] for k in ("lr", "weight_decay", "k", "best_epoch", "drop_epoch", "val")}
        log.info("%s select: chose lr %g, weight_decay %g, k %d, %d epochs (val %s %.4f; popularity %.4f, "
                 "random %.4f); retraining on every training pair", name, best["lr"], best["weight_decay"], best["k"],
                 n, metric.upper(), best["val"], report["popularity"], chance)
    model = build(rc_f)
    model.fit(cat, rc_f, generator, show_progress=show_progress, log=log, **fit_kw)
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    model.selection = report
    return model
