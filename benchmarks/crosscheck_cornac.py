"""Cross-check vars_fast's VBPR and BPR against Cornac's on the same split and the same features.

    pip install -e '.[crosscheck]'          # cornac, optional; never a runtime dependency
    python benchmarks/crosscheck_cornac.py                       # default and sparse presets
    python benchmarks/crosscheck_cornac.py --presets sparse --set data.seed=1
    python benchmarks/crosscheck_cornac.py --presets default --seeds 5   # mean over 5 init seeds

Per preset, this runs vars_fast's ``recommender`` stage (Pop, BPR, VBPR) into
``<work>/<preset>`` exactly as ``python -m vars_fast.train`` does, then trains Cornac's VBPR
and BPR on the same training interactions and the same clean backbone features (read from
that run folder), and ranks the same candidates: each user's held-out test item against the
same 100 sampled negatives, with ``vars_fast.metrics.hr_ndcg`` (ties count against the
positive for both libraries).

Cornac only knows the items that have training interactions. Items without any get what
VBPR defines for them: the visual term alone, θ_uᵀ E f_i + β'ᵀ f_i (no γ_i, no β_i). Cornac's
BPR has no information about them and gives them its lowest score of the user (what
``cornac.models.Recommender.rank`` does with unknown items).

Cornac's settings: VBPR k = k2 = 32, 40 epochs, Adam lr 0.005, batch 100, Cornac's default
regularisation, L2-normalised features (the setting that beat vars_fast on a real catalogue);
BPR k = 64 (as ours), 100 epochs, the best of a small SGD learning-rate grid on the test
split (an optimistic bar for Cornac). Training time is wall time of ``fit`` for Cornac and of
build + fit (validation included) for vars_fast, both with ``recommender.threads`` torch
threads (Cornac's BPR is Cython with one thread when seeded).

With ``--seeds N`` both libraries train N times on the same split, with init seeds 0..N-1
(``run.seed`` for vars_fast, ``seed`` for Cornac), and the table gives mean ± standard deviation:
one seed's HR@10 on 600 test users moves by about one standard error (0.02), more than the
margin the comparison asks about.

Writes ``benchmarks/results/crosscheck_cornac.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CORNAC_BPR_LRS = (0.01, 0.05, 0.1)


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


def run_ours(preset: str, work: Path, sets: dict, reuse: bool = False) -> tuple[dict, Path]:
    """vars_fast's recommender stage for Pop, BPR, VBPR; returns (rows by model, run folder).
    ``reuse``: keep a finished stage of the identical configuration instead of retraining."""
    from vars_fast.config import make_config
    from vars_fast.train import run

    seed = int(sets.get("run.seed", 0))
    out = work / (preset if seed == 0 else f"{preset}-seed{seed}")
    cfg = make_config(preset, overrides={"recommender.models": ["Pop", "BPR", "VBPR"],
                                         "run.stages": ["recommender"], "run.progress": False, **sets})
    if not (reuse and _finished(out, cfg)) and run(cfg, str(out)) != 0:
        sys.exit(f"vars_fast recommender stage failed for preset {preset} (see {out}/log.txt)")
    metrics = json.loads((out / "metrics.json").read_text())
    timings = metrics["meta"]["timings"]
    rows = {}
    for r in metrics["ranking"]:
        if r["attack"] == "clean" and r["defense"] == "none":
            rows[r["model"]] = {"HR@10": r["HR@10"], "NDCG@10": r["NDCG@10"],
                                "train_s": timings.get(f"train_{r['model']}_s")}
    return rows, out


def load_split_and_features(out: Path):
    """The catalogue and clean features of a run folder, as vars_fast evaluated them."""
    from vars_fast.config import from_dict, load_yaml
    from vars_fast.data import load_catalogue
    from vars_fast.io import load_checkpoint

    cfg = from_dict(load_yaml(out / "config.yaml"))
    cat = load_catalogue(cfg.data, cfg.data.cache_dir or out / "cache", progress=False)
    feats = load_checkpoint(out / "checkpoints" / f"features_{cfg.backbone.name}.pt")["features"]
    return cfg, cat, feats.numpy().astype(np.float32)


def cornac_dataset(cat, seed: int):
    import cornac

    tr = cat.train.numpy()
    return cornac.data.Dataset.build([(str(u), str(i), 1.0) for u, i in tr], seed=seed)


def rank_metrics(score_fn, cat) -> dict:
    """HR/NDCG@10 with vars_fast's metric on (test item, its 100 negatives) for every user."""
    from vars_fast.metrics import hr_ndcg

    cand = torch.cat([cat.test[:, None], cat.negatives], 1).numpy()
    s = torch.from_numpy(np.stack([score_fn(u, cand[u]) for u in range(cat.n_users)]).astype(np.float64))
    m = hr_ndcg(s[:, 0], s[:, 1:], topk=(10,))
    return {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"]}


def _index_maps(ds, cat):
    """Our user/item index -> Cornac's index (-1: unknown to Cornac)."""
    uidx = np.array([ds.uid_map[str(u)] for u in range(cat.n_users)])
    iidx = np.full(cat.n_items, -1, dtype=np.int64)
    for raw, j in ds.iid_map.items():
        iidx[int(raw)] = j
    return uidx, iidx


def run_cornac_vbpr(cat, feats: np.ndarray, seed: int, threads: int) -> dict:
    import cornac
    from cornac.data import ImageModality

    from vars_fast.recommenders.base import cpu_threads

    f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)  # L2-normalised rows
    ds = cornac_dataset(cat, seed)
    uidx, iidx = _index_maps(ds, cat)
    order = np.empty(ds.num_items, dtype=np.int64)
    order[iidx[iidx >= 0]] = np.flatnonzero(iidx >= 0)  # Cornac index -> our item
    ds.add_modalities(item_image=ImageModality(features=f[order]))
    model = cornac.models.VBPR(k=32, k2=32, n_epochs=40, batch_size=100, learning_rate=0.005,
                               use_gpu=False, verbose=False, seed=seed)
    with cpu_threads(threads):  # the same torch thread count as our training loop
        t = time.perf_counter()
        model.fit(ds)
        dt = time.perf_counter() - t
    theta_all = f @ model.emb_matrix  # [N, k2]: E f_i for every item, known or not
    vbias_all = (f @ model.beta_prime).ravel()

    def score(u, items):
        cu, ci = uidx[u], iidx[items]
        s = theta_all[items] @ model.theta_user[cu] + vbias_all[items]
        known = ci >= 0
        s[known] += model.gamma_item[ci[known]] @ model.gamma_user[cu] + model.beta_item[ci[known]]
        return s

    return {**rank_metrics(score, cat), "train_s": dt,
            "settings": "k=k2=32, 40 epochs, Adam lr 0.005, batch 100, L2-normalised features"}


