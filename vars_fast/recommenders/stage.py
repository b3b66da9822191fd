"""Stage "recommender": clean features once, train every configured model, clean ranking rows.

Writes ``checkpoints/features_<backbone>.pt`` (clean backbone features of the catalogue,
reused on re-runs when backbone, weights, input size and catalogue size match),
``checkpoints/recommender_<name>.pt`` per model, ranking rows
``{"model", "defense": "none", "attack": "clean", "eps": 0, HR/NDCG@5/10/20}``, and
``meta.data`` / ``meta.timings``. A model with a ``base`` (AMR) is fine-tuned from the base
trained here (VBPR is trained, and saved, even when only AMR is asked for).
"""
from __future__ import annotations

import hashlib
import time

import torch

from vars_fast.distributed import ddp
from vars_fast.io import load_checkpoint, save_checkpoint
from vars_fast.metrics import ranking_metrics
from vars_fast.recommenders import RECOMMENDERS, Pop, build_recommender, save_recommender, selection
from vars_fast.recommenders.base import batched_encode
from vars_fast.recommenders.bounded import certified_metrics
from vars_fast.evaluate.section import Section, missing, table
from vars_fast.registry import SECTIONS, SOURCES


def images_digest(images: torch.Tensor) -> str:
    """Content hash of the uint8 catalogue (~20 ms for 800 64-px images): a changed data set or
    generator never reuses stale features, even when its size is unchanged."""
    return hashlib.blake2b(images.contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def clean_features(ctx) -> torch.Tensor:
    """[N, F] backbone features of the clean catalogue, from the run-folder cache when valid."""
    cfg, cat = ctx.cfg, ctx.catalogue
    path = ctx.run.checkpoint(f"features_{cfg.backbone.name}")
    ident = {"backbone": cfg.backbone.name, "weights": str(cfg.backbone.weights),
             "input_size": int(cfg.backbone.input_size), "n_items": int(cat.n_items),
             "image_size": int(cat.images.shape[-1]), "images": images_digest(cat.images)}
    if path.is_file():
        ck = load_checkpoint(path)
        if ck.get("ident") == ident:
            ctx.log.info("recommender: clean features from %s", path)
            return ck["features"]
        ctx.log.info("recommender: %s is stale (%s != %s), re-extracting", path, ck.get("ident"), ident)
    bb = ctx.backbone
    feats = batched_encode(bb.features, cat.images, cfg.recommender.feature_batch, ctx.device,
                           cfg.run.progress, desc=f"features {bb.name}", channels_last=cfg.run.channels_last)
    if ddp.is_main():
        save_checkpoint({"ident": ident, "features": feats}, path)
    return feats


# every backbone here (ResNet50/18, EfficientNet-Lite0) was trained on ImageNet at 224 px
NATIVE_INPUT = 224


def warn_small_images(cfg, log) -> bool:
    """One warning when real photos are used below the backbone's native input size.

    Why a warning and not a 224-px default: at 224 px each attack and defence step costs
    ~12x what it costs at 64 px on a CPU, while the recommender is measurably better on real
    photos (docs/results/image_size_cost.md). The choice stays the user's, made knowingly."""
    if SOURCES.meta(cfg.data.source)["images"] == "generated" or cfg.data.image_size >= NATIVE_INPUT:
        return False
    log.warning("data.image_size=%d is below %s's native input (%d px): real photos lose detail the "
                "recommender uses (a real catalogue: VBPR HR@10 0.251 at 64 px vs 0.302 at 224 px); "
                "--set data.image_size=%d for quality, at ~12x the CPU cost of attacks and defence "
                "(docs/results/image_size_cost.md)", cfg.data.image_size, cfg.backbone.name, NATIVE_INPUT, NATIVE_INPUT)
    return True


def run_stage(ctx) -> None:
    cfg, rc = ctx.cfg, ctx.cfg.recommender
    warn_small_images(cfg, ctx.log)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cat = ctx.catalogue
    timings["data_s"] = time.perf_counter() - t0

    wanted = list(dict.fromkeys(rc.models))
    bases = [RECOMMENDERS[m].base for m in wanted if RECOMMENDERS[m].base]
    order = list(dict.fromkeys([b for b in bases if b not in wanted] + wanted))
    order.sort(key=lambda m: RECOMMENDERS[m].train_order)  # a base (VBPR) before its fine-tune (AMR)
    feats = None
    if any(RECOMMENDERS[m].uses_features for m in order):
        t = time.perf_counter()
        feats = clean_features(ctx)
        timings["features_s"] = time.perf_counter() - t
        ctx.log.info("recommender: features %s in %.1fs", tuple(feats.shape), timings["features_s"])

    rows, trained, floor, certified = [], {}, [], []
    pop = ranking_metrics(_popularity(cat), cat, topk=(10,))["HR@10"]
    for name in order:
        t = time.perf_counter()
        rec = _train(ctx, name, trained, feats)
        rec.eval().requires_grad_(False)
        trained[name] = rec
        timings[f"train_{name}_s"] = time.perf_counter() - t
        m = ranking_metrics(rec, cat, topk=tuple(cfg.eval.topk))
        ctx.log.info("recommender: %s in %.1fs | %s", name, timings[f"train_{name}_s"],
                     " ".join(f"{k} {v:.4f}" for k, v in m.items()))
        floor += below_popularity(name, rec, m.get("HR@10"), pop, ctx.log)
        if ddp.is_main():
            save_recommender(rec, ctx.run.checkpoint(f"recommender_{name}"), split_key=cat.meta.get("split_key"))
        ctx.put(f"rec:{name}", rec)
        if name in wanted:
            rows.append({"model": name, "defense": "none", "attack": "clean", "eps": 0, **m})
            if hasattr(rec, "visual_bound"):
                certified.append(certificate(rec, cat, m, tuple(cfg.eval.topk)))

    timings["recommender_stage_s"] = time.perf_counter() - t0
    if ddp.is_main():
        ctx.run.add_rows("ranking", rows, table="ranking")
        if certified:  # drawn by the suite section, beside the attacks on the same models
            ctx.run.add_rows("robustness", [r for pair, _ in certified for r in pair], table="suite")
            ctx.run.update_meta(bounded={m["model"]: m for _, m in certified})
        old = ctx.run.load_metrics().get("meta", {}).get("timings", {})
        picked = {n: r.selection for n, r in trained.items() if getattr(r, "selection", None)}
        ctx.run.update_meta(data=getattr(cat, "meta", {}), timings={**old, **timings}, below_popularity=floor,
                            **({"selection": picked} if picked else {}))


def certificate(rec, cat, clean: dict, topk: tuple) -> tuple[list[dict], dict]:
    """A bounded model's robustness rows (clean, and certified against any image change) and its
    bound statistics (recommenders/bounded.py)."""
    cert = certified_metrics(rec, cat, topk)
    b = rec.visual_bound(torch.arange(cat.n_users, device=rec.device)).float().cpu()
    base = {"model": rec.name, "defense": rec.robustness_label, "objective": "train", "cap": rec.cap}
    rows = [{**base, "attack": "clean", "eps": 0, "certified": False, "HR@10": clean["HR@10"],
             "NDCG@10": clean["NDCG@10"]},
            {**base, "attack": "any", "eps": None, "certified": True, "HR@10": cert["HR@10"],
             "NDCG@10": cert["NDCG@10"]}]
    stats = {"model": rec.name, "cap": rec.cap, "bound_mean": float(b.mean()), "bound_p90": float(b.quantile(0.9)),
             "bound_max": float(b.max()), "shift_bound_any_target": float(2 * b.mean()),
             "certified_HR@10": cert["HR@10"]}
    return rows, stats


def _popularity(cat) -> Pop:
    pop = Pop(cat.n_users, cat.n_items)
    pop.fit(cat)
    return pop


def _train(ctx, name: str, trained: dict, feats):
    """One model, trained; VBPR and BPR through per-catalogue selection where it is on."""
    cfg, rc, cat = ctx.cfg, ctx.cfg.recommender, ctx.catalogue
    cls = RECOMMENDERS[name]
    gen = ctx.generator(f"recommender:{name}")
    if cls.base:
        rec = cls.from_trained(trained[cls.base], rc)
        rec.fit(cat, rc, gen, show_progress=cfg.run.progress, log=ctx.log)
        return rec
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator(f"init:{name}")))

    def build(rc_b):
        rec = build_recommender(name, cat.n_users, cat.n_items, rc_b,
                                backbone=ctx.backbone if cls.uses_images else None, seed=seed,
                                feature_dim=None if feats is None else feats.shape[1]).to(ctx.device)
        ddp.broadcast_module(rec)
        return rec

    kw = {"features": feats} if cls.uses_features else {}
    if cls.selectable and selection.enabled(rc, cat.meta.get("source", "synthetic")):
        return selection.select_and_fit(name, build, cat, rc, gen, ctx.log, show_progress=cfg.run.progress, **kw)
    rec = build(rc)
    rec.fit(cat, rc, gen, show_progress=cfg.run.progress, log=ctx.log, **kw)
    return rec


