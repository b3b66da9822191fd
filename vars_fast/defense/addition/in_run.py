"""ADDITION in a run folder: Table 4's baseline, fitted on the defence's own training items and
thresholded on its validation items, as ours is (``tools/addition_baseline.py`` runs it alone)."""
from __future__ import annotations

import time

import torch

from vars_fast.defense.addition.baseline import Addition, build_addition
from vars_fast.defense.addition.fit import fgsm_examples
from vars_fast.defense.training import split_items
from vars_fast.metrics import detection_metrics


def fit_in_run(ctx, model: str = "VBPR", refit: bool = False) -> tuple[Addition, dict]:
    """ADDITION for recommender ``model`` of a run folder, trained and thresholded as ours is.

    Items: the defence's seeded split (``defense.training.split_items`` with the defence
    stage's generator tag), so ADDITION trains on the defence's training items and chooses its
    threshold on the same validation items. The threshold: ``defense.threshold_rule`` on
    validation score changes, clean vs FGSM at ``defense.detector_eps`` (the attack ours is
    calibrated on). Loads ``checkpoints/addition_<model>.pt`` when present (unless ``refit``),
    else fits and saves it. Returns (the detector, {"validation", "split", "seconds"})."""
    cfg, cat, dev, log = ctx.cfg, ctx.catalogue, ctx.device, ctx.log
    dcfg, acfg = cfg.defense, cfg.defense.addition
    t0 = time.perf_counter()
    split = split_items(cat, ctx.generator("defense-split"), dcfg.train_item_frac, dcfg.val_item_frac)
    rec = ctx.recommender(model)
    path = ctx.run.checkpoint(f"addition_{model}")
    if path.is_file() and not refit:
        add = Addition.load(path, rec, dev)
        log.info("addition: loaded %s", path)
        return add, {"validation": add.extra.get("validation", {}), "split": split,
                     "seconds": {"fit": 0.0, "threshold": 0.0}}
    users = torch.randperm(cat.n_users, generator=ctx.generator("evaluate:addition-users"))
    add = build_addition(rec, users[: int(acfg.users)], acfg, change=float(acfg.change),
                         seed=int(torch.randint(0, 2**31, (1,), generator=ctx.generator("addition-noise"))),
                         device=dev)
    add.fit(cat, split["train"], acfg, ctx.generator("addition-fit"), log=log)
    t_fit = time.perf_counter() - t0

    bs = int(cfg.eval.batch_size)
    val = torch.as_tensor(split["val"], dtype=torch.long)
    c_val = add.score_change_all(cat.images[val], val, bs)
    adv_val, _ = fgsm_examples(rec, cat, val, [float(e) for e in dcfg.detector_eps],
                               ctx.generator("addition-val"), dev, triples_per_item=int(dcfg.triples_per_item))
    a_val = add.score_change_all(adv_val, val, bs)
    thr = add.choose_threshold(c_val, a_val, rule=dcfg.threshold_rule)
    validation = {"rule": dcfg.threshold_rule, "eps": list(dcfg.detector_eps), "n": int(val.numel()),
                  **detection_metrics(c_val, a_val, thr)}
    add.save(path, extra={"validation": validation})
    log.info("addition: validation threshold %.4f (%s): FPR %.3f TPR %.3f AUC %.4f", thr, dcfg.threshold_rule,
             validation["fpr"], validation["tpr"], validation["auc"])
    return add, {"validation": validation, "split": split,
                 "seconds": {"fit": round(t_fit, 1), "threshold": round(time.perf_counter() - t0 - t_fit, 1)}}