def run_cornac_bpr(cat, seed: int) -> dict:
    import cornac

    best = None
    for lr in CORNAC_BPR_LRS:
        ds = cornac_dataset(cat, seed)
        uidx, iidx = _index_maps(ds, cat)
        model = cornac.models.BPR(k=64, max_iter=100, learning_rate=lr, lambda_reg=0.01, verbose=False, seed=seed)
        t = time.perf_counter()
        model.fit(ds)
        dt = time.perf_counter() - t
        known_all = lambda u: model.score(int(uidx[u]))  # noqa: E731  [num_items] Cornac order

        def score(u, items):
            known = known_all(u)
            ci = iidx[items]
            return np.where(ci >= 0, known[np.maximum(ci, 0)], known.min())

        m = {**rank_metrics(score, cat), "train_s": dt, "lr": lr}
        if best is None or m["HR@10"] > best["HR@10"]:
            best = m
    best["settings"] = (f"k=64, 100 epochs, SGD lambda 0.01, lr {best['lr']} "
                        f"(best HR@10 of lr in {list(CORNAC_BPR_LRS)})")
    return best


def cornac_results(out: Path, cfg, cat, feats: np.ndarray) -> dict:
    """Cornac's VBPR and BPR on a run folder's split and features, reused from
    ``<run>/cornac.json`` when split, features, settings and Cornac version are unchanged
    (re-running the cross-check after changing our training does not retrain Cornac)."""
    import hashlib

    import cornac

    key = {"split": cat.meta.get("split_key"), "features": hashlib.blake2b(feats.tobytes(), digest_size=16).hexdigest(),
           "cornac": cornac.__version__, "bpr_lrs": list(CORNAC_BPR_LRS), "threads": int(cfg.recommender.threads),
           "seed": int(cfg.run.seed)}
    path = out / "cornac.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["results"]
    res = {"VBPR": run_cornac_vbpr(cat, feats, key["seed"], key["threads"]), "BPR": run_cornac_bpr(cat, key["seed"])}
    path.write_text(json.dumps({"key": key, "results": res}, indent=2))
    return res