def below_popularity(name: str, rec, hr10, pop_hr10: float, log) -> list[dict]:
    """Where ``rec`` ranks worse than popularity, on the test split (HR@10) or on its training
    holdout (the metric it was validated with): one warning line and one entry each, which
    report.md repeats. A model below popularity is a finding, never a silent row."""
    out = []
    if name != "Pop" and hr10 is not None and hr10 < pop_hr10:
        out.append({"model": name, "split": "test", "metric": "HR@10", "value": hr10, "popularity": pop_hr10})
    val = getattr(rec, "selection", None) or getattr(rec, "fit_record", None)
    if val and val.get("popularity") is not None:
        best = max(t["val"] for t in val["trials"]) if "trials" in val else val["best"]
        if best < val["popularity"]:
            out.append({"model": name, "split": "validation", "metric": val["metric"], "value": best,
                        "popularity": val["popularity"]})
    for r in out:
        log.warning("recommender: %s scores below popularity on the %s split (%s %.4f vs %.4f)", r["model"],
                    r["split"], r["metric"], r["value"], r["popularity"])
    return out


def clean_table(rows: list[dict]) -> list[list]:
    """Clean HR@10 / NDCG@10 per trained model, best first: the image-blind models (BPR, Pop)
    are the floor a visual model and its defences must stay above."""
    clean = [r for r in rows if r.get("defense") == "none" and r.get("attack") == "clean"
             and r.get("objective", "train") == "train" and r.get("variant") is None]
    out = []
    for r in sorted(clean, key=lambda r: -r.get("HR@10", 0.0)):
        cls = RECOMMENDERS[r["model"]] if r["model"] in RECOMMENDERS else None
        out.append([r["model"], "yes" if getattr(cls, "uses_images", False) else "no", r.get("HR@10"), r.get("NDCG@10")])
    return out


