"""Stage "defense": train the full denoiser + detector and the Table 5 ablations.

Writes ``checkpoints/defense.pt`` (full model) and ``checkpoints/defense_<variant>.pt`` for
each of ``defense.ablations`` (``no-detector``: lambda_3 = 0 and no detector;
``no-perceptual``: lambda_2 = 0), each trained on the same seeded item split with the same
schedule; the resumable per-epoch states are ``checkpoints/<name>_train.pt``. Also writes
``figures/defense_training.png`` (loss curves) and ``meta.defense`` in metrics.json: per
variant the training time, the validation detection metrics at the chosen threshold and the
restoration check (the recommender's BPR loss on clean / attacked / denoised held-out items).
"""
from __future__ import annotations

import time

import torch

from vars_fast.defense import save_defense
from vars_fast.defense.training import (LOSS_KEYS, calibrate_threshold, restoration_check, split_items,
                                        train_defense, variant_config)


def checkpoint_name(variant: str) -> str:
    return "defense" if variant == "full" else f"defense_{variant}"


def _seed(ctx, tag: str) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=ctx.generator(tag)))


def run_stage(ctx) -> None:
    cfg, log = ctx.cfg, ctx.log
    dcfg = cfg.defense
    cat = ctx.catalogue
    rec = ctx.recommender("VBPR")
    backbone = ctx.backbone
    split = split_items(cat, ctx.generator("defense-split"), dcfg.train_item_frac, dcfg.val_item_frac)
    log.info(f"defense: item split train {len(split['train'])} / val {len(split['val'])} / test {len(split['test'])}")
    bcfg = {k: getattr(cfg.backbone, k) for k in cfg.backbone.__dataclass_fields__}
    summary, histories = {}, {}
    for variant in ["full"] + [v for v in dcfg.ablations if v != "full"]:
        vcfg = variant_config(dcfg, variant)
        name = checkpoint_name(variant)
        t0 = time.perf_counter()
        defense, hist = train_defense(
            cat, rec, backbone, vcfg, split, backbone_cfg=bcfg, device=ctx.device,
            seed=_seed(ctx, f"defense-{variant}"),
            state_path=ctx.run.checkpoint(f"{name}_train"), amp=cfg.run.amp, compile=cfg.run.compile,
            progress=cfg.run.progress, log=log, desc=f"defense[{variant}]")
        train_s = time.perf_counter() - t0
        info = {"train_s": round(train_s, 1), "epochs": len(hist)}
        if defense.detector is not None:
            thr, val = calibrate_threshold(defense, rec, cat, split["val"], vcfg,
                                           ctx.generator(f"defense-val-{variant}"), ctx.device,
                                           batch_size=cfg.eval.batch_size)
            defense.threshold = thr
            info["val_detection"] = {k: val[k] for k in ("accuracy", "auc", "tpr", "fpr", "threshold")}
            log.info(f"defense[{variant}]: threshold {thr:.4f} ({vcfg.threshold_rule}) "
                     f"on {len(split['val'])} val items: "
                     + " ".join(f"{k}={val[k]:.3f}" for k in ("accuracy", "auc", "tpr", "fpr")))
        check = restoration_check(defense, rec, cat, split["val"], vcfg, ctx.generator(f"defense-check-{variant}"),
                                  ctx.device, batch_size=cfg.eval.batch_size)
        info["restoration"] = check
        log.info(f"defense[{variant}]: BPR loss on val items (eps {check['eps']:g}): "
                 + " ".join(f"{k}={v:.4f}" for k, v in check.items() if k not in ("eps", "items")))
        save_defense(defense, ctx.run.checkpoint(name), extra={"variant": variant, "info": info})
        if variant == "full":
            ctx.put("defense", defense)
        summary[variant], histories[variant] = info, hist
    ctx.run.update_meta(defense=summary)
    if cfg.eval.figures:
        plot_training(histories, ctx.run.figure("defense_training"))


def plot_training(histories: dict, path) -> None:
    """Per-epoch loss components of each variant, one panel per component (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LOSS_KEYS), figsize=(3.2 * len(LOSS_KEYS), 3.0))
    colors = {v: f"C{i}" for i, v in enumerate(histories)}  # one colour per variant in every panel
    for ax, key in zip(axes, LOSS_KEYS):
        for variant, hist in histories.items():
            ys = [h[key] for h in hist]
            if any(y > 0 for y in ys):
                ax.plot([h["epoch"] for h in hist], ys, marker="o", ms=3, label=variant, color=colors[variant])
        ax.set_title(key)
        ax.set_xlabel("epoch")
        if any(line.get_ydata().min() > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("defence training (Eq. 12 terms, mean per epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