def _summarise(runs: list[dict]) -> dict:
    """Per-seed rows -> one row: the mean of each metric, its standard deviation and the seeds' values."""
    out = {k: v for k, v in runs[0].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
    for k in ("HR@10", "NDCG@10", "train_s"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = float(np.mean(vals))
            if len(runs) > 1:
                out[f"{k}_sd"] = float(np.std(vals, ddof=1))
                out[f"{k}_seeds"] = vals
    if len(runs) > 1 and "lr" in runs[0]:
        out["lr_seeds"] = [r["lr"] for r in runs]
    return out


def crosscheck(preset: str, work: Path, sets: dict, reuse: bool = False, seeds: int = 1) -> dict:
    ours_runs, cornac_runs = [], []
    for seed in range(seeds):
        ours, out = run_ours(preset, work, {**sets, "run.seed": seed} if seeds > 1 else sets, reuse)
        cfg, cat, feats = load_split_and_features(out)
        ours_runs.append(ours)
        cornac_runs.append(cornac_results(out, cfg, cat, feats))
    ours = {m: _summarise([r[m] for r in ours_runs]) for m in ours_runs[0]}
    cornac = {m: _summarise([r[m] for r in cornac_runs]) for m in ("VBPR", "BPR")}
    return {"preset": preset, "n_users": cat.n_users, "n_items": cat.n_items, "n_train": int(len(cat.train)),
            "items_without_train": int(cat.meta.get("items_without_train", -1)),
            "feature_dim": int(feats.shape[1]), "backbone": cfg.backbone.name, "image_size": cat.image_size,
            "seeds": seeds, "vars_fast": ours, "cornac": cornac}


def _fmt(x, nd=4):
    return "-" if x is None else f"{x:.{nd}f}"


def _cell(row: dict, key: str, nd: int = 4) -> str:
    """``mean`` or ``mean ± sd`` when the row summarises several seeds."""
    sd = row.get(f"{key}_sd")
    return _fmt(row.get(key), nd) + ("" if sd is None else f" ± {sd:.{nd}f}")


def write_results(results: list[dict], path: Path, command: str) -> None:
    import cornac

    env = {"cornac": cornac.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_1min": round(os.getloadavg()[0], 1)}
    path.with_suffix(".json").write_text(json.dumps({"command": command, "env": env, "results": results}, indent=2))
    lines = ["# vars_fast vs Cornac: VBPR and BPR on the same split and features", "",
             f"Reproduce: `{command}` (cornac {env['cornac']}, torch {env['torch']}, numpy {env['numpy']}, "
             f"{env['cpus']} CPUs, load average {env['load_average_1min']} when written). What each side runs is in "
             "the script's docstring. Training seconds are wall time of whenever each side ran (Cornac's results "
             "are cached per split and features): on a shared machine compare them only at equal load.", ""]
    for r in results:
        o, c = r["vars_fast"], r["cornac"]
        seeds = r.get("seeds", 1)
        lines += [f"## preset `{r['preset']}`: {r['n_users']} users, {r['n_items']} items, {r['n_train']} training "
                  f"interactions, {r['items_without_train']} items without any; {r['backbone']} features "
                  f"({r['feature_dim']}-d) at {r['image_size']} px"
                  + (f"; mean ± sd over init seeds 0..{seeds - 1}" if seeds > 1 else ""), "",
                  "| model | library | HR@10 | NDCG@10 | training s |", "|---|---|---|---|---|"]
        for name in ("VBPR", "BPR"):
            for lib, row in (("vars_fast", o[name]), ("Cornac", c[name])):
                lines.append(f"| {name} | {lib} | {_cell(row, 'HR@10')} | {_cell(row, 'NDCG@10')} | "
                             f"{_cell(row, 'train_s', 1)} |")
        lines.append(f"| Pop | vars_fast | {_fmt(o['Pop']['HR@10'])} | {_fmt(o['Pop']['NDCG@10'])} | - |")
        lines += ["", f"Cornac VBPR: {c['VBPR']['settings']}. Cornac BPR: {c['BPR']['settings']}"
                  + (f"; lr per seed {c['BPR']['lr_seeds']}" if "lr_seeds" in c["BPR"] else "") + ".", ""]
        if seeds > 1:
            lines += ["HR@10 per seed: " + "; ".join(
                f"{lib} {name} {[round(x, 4) for x in row['HR@10_seeds']]}"
                for name in ("VBPR", "BPR") for lib, row in (("vars_fast", o[name]), ("Cornac", c[name]))) + ".", ""]
    path.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="default,sparse", help="comma-separated presets (default: default,sparse)")
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
