"""Stage "defense": train the full denoiser + detector and the Table 5 ablations.

Writes ``checkpoints/defense.pt`` (full model) and ``checkpoints/defense_<variant>.pt`` for
each of ``defense.ablations`` (``no-detector``: lambda_3 = 0 and no detector;
``no-perceptual``: lambda_2 = 0), each trained on the same seeded item split with the same
schedule and the same seed (same initial weights and draws: the ablations differ from the
full model only in the ablated term); the resumable per-epoch states are
``checkpoints/<name>_train.pt``. Phase 1 of ``no-detector`` *is* phase 1 of ``full`` (the
detector is idle there), so it is taken from ``checkpoints/defense_phase1.pt``.

With ``defense.parallel_variants`` on a CPU with >= 2 threads (no DDP), the variants train in
two spawned processes ("lanes") at half the threads each, when both lanes' estimated peak
memory fits what is available (``vars_fast.memory_budget``): lane 1 trains ``full`` then
``no-detector`` (from full's phase 1), lane 2 the other ablations. A CPU training step that
does not fit even alone stops the stage before training, with an error that names
``defense.batch_size``. Small-batch training on 2
cores scales poorly across threads (one epoch: 13.1 s at 2 threads, 16.6 s at 1), so two
1-thread processes finish the three variants sooner than one 2-thread process. The lanes
write the usual per-epoch states; this process then loads the finished ones (no retraining),
calibrates and saves as before. A run with the lanes and a run without them differ in
floating-point reduction order (thread count), not in method. Also writes
``figures/defense_training.png`` (loss curves) and ``meta.defense`` in metrics.json: per
variant the training time, the validation detection metrics at the chosen threshold and the
restoration check (the recommender's BPR loss on clean / attacked / denoised held-out items).
"""
from __future__ import annotations

import time

import torch

from vars_fast import memory_budget as memory
from vars_fast.config import ConfigError, from_dict
from vars_fast.defense import save_defense
from vars_fast.defense.training import (LOSS_KEYS, calibrate_threshold, restoration_check, split_items, train_defense,
                                        variant_config)
from vars_fast.distributed import ddp
from vars_fast.pipeline import Context
from vars_fast.registry import DEFENSE_VARIANTS
from vars_fast.utils import setup_logging


def checkpoint_name(variant: str) -> str:
    return "defense" if variant == "full" else f"defense_{variant}"


def _seed(ctx, tag: str) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=ctx.generator(tag)))


def _variants(dcfg) -> list[str]:
    return ["full"] + [v for v in dict.fromkeys(dcfg.ablations) if v != "full"]


def _lanes(variants: list[str]) -> list[list[str]]:
    """The variants whose phase 1 is the full model's (full, no-detector) share it, so they go in
    one lane, in that order; the rest in the other."""
    first = [v for v in variants if DEFENSE_VARIANTS.meta(v)["full_phase1"]]
    rest = [v for v in variants if v not in first]
    return [lane for lane in (first, rest) if lane]


def _train_variant(ctx, variant: str, split: dict, log, progress: bool):
    cfg = ctx.cfg
    bcfg = {k: getattr(cfg.backbone, k) for k in cfg.backbone.__dataclass_fields__}
    return train_defense(
        ctx.catalogue, ctx.recommender("VBPR"), ctx.backbone, variant_config(cfg.defense, variant), split,
        backbone_cfg=bcfg, device=ctx.device, seed=_seed(ctx, "defense-full"),
        state_path=ctx.run.checkpoint(f"{checkpoint_name(variant)}_train"), amp=cfg.run.amp,
        compile=cfg.run.compile, progress=progress, log=log, desc=f"defense[{variant}]",
        # only full writes it and only no-detector reads it (the lanes run concurrently: another
        # variant writing its own phase 1 there would race with full)
        phase1_path=(ctx.run.checkpoint("defense_phase1")
                     if DEFENSE_VARIANTS.meta(variant)["full_phase1"] and not ddp.is_distributed() else None))


def _lane_main(cfg_dict: dict, run_path: str, variants: list[str], threads: int, split: dict, log_file: str) -> None:
    """One lane process: rebuild the context from the run folder, train ``variants`` in order."""
    torch.set_num_threads(threads)
    log = setup_logging(log_file)
    cfg = from_dict(cfg_dict, check=False)  # validated by the parent, with its registries
    ctx = Context.open(run_path, cfg=cfg, device="cpu", log=log)
    for v in variants:
        _train_variant(ctx, v, split, log, progress=False)


def _use_lanes(ctx, variants: list[str], n_train: int) -> bool:
    """Two lanes when asked for, useful (CPU, >= 2 threads, no DDP) and when both fit in memory
    together: each lane holds what this process holds plus its training step
    (``memory.defense_lane_bytes``)."""
    if not (bool(getattr(ctx.cfg.defense, "parallel_variants", False)) and len(_lanes(variants)) > 1
            and ctx.device.type == "cpu" and torch.get_num_threads() >= 2 and not ddp.is_distributed()):
        return False
    need = len(_lanes(variants)) * memory.defense_lane_bytes(ctx.cfg, n_train)
    avail = memory.available_bytes(ctx.device)
    if need > avail:
        ctx.log.info(f"defense: {len(_lanes(variants))} parallel lanes would need ~{memory.gib(need)} "
                     f"({memory.gib(avail)} available): training the variants in this process")
        return False
    return True


