"""Per-catalogue model selection: hyperparameters chosen on the catalogue's own training holdout.

One schedule does not fit every catalogue. Adam 1e-2 with λ 3e-2 was chosen on synthetic
presets; on a real long-tail purchase log it stopped VBPR at epoch 3 and lost a quarter of
its HR@10 (docs/results/longtail.md). So, as Elliot does per data set, a bounded number of
settings (at most ``recommender.select.trials``, a coordinate search over the grid
``select.lr`` × ``select.weight_decay`` × ``select.k`` from the config's own setting) each
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


def coordinate_search(rc, evaluate: Callable[[dict], float]) -> list[dict]:
    """Settings tried, in order: the config's own (lr, weight_decay, k), then each grid value of
    one dimension at a time around the best so far (lr, then weight_decay, then k), at most
    ``select.trials`` in all; ``evaluate(setting) -> holdout score``. With the default grid
    (3 x 3 x 2) that is 6 trials where a full grid would be 18, and every dimension is tried:
    a random draw of 6 of the 18 can miss the learning rate that matters (the longtail preset's
    best VBPR lr, 1e-3, is the grid's smallest; docs/results/longtail.md)."""
    best = {"lr": float(rc.lr), "weight_decay": float(rc.weight_decay), "k": int(rc.k)}
    scores = {tuple(best.items()): evaluate(best)}
    tried = [best]
    for dim, values, cast in (("lr", rc.select.lr, float), ("weight_decay", rc.select.weight_decay, float),
                              ("k", rc.select.k, int)):
        for v in values:
            c = {**best, dim: cast(v)}
            if tuple(c.items()) in scores or len(tried) >= int(rc.select.trials):
                continue
            scores[tuple(c.items())] = evaluate(c)
            tried.append(c)
        best = max(tried, key=lambda c: scores[tuple(c.items())])
    return tried


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

    def evaluate(c: dict) -> float:
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
        return record["best"]

    coordinate_search(rc, evaluate)
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