def report(doc) -> list[str]:
    """The clean table, then one line per model below popularity (a finding, never a silent
    row) and one per model whose hyperparameters were selected on the training holdout
    (recommenders/selection.py)."""
    meta = doc.meta
    lines = [f"- **{r['model']} scores below popularity** on the {r['split']} split ({r['metric']} "
             f"{r['value']:.4f} vs {r['popularity']:.4f})." for r in meta.get("below_popularity", [])]
    for name, s in meta.get("selection", {}).items():
        c = s.get("chosen")
        what = ("no setting beat chance on the holdout: the config's fixed schedule" if c is None else
                f"lr {c['lr']:g}, weight_decay {c['weight_decay']:g}, k {c['k']}, {c['best_epoch']} epochs")
        lines.append(f"- {name}: selected on the training holdout over {len(s['trials'])} settings by "
                     f"{s['metric'].upper()} ({s['seconds']:.0f} s): {what}.")
    rows = clean_table(doc.rows("ranking", "ranking"))
    if not rows and not lines:
        return []
    return ["## Recommenders (clean)", "", table(["model", "uses images", "HR@10", "NDCG@10"], rows) if rows
            else missing("no clean rows"), "", *lines, *([""] if lines else [])]


SECTIONS.register("recommenders", Section(order=5, report=report))
