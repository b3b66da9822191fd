"""Cross-check vars_fast's VBPR and BPR against Cornac's on the same split and the same features.

    pip install -e '.[crosscheck]'          # cornac, optional; never a runtime dependency
    python benchmarks/crosscheck_cornac.py                       # default and sparse presets
    python benchmarks/crosscheck_cornac.py --presets longtail    # the real-catalogue regime (issue #24)
    python benchmarks/crosscheck_cornac.py --presets sparse --set data.seed=1
    python benchmarks/crosscheck_cornac.py --presets default --seeds 5   # mean over 5 init seeds

Per preset, this runs vars_fast's ``recommender`` stage (Pop, BPR, VBPR) into
``<work>/<preset>`` exactly as ``python -m vars_fast.train`` does, then trains Cornac's VBPR
and BPR on the same training interactions and the same clean backbone features (read from
that run folder), and ranks the same candidates: each user's held-out test item against the
same 100 sampled negatives, with ``vars_fast.metrics.hr_ndcg`` (ties count against the
positive for both libraries).

Both libraries choose their settings on the same training holdout, never on the test split.
vars_fast's stage carves it with ``base.holdout_split(cat, recommender.val_negatives, gen)``,
``gen`` the run's ``Context.generator("recommender:<model>")`` used first (by
``selection.select_and_fit`` where selection is on, by ``fit_bpr``'s early stopping
otherwise): one training purchase of each user with at least 3 held out, ranked against
``val_negatives`` non-positives. This script carves the identical holdout from the same
generator (and checks it against the popularity and size our run recorded for it), trains
every Cornac setting of a small grid on the fold (the training pairs minus the held-out ones),
scores the held-out item against its negatives by AUC (``base._per_user``, ties half, as
our selection does), retrains the best setting on every training pair and
evaluates it on the test split. Items unknown to a Cornac model (no purchase in what it
trained on; on the fold that includes items whose only purchase was held out) are scored
as below.

Cornac only knows the items that have training interactions. Items without any get what
VBPR defines for them: the visual term alone, θ_uᵀ E f_i + β'ᵀ f_i (no γ_i, no β_i). Cornac's
BPR has no information about them and gives them its lowest score of the user (what
``cornac.models.Recommender.rank`` does with unknown items).

Cornac's settings: VBPR k = k2 = 32, 40 epochs, Adam, batch 100, lambda_b 0.01 (Cornac's
default), L2-normalised features (the setting that beat vars_fast on a real catalogue), the
best on the holdout of learning_rate × lambda_w in ``CORNAC_VBPR_GRID``; BPR k = 64 (as ours),
100 epochs, lambda 0.01, the best on BPR's holdout of the SGD learning rates
``CORNAC_BPR_LRS``. Training time is wall time of the final ``fit`` for Cornac (the grid's
seconds are listed apart) and of build + fit (selection and validation included) for
vars_fast, both with ``recommender.threads`` torch threads (Cornac's BPR is Cython with one
thread when seeded).

With ``--seeds N`` both libraries train N times on the same split, with init seeds 0..N-1
(``run.seed`` for vars_fast, ``seed`` for Cornac; the holdout follows ``run.seed`` as ours
does), and the table gives mean ± standard deviation: one seed's HR@10 on 600 test users
moves by about one standard error (0.02), more than the margin the comparison asks about.

The markdown gives each preset's regime (``data.interactions.split_stats``), our selection
(``meta.selection``: chosen setting, seconds) and every model below popularity
(``meta.below_popularity``); for the ``longtail`` preset, its statistics beside the real
catalogue's of issue #24.

Writes ``benchmarks/results/crosscheck_cornac.{md,json}`` (``--results`` to change).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CORNAC_BPR_LRS = (0.01, 0.05, 0.1)
CORNAC_VBPR_GRID = tuple({"learning_rate": lr, "lambda_w": lw} for lr in (0.005, 0.001) for lw in (0.01, 0.1))
SELECT_METRIC = "auc"  # what our selection reads on the holdout (recommender.select.metric's default)
# the cache key's protocol: bump whenever what Cornac runs or how it is chosen changes
# (1: fixed VBPR, BPR lr chosen on the test split; 2: both chosen on our training holdout)
CACHE_PROTOCOL = 2

# issue #24: the real long-tail fashion catalogue (64 px EfficientNet-Lite0 features); None: not known
REAL_CATALOGUE = {
    "users": 887, "items": 16581, "train_purchases": 25466, "density": 0.0018, "per_item_mean": 25466 / 16581,
    "per_item_median": None, "per_item_p90": None, "test_cold": None, "test_le1": None,
    "HR@10": {"Pop": 0.169, "BPR": 0.124, "BPR fixed schedule": 0.136, "VBPR": 0.201,
              "VBPR fixed schedule": 0.273, "AMR": 0.138, "Cornac VBPR": 0.327, "Cornac BPR": None},
}


def _import_cornac():
    try:
        import cornac  # noqa: F401
    except ImportError as e:  # the optional extra is not installed
        sys.exit(f"cornac is not importable ({e}); install the extra: pip install -e '.[crosscheck]'")
    return cornac


def _finished(out: Path, cfg) -> bool:
    """The run folder already holds this exact configuration's finished recommender stage."""
    from vars_fast.config import from_dict, load_yaml

    try:
        same = from_dict(load_yaml(out / "config.yaml")).to_dict() == cfg.to_dict()
        done = {"stage_recommender_s", "train_BPR_s", "train_VBPR_s"} <= set(
            json.loads((out / "metrics.json").read_text())["meta"]["timings"])
    except (OSError, ValueError, KeyError):
        return False
    return same and done