def check_memory(ctx, n_train: int) -> None:
    """Before any training: one CPU training step must fit the available memory, else a
    ConfigError names the settings that size it. (GPU memory is not checked: the CPU
    measurements behind the estimate do not carry over to CUDA kernels and bf16.)"""
    if ctx.device.type != "cpu":
        return
    cfg = ctx.cfg
    step = memory.defense_lane_bytes(cfg, n_train, baseline=0)
    avail = memory.available_bytes(ctx.device)
    if step > avail:
        d = cfg.defense
        raise ConfigError(
            f"defense.batch_size={d.batch_size}: one defence training step at {cfg.data.image_size} px "
            f"(denoiser width {d.width} x {d.n_res_blocks} blocks, {cfg.backbone.name}) needs "
            f"~{memory.gib(step)} and {memory.gib(avail)} is available; lower defense.batch_size "
            f"(or defense.contrastive_items, defense.width)")


def train_in_lanes(ctx, variants: list[str], split: dict) -> dict[str, dict]:
    """Train ``variants`` in two spawned processes; returns per variant its lane and the wall
    seconds until that lane finished (its variants trained in sequence)."""
    import multiprocessing as mp

    lanes = _lanes(variants)
    threads = max(1, torch.get_num_threads() // len(lanes))
    log_file = str(ctx.run.path / "log.txt")
    spawn = mp.get_context("spawn")
    procs = []
    t0 = time.perf_counter()
    for lane in lanes:
        p = spawn.Process(target=_lane_main, args=(ctx.cfg.to_dict(), str(ctx.run.path), lane, threads, split,
                                                     log_file), name=f"defense-lane-{'+'.join(lane)}",
                          daemon=True)  # stopped with this process (Ctrl-C); a re-run resumes
        p.start()
        procs.append((lane, p))
    ctx.log.info("defense: training %s in %d processes at %d thread(s) each",
                 " | ".join("+".join(lane) for lane in lanes), len(lanes), threads)
    from multiprocessing.connection import wait

    secs, failed = {}, []
    running = {p.sentinel: (lane, p) for lane, p in procs}
    while running:  # in finishing order, so each lane's time is its own
        for sentinel in wait(list(running)):
            lane, p = running.pop(sentinel)
            p.join()
            for v in lane:
                secs[v] = {"train_s": round(time.perf_counter() - t0, 1), "lane": "+".join(lane)}
            if p.exitcode != 0:
                failed.append(f"{'+'.join(lane)} (exit code {p.exitcode})")
    if failed:
        raise RuntimeError(f"defense: training lane(s) failed: {', '.join(failed)}; see {log_file}. "
                           "Re-running resumes from the last finished epoch; --set defense.parallel_variants=false "
                           "trains in this process")
    return secs


def run_stage(ctx) -> None:
    cfg, log = ctx.cfg, ctx.log
    dcfg = cfg.defense
    cat = ctx.catalogue
    rec = ctx.recommender("VBPR")
    split = split_items(cat, ctx.generator("defense-split"), dcfg.train_item_frac, dcfg.val_item_frac)
    log.info(f"defense: item split train {len(split['train'])} / val {len(split['val'])} / test {len(split['test'])}")
    summary, histories = {}, {}
    variants = _variants(dcfg)
    check_memory(ctx, len(split["train"]))
    lane_s = train_in_lanes(ctx, variants, split) if _use_lanes(ctx, variants, len(split["train"])) else {}
    # the checks attack the recommender (input gradients through the backbone) and purify
    bs = min(memory.loop_batch(cfg, ctx.device, cfg.eval.batch_size, grad=True, denoiser=False),
             memory.loop_batch(cfg, ctx.device, cfg.eval.batch_size, grad=False))
    for variant in variants:
        vcfg = variant_config(dcfg, variant)
        name = checkpoint_name(variant)
        t0 = time.perf_counter()
        defense, hist = _train_variant(ctx, variant, split, log, cfg.run.progress)
        train_s = time.perf_counter() - t0
        info = {"train_s": round(train_s, 1), "epochs": len(hist),
                "train_cpu_s": round(sum(h.get("cpu_s", 0.0) for h in hist), 1)}
        info.update(lane_s.get(variant, {}))  # trained in a lane: its time replaces the loading time
        if defense.detector is not None:
            thr, val = calibrate_threshold(defense, rec, cat, split["val"], vcfg,
                                           ctx.generator(f"defense-val-{variant}"), ctx.device,
                                           batch_size=bs)
            defense.threshold = thr
            info["val_detection"] = {k: val[k] for k in ("accuracy", "auc", "tpr", "fpr", "threshold")}
            log.info(f"defense[{variant}]: threshold {thr:.4f} ({vcfg.threshold_rule}) "
                     f"on {len(split['val'])} val items: "
                     + " ".join(f"{k}={val[k]:.3f}" for k in ("accuracy", "auc", "tpr", "fpr")))
        check = restoration_check(defense, rec, cat, split["val"], vcfg, ctx.generator(f"defense-check-{variant}"),
                                  ctx.device, batch_size=bs)
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