def run_ours(preset: str, work: Path, sets: dict, reuse: bool = False) -> tuple[dict, Path, dict]:
    """vars_fast's recommender stage for Pop, BPR, VBPR; returns (rows by model, run folder, extras:
    ``selection``, ``below_popularity``, ``timings``, ``reused``, ``wall_s``).
    ``reuse``: keep a finished stage of the identical configuration instead of retraining."""
    from vars_fast.config import make_config
    from vars_fast.train import run

    seed = int(sets.get("run.seed", 0))
    out = work / (preset if seed == 0 else f"{preset}-seed{seed}")
    cfg = make_config(preset, overrides={"recommender.models": ["Pop", "BPR", "VBPR"],
                                         "run.stages": ["recommender"], "run.progress": False, **sets})
    t = time.perf_counter()
    reused = reuse and _finished(out, cfg)
    if not reused and run(cfg, str(out)) != 0:
        sys.exit(f"vars_fast recommender stage failed for preset {preset} (see {out}/log.txt)")
    wall = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    meta = metrics["meta"]
    timings = meta["timings"]
    rows = {}
    for r in metrics["ranking"]:
        if r["attack"] == "clean" and r["defense"] == "none":
            rows[r["model"]] = {"HR@10": r["HR@10"], "NDCG@10": r["NDCG@10"],
                                "train_s": timings.get(f"train_{r['model']}_s")}
    extras = {"selection": meta.get("selection", {}), "below_popularity": meta.get("below_popularity", []),
              "timings": timings, "reused": bool(reused), "wall_s": round(wall, 1),
              "seconds_images": meta.get("data", {}).get("seconds_images")}
    return rows, out, extras


def load_split_and_features(out: Path):
    """The catalogue and clean features of a run folder, as vars_fast evaluated them."""
    from vars_fast.config import from_dict, load_yaml
    from vars_fast.data import load_catalogue
    from vars_fast.io import load_checkpoint

    cfg = from_dict(load_yaml(out / "config.yaml"))
    cat = load_catalogue(cfg.data, cfg.data.cache_dir or out / "cache", progress=False)
    feats = load_checkpoint(out / "checkpoints" / f"features_{cfg.backbone.name}.pt")["features"]
    return cfg, cat, feats.numpy().astype(np.float32)


# ---------------------------------------------------------------- the shared holdout

def holdout_for(cfg, cat, model: str, recorded: dict | None = None):
    """``(fold, holdout)`` exactly as our stage carves it for ``model``: the first draws of
    ``Context.generator("recommender:<model>")`` (the pipeline's own method, on this config's
    run.seed) go to ``holdout_split(cat, recommender.val_negatives, gen)``, both in
    ``selection.select_and_fit`` and in ``fit_bpr``'s early stopping (``stage._train``).

    Checked here: its size (one pair of each user with >= 3 training pairs, the fold the rest),
    and, where our run recorded a selection for ``model`` (``recorded``: ``meta.selection``),
    the number of held-out users and the popularity ranker's holdout score, which depends on
    every held-out pair, every negative and the fold's counts."""
    from vars_fast.pipeline import Context
    from vars_fast.recommenders.base import holdout_split

    gen = Context.generator(SimpleNamespace(cfg=cfg), f"recommender:{model}")
    n_neg = int(cfg.recommender.val_negatives)
    fold, val = holdout_split(cat, n_neg, gen)
    counts = torch.bincount(cat.train[:, 0], minlength=cat.n_users)
    expect = int((counts >= 3).sum())
    assert len(val.users) == expect, (model, len(val.users), expect)
    assert tuple(val.negatives.shape) == (expect, n_neg), (model, tuple(val.negatives.shape))
    assert len(fold.train) == len(cat.train) - expect, (model, len(fold.train), len(cat.train), expect)
    assert not bool(cat.is_train_positive(val.users[:, None].expand_as(val.negatives), val.negatives).any())
    rec = (recorded or {}).get(model)
    if rec:
        assert rec["holdout_users"] == expect, (model, rec["holdout_users"], expect)
        if rec.get("metric") == SELECT_METRIC:
            pop = val.popularity(fold, SELECT_METRIC)
            assert abs(pop - rec["popularity"]) < 1e-9, (model, pop, rec["popularity"])
    return fold, val


def _digest(*ts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in ts:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def holdout_score(score_fn, val) -> float:
    """Mean holdout score (SELECT_METRIC) of each held-out item against its negatives, as our selection scores it."""
    from vars_fast.recommenders.base import _per_user

    cand = val.candidates().numpy()
    s = np.stack([score_fn(int(u), cand[r]) for r, u in enumerate(val.users.tolist())]).astype(np.float32)
    return float(_per_user(torch.from_numpy(s), SELECT_METRIC).mean())


# ---------------------------------------------------------------- Cornac

def cornac_dataset(pairs: torch.Tensor, seed: int):
    import cornac

    return cornac.data.Dataset.build([(str(u), str(i), 1.0) for u, i in pairs.numpy()], seed=seed)


def rank_metrics(score_fn, cat) -> dict:
    """HR/NDCG@10 with vars_fast's metric on (test item, its 100 negatives) for every user."""
    from vars_fast.metrics import hr_ndcg

    cand = torch.cat([cat.test[:, None], cat.negatives], 1).numpy()
    s = torch.from_numpy(np.stack([score_fn(u, cand[u]) for u in range(cat.n_users)]).astype(np.float64))
    m = hr_ndcg(s[:, 0], s[:, 1:], topk=(10,))
    return {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"]}


def _index_maps(ds, cat):
    """Our user/item index -> Cornac's index (-1: unknown to Cornac)."""
    uidx = np.full(cat.n_users, -1, dtype=np.int64)
    for raw, j in ds.uid_map.items():
        uidx[int(raw)] = j
    iidx = np.full(cat.n_items, -1, dtype=np.int64)
    for raw, j in ds.iid_map.items():
        iidx[int(raw)] = j
    return uidx, iidx


def _l2(feats: np.ndarray) -> np.ndarray:
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)  # L2-normalised rows


def fit_cornac_vbpr(cat, pairs: torch.Tensor, f: np.ndarray, setting: dict, seed: int, threads: int):
    """Cornac's VBPR trained on ``pairs``; returns (score(u, items) in our indices, fit seconds)."""
    import cornac
    from cornac.data import ImageModality

    from vars_fast.recommenders.base import cpu_threads

    ds = cornac_dataset(pairs, seed)
    uidx, iidx = _index_maps(ds, cat)
    order = np.empty(ds.num_items, dtype=np.int64)
    order[iidx[iidx >= 0]] = np.flatnonzero(iidx >= 0)  # Cornac index -> our item
    ds.add_modalities(item_image=ImageModality(features=f[order]))
    model = cornac.models.VBPR(k=32, k2=32, n_epochs=40, batch_size=100, learning_rate=setting["learning_rate"],
                               lambda_w=setting["lambda_w"], use_gpu=False, verbose=False, seed=seed)
    with cpu_threads(threads):  # the same torch thread count as our training loop
        t = time.perf_counter()
        model.fit(ds)
        dt = time.perf_counter() - t
    theta_all = f @ model.emb_matrix  # [N, k2]: E f_i for every item, known or not
    vbias_all = (f @ model.beta_prime).ravel()

    def score(u, items):
        cu, ci = uidx[u], iidx[items]
        assert cu >= 0, f"user {u} has no pair Cornac trained on"
        s = theta_all[items] @ model.theta_user[cu] + vbias_all[items]
        known = ci >= 0
        s[known] += model.gamma_item[ci[known]] @ model.gamma_user[cu] + model.beta_item[ci[known]]
        return s

    return score, dt


def fit_cornac_bpr(cat, pairs: torch.Tensor, lr: float, seed: int):
    """Cornac's BPR trained on ``pairs``; returns (score(u, items) in our indices, fit seconds)."""
    import cornac

    ds = cornac_dataset(pairs, seed)
    uidx, iidx = _index_maps(ds, cat)
    model = cornac.models.BPR(k=64, max_iter=100, learning_rate=lr, lambda_reg=0.01, verbose=False, seed=seed)
    t = time.perf_counter()
    model.fit(ds)
    dt = time.perf_counter() - t

    def score(u, items):
        assert uidx[u] >= 0, f"user {u} has no pair Cornac trained on"
        known = model.score(int(uidx[u]))  # [num_items] in Cornac's order
        ci = iidx[items]
        return np.where(ci >= 0, known[np.maximum(ci, 0)], known.min())

    return score, dt


def _select(name: str, settings: list[dict], fit, fold, val, cat, log=print) -> dict:
    """Each setting trained on the fold and scored on the holdout; the best retrained on every
    training pair and evaluated on the test split."""
    t_all = time.perf_counter()
    grid = []
    for s in settings:
        score, dt = fit(fold.train, s)
        grid.append({**s, "val": holdout_score(score, val), "fit_s": round(dt, 1)})
        log(f"  Cornac {name} {s}: holdout {SELECT_METRIC.upper()} {grid[-1]['val']:.4f} ({dt:.1f}s)")
    best = max(grid, key=lambda g: g["val"])  # the first on ties
    chosen = {k: best[k] for k in settings[0]}
    score, dt = fit(cat.train, chosen)
    chance, se = val.chance(SELECT_METRIC)
    res = {**rank_metrics(score, cat), "train_s": dt, "chosen": chosen, "grid": grid,
           "holdout": {"metric": SELECT_METRIC, "users": len(val.users), "negatives": int(val.negatives.shape[1]),
                       "popularity": val.popularity(fold, SELECT_METRIC), "chance": chance, "chance_se": se},
           "select_s": round(time.perf_counter() - t_all, 1)}
    log(f"  Cornac {name}: chose {chosen}; test HR@10 {res['HR@10']:.4f} ({res['select_s']:.1f}s in all)")
    return res


def run_cornac_vbpr(cat, feats: np.ndarray, fold, val, seed: int, threads: int) -> dict:
    f = _l2(feats)
    res = _select("VBPR", list(CORNAC_VBPR_GRID), lambda pairs, s: fit_cornac_vbpr(cat, pairs, f, s, seed, threads),
                  fold, val, cat)
    lrs = sorted({g["learning_rate"] for g in CORNAC_VBPR_GRID}, reverse=True)
    lws = sorted({g["lambda_w"] for g in CORNAC_VBPR_GRID})
    res["lr"] = res["chosen"]["learning_rate"]
    res["settings"] = (f"k=k2=32, 40 epochs, Adam, batch 100, lambda_b 0.01, L2-normalised features; "
                       f"learning_rate {res['chosen']['learning_rate']}, lambda_w {res['chosen']['lambda_w']}: "
                       f"the best holdout {SELECT_METRIC.upper()} of learning_rate in {lrs} x lambda_w in {lws} "
                       f"(trained on the fold of our VBPR's holdout), retrained on every training pair")
    return res


def run_cornac_bpr(cat, fold, val, seed: int) -> dict:
    res = _select("BPR", [{"lr": lr} for lr in CORNAC_BPR_LRS],
                  lambda pairs, s: fit_cornac_bpr(cat, pairs, s["lr"], seed), fold, val, cat)
    res["lr"] = res["chosen"]["lr"]
    res["settings"] = (f"k=64, 100 epochs, SGD lambda 0.01, lr {res['lr']}: the best holdout "
                       f"{SELECT_METRIC.upper()} of lr in {list(CORNAC_BPR_LRS)} (trained on the fold of our BPR's "
                       f"holdout, not on the test split), retrained on every training pair")
    return res


def cornac_results(out: Path, cfg, cat, feats: np.ndarray, recorded: dict | None = None) -> dict:
    """Cornac's VBPR and BPR on a run folder's split and features, reused from
    ``<run>/cornac.json`` when split, features, holdouts, grids, protocol and Cornac version are
    unchanged (re-running the cross-check after changing our training does not retrain Cornac)."""
    import cornac

    holdouts = {m: holdout_for(cfg, cat, m, recorded) for m in ("VBPR", "BPR")}
    key = {"protocol": CACHE_PROTOCOL, "select_metric": SELECT_METRIC, "split": cat.meta.get("split_key"),
           "features": hashlib.blake2b(feats.tobytes(), digest_size=16).hexdigest(),
           "holdouts": {m: _digest(fo.train, v.users, v.items, v.negatives) for m, (fo, v) in holdouts.items()},
           "cornac": cornac.__version__, "vbpr_grid": list(CORNAC_VBPR_GRID), "bpr_lrs": list(CORNAC_BPR_LRS),
           "threads": int(cfg.recommender.threads), "seed": int(cfg.run.seed)}
    path = out / "cornac.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            print(f"Cornac: reusing {path}")
            return {**cached["results"], "cached": True}
    t = time.perf_counter()
    res = {"VBPR": run_cornac_vbpr(cat, feats, *holdouts["VBPR"], key["seed"], key["threads"])}
    res["VBPR"]["wall_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    res["BPR"] = run_cornac_bpr(cat, *holdouts["BPR"], key["seed"])
    res["BPR"]["wall_s"] = round(time.perf_counter() - t, 1)
    path.write_text(json.dumps({"key": key, "results": res}, indent=2))
    return res


# ---------------------------------------------------------------- one preset

def _summarise(runs: list[dict]) -> dict:
    """Per-seed rows -> one row: the mean of each metric, its standard deviation and the seeds' values."""
    out = {k: v for k, v in runs[0].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    for k in ("HR@10", "NDCG@10", "train_s", "select_s", "wall_s"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = float(np.mean(vals))
            if len(runs) > 1:
                out[f"{k}_sd"] = float(np.std(vals, ddof=1))
                out[f"{k}_seeds"] = vals
    if len(runs) > 1 and "lr" in runs[0]:
        out["lr_seeds"] = [r["lr"] for r in runs]
    if len(runs) > 1 and "chosen" in runs[0]:
        out["chosen_seeds"] = [r["chosen"] for r in runs]
    return out


def _our_selection(sel: dict) -> dict:
    """``meta.selection`` without the validation curves: per model the chosen setting, the
    holdout's popularity and chance levels, every trial's score, and the seconds spent."""
    out = {}
    for name, s in sel.items():
        out[name] = {k: s.get(k) for k in ("metric", "chosen", "popularity", "chance", "holdout_users", "seconds")}
        out[name]["trials"] = [{k: t.get(k) for k in ("lr", "weight_decay", "k", "val", "best_epoch", "seconds")}
                               for t in s.get("trials", [])]
    return out


def crosscheck(preset: str, work: Path, sets: dict, reuse: bool = False, seeds: int = 1) -> dict:
    ours_runs, cornac_runs, extras_runs, walls = [], [], [], []
    for seed in range(seeds):
        ours, out, extras = run_ours(preset, work, {**sets, "run.seed": seed} if seeds > 1 else sets, reuse)
        cfg, cat, feats = load_split_and_features(out)
        t = time.perf_counter()
        res = cornac_results(out, cfg, cat, feats, extras["selection"])
        cached = bool(res.pop("cached", False))
        cornac_runs.append(res)
        walls.append({"vars_fast_s": extras["wall_s"], "vars_fast_reused": extras["reused"],
                      "vars_fast_stage_s": extras["timings"].get("stage_recommender_s"),
                      "vars_fast_images_s": extras["seconds_images"],
                      "vars_fast_data_s": extras["timings"].get("data_s"),
                      "vars_fast_features_s": extras["timings"].get("features_s"),
                      "cornac_s": round(time.perf_counter() - t, 1), "cornac_cached": cached})
        ours_runs.append(ours)
        extras_runs.append(extras)
    ours = {m: _summarise([r[m] for r in ours_runs]) for m in ours_runs[0]}
    cornac = {m: _summarise([r[m] for r in cornac_runs]) for m in ("VBPR", "BPR")}
    regime = dict(cat.meta.get("regime") or {})
    if regime:
        regime["per_item_mean"] = regime["train_purchases"] / max(1, regime["items"])
    return {"preset": preset, "n_users": cat.n_users, "n_items": cat.n_items, "n_train": int(len(cat.train)),
            "items_without_train": int(cat.meta.get("items_without_train", -1)),
            "feature_dim": int(feats.shape[1]), "backbone": cfg.backbone.name, "image_size": cat.image_size,
            "seeds": seeds, "regime": regime, "vars_fast": ours, "cornac": cornac,
            "vars_fast_selection": [_our_selection(e["selection"]) for e in extras_runs],
            "below_popularity": [e["below_popularity"] for e in extras_runs], "wall": walls}


# ---------------------------------------------------------------- markdown

def _fmt(x, nd=4):
    return "-" if x is None else f"{x:.{nd}f}"


def _cell(row: dict, key: str, nd: int = 4) -> str:
    """``mean`` or ``mean ± sd`` when the row summarises several seeds."""
    sd = row.get(f"{key}_sd")
    return _fmt(row.get(key), nd) + ("" if sd is None else f" ± {sd:.{nd}f}")


def _regime_line(s: dict) -> str:
    from vars_fast.data.interactions import format_stats

    return format_stats(s) + f"; {s['items_without_train']} items without a training purchase"


def _cornac_grid_lines(name: str, row: dict) -> list[str]:
    h = row.get("holdout")
    if not h:
        return []
    keys = list(row["chosen"])
    lines = [f"Cornac {name} on {'our ' + name}'s holdout ({h['users']} held-out training purchases, each against "
             f"{h['negatives']} negatives; {h['metric'].upper()} of popularity {h['popularity']:.4f}, of a random "
             f"scorer {h['chance']:.4f} ± {h['chance_se']:.4f}):", "",
             "| " + " | ".join(keys) + f" | holdout {h['metric'].upper()} | fit s on the fold | |",
             "|" + "---|" * (len(keys) + 3)]
    for g in row["grid"]:
        mark = "chosen" if all(g[k] == row["chosen"][k] for k in keys) else ""
        lines.append("| " + " | ".join(f"{g[k]:g}" for k in keys) + f" | {g['val']:.4f} | {g['fit_s']:.1f} | {mark} |")
    return lines + [""]


def _selection_lines(sel: dict) -> list[str]:
    if not sel:
        return ["vars_fast selection: off for this preset (`recommender.select`); BPR and VBPR early-stop on the "
                "holdout with the config's schedule.", ""]
    lines = ["vars_fast selection (`meta.selection`; trials early-stopped on the same holdouts):", "",
             "| model | chosen lr | weight_decay | k | epochs | holdout | popularity | random | trials | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in sel.items():
        c, m = s.get("chosen"), (s.get("metric") or "").upper()
        trials = ", ".join(f"({t['lr']:g}, {t['weight_decay']:g}, {t['k']}) {t['val']:.4f}" for t in s["trials"])
        if c:
            lines.append(f"| {name} | {c['lr']:g} | {c['weight_decay']:g} | {c['k']} | {c['best_epoch']} | "
                         f"{m} {c['val']:.4f} | {s['popularity']:.4f} | {s['chance']:.4f} | {trials} | "
                         f"{s['seconds']:.1f} |")
        else:
            lines.append(f"| {name} | none: the fixed schedule (no trial beat chance) | | | | | {s['popularity']:.4f} | "
                         f"{s['chance']:.4f} | {trials} | {s['seconds']:.1f} |")
    return lines + ["", "Trials: (lr, weight_decay, k) and their best holdout score.", ""]


def _below_lines(below: list) -> list[str]:
    if not below:
        return ["Below popularity (`meta.below_popularity`): none.", ""]
    return ["Below popularity (`meta.below_popularity`): " + "; ".join(
        f"{b['model']} on the {b['split']} split ({b['metric']} {b['value']:.4f} vs popularity {b['popularity']:.4f})"
        for b in below) + ".", ""]


def _real_table(r: dict) -> list[str]:
    s, real = r["regime"], REAL_CATALOGUE
    o, c = r["vars_fast"], r["cornac"]
    nk = "not known"

    def num(x, fmt):
        return nk if x is None else fmt(x)

    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    pct0 = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    g = lambda x: f"{x:g}"  # noqa: E731
    hr = lambda x: f"{x:.3f}"  # noqa: E731
    rows = [("users", s["users"], real["users"], g), ("items", s["items"], real["items"], lambda x: f"{x:,}"),
            ("training purchases", s["train_purchases"], real["train_purchases"], lambda x: f"{x:,}"),
            ("density (training + test)", s["density"], real["density"], pct),
            ("training purchases per item, mean", s["per_item_mean"], real["per_item_mean"], lambda x: f"{x:.2f}"),
            ("training purchases per item, median", s["per_item_median"], real["per_item_median"], g),
            ("training purchases per item, p90", s["per_item_p90"], real["per_item_p90"], g),
            ("test items cold in training", s["test_cold"], real["test_cold"], pct0),
            ("test items with <= 1 training purchase", s["test_le1"], real["test_le1"], pct0)]
    ours = {"Pop": o["Pop"]["HR@10"], "BPR": o["BPR"]["HR@10"], "VBPR": o["VBPR"]["HR@10"],
            "Cornac VBPR": c["VBPR"]["HR@10"], "Cornac BPR": c["BPR"]["HR@10"]}
    labels = {"Pop": "HR@10 Pop", "BPR": "HR@10 BPR (vars_fast)", "BPR fixed schedule":
              "HR@10 BPR, fixed schedule (vars_fast)", "VBPR": "HR@10 VBPR (vars_fast)",
              "VBPR fixed schedule": "HR@10 VBPR, fixed schedule (vars_fast)", "AMR": "HR@10 AMR (vars_fast)",
              "Cornac VBPR": "HR@10 Cornac VBPR", "Cornac BPR": "HR@10 Cornac BPR"}
    lines = [f"Synthetic `{r['preset']}` vs the real catalogue (issue #24; 64 px EfficientNet-Lite0 features on "
             "both). Real: vars_fast before per-catalogue selection, Cornac's VBPR at one fixed setting (the one this "
             "script used before: k=k2=32, 40 epochs, learning_rate 0.005, Cornac's default regularisation, "
             "L2-normalised features), no grid; synthetic: this run (vars_fast with selection on, Cornac with its grid chosen "
             "on the holdout); \"not run\": not trained here.", "",
             f"| | synthetic {r['preset']} | real catalogue |", "|---|---|---|"]
    lines += [f"| {name} | {num(a, fmt)} | {num(b, fmt)} |" for name, a, b, fmt in rows]
    for key, label in labels.items():
        lines.append(f"| {label} | {hr(ours[key]) if key in ours else 'not run'} | {num(real['HR@10'][key], hr)} |")
    return lines + [""]


def write_results(results: list[dict], path: Path, command: str) -> None:
    import cornac

    env = {"cornac": cornac.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_1min": round(os.getloadavg()[0], 1)}
    path.with_suffix(".json").write_text(json.dumps({"command": command, "env": env, "results": results}, indent=2))
    lines = ["# vars_fast vs Cornac: VBPR and BPR on the same split and features", "",
             f"Reproduce: `{command}` (cornac {env['cornac']}, torch {env['torch']}, numpy {env['numpy']}, "
             f"{env['cpus']} CPUs, load average {env['load_average_1min']} when written). What each side runs is in "
             "the script's docstring: both libraries choose their settings on the same training holdout (ours: "
             "per-catalogue selection where it is on, early stopping otherwise; Cornac: a small grid), never on the "
             "test split. Training seconds are wall time of whenever each side ran (Cornac's results are cached per "
             "split, features and holdout): on a shared machine compare them only at equal load.", ""]
    for r in results:
        o, c = r["vars_fast"], r["cornac"]
        seeds = r.get("seeds", 1)
        lines += [f"## preset `{r['preset']}`: {r['n_users']} users, {r['n_items']} items, {r['n_train']} training "
                  f"interactions, {r['items_without_train']} items without any; {r['backbone']} features "
                  f"({r['feature_dim']}-d) at {r['image_size']} px"
                  + (f"; mean ± sd over init seeds 0..{seeds - 1}" if seeds > 1 else ""), ""]
        if r.get("regime"):
            lines += [f"Regime (`split_stats`): {_regime_line(r['regime'])}.", ""]
        lines += ["| model | library | HR@10 | NDCG@10 | training s |", "|---|---|---|---|---|"]
        for name in ("VBPR", "BPR"):
            for lib, row in (("vars_fast", o[name]), ("Cornac", c[name])):
                lines.append(f"| {name} | {lib} | {_cell(row, 'HR@10')} | {_cell(row, 'NDCG@10')} | "
                             f"{_cell(row, 'train_s', 1)} |")
        lines.append(f"| Pop | vars_fast | {_fmt(o['Pop']['HR@10'])} | {_fmt(o['Pop']['NDCG@10'])} | - |")
        gap = o["VBPR"]["HR@10"] - c["VBPR"]["HR@10"]
        lines += ["", f"VBPR ≥ Cornac's VBPR − 0.01 (issue #24's bar): {'yes' if gap >= -0.01 else 'no'} "
                  f"({o['VBPR']['HR@10']:.4f} vs {c['VBPR']['HR@10']:.4f}, {gap:+.4f}).", "",
                  f"Cornac VBPR: {c['VBPR']['settings']}. Cornac BPR: {c['BPR']['settings']}"
                  + (f"; lr per seed {c['BPR']['lr_seeds']}" if "lr_seeds" in c["BPR"] else "")
                  + (f"; VBPR setting per seed {c['VBPR']['chosen_seeds']}" if "chosen_seeds" in c["VBPR"] else "")
                  + ".", ""]
        if seeds > 1:
            lines += ["HR@10 per seed: " + "; ".join(
                f"{lib} {name} {[round(x, 4) for x in row['HR@10_seeds']]}"
                for name in ("VBPR", "BPR") for lib, row in (("vars_fast", o[name]), ("Cornac", c[name]))) + ".", ""]
        lines += _cornac_grid_lines("VBPR", c["VBPR"]) + _cornac_grid_lines("BPR", c["BPR"])
        for i, (sel, below) in enumerate(zip(r["vars_fast_selection"], r["below_popularity"])):
            if seeds > 1:
                lines += [f"Seed {i}:", ""]
            lines += _selection_lines(sel) + _below_lines(below)
        w = r["wall"][0]
        stage = w["vars_fast_stage_s"] if w["vars_fast_reused"] else w["vars_fast_s"]
        lines += [f"Wall time (seed 0): vars_fast recommender stage {_fmt(stage, 1)} s"
                  + (" (reused from an earlier identical run: when it ran)" if w["vars_fast_reused"] else "")
                  + f": images {_fmt(w['vars_fast_images_s'], 1)} s, features "
                  f"{_fmt(w['vars_fast_features_s'], 1)} s, BPR {_fmt(o['BPR'].get('train_s'), 1)} s and VBPR "
                  f"{_fmt(o['VBPR'].get('train_s'), 1)} s (selection included). Cornac VBPR grid + retrain "
                  f"{_fmt(c['VBPR'].get('select_s'), 1)} s, BPR grid + retrain {_fmt(c['BPR'].get('select_s'), 1)} s"
                  + (" (cached from an earlier identical run)" if w.get("cornac_cached") else "") + ".", ""]
        if r["preset"] == "longtail" and r.get("regime"):
            lines += _real_table(r)
    path.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="default,sparse",
                   help="comma-separated presets (default: default,sparse; longtail: issue #24's regime)")
    p.add_argument("--work", default="runs/crosscheck", help="run folders (features are cached there)")
    p.add_argument("--results", default=str(HERE / "results" / "crosscheck_cornac"),
                   help="output path without suffix (.md and .json are written)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for both libraries' data / our training (repeatable)")
    p.add_argument("--seeds", type=int, default=1, help="init seeds per preset (mean ± sd over 0..N-1)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a finished vars_fast stage of the identical config in --work (Cornac is always cached)")
    args = p.parse_args(argv)
    _import_cornac()
    from vars_fast.config import parse_set

    sets = parse_set(args.set)
    results = [crosscheck(pr.strip(), Path(args.work), sets, args.reuse, args.seeds) for pr in args.presets.split(",") if pr.strip()]
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(results, out, "python benchmarks/crosscheck_cornac.py " + " ".join(argv or sys.argv[1:]))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
