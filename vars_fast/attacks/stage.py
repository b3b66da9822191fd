"""The "attack" stage: attacked catalogues, their ranking rows, the targeted attacks, a figure.

For each model in ``attack.models`` (trained by the recommender stage), each method in
``attack.untargeted`` and each eps in ``attack.eps`` (all of them for ``eval.curve_models``,
the table eps for the others unless ``attack.all_models_all_eps``; see ``eps_for``): attack the whole catalogue
(``catalogue.attack_catalogue``), save it as uint8 ``run.attack_file(model, method, eps)``,
re-encode it with the model and add a ranking row ``{"model", "defense": "none", "attack",
"eps", "objective": "train", HR/NDCG@N}``. With ``"eval"`` in ``attack.objective``, the
models in ``eval.oracle_models`` are also attacked with the evaluation-aware objective
(``oracle.py``) on a seeded subset of users: per-user images saved as
``run.attack_file(model, f"{method}-eval", eps)`` ([U, 1 + C, 3, S, S] uint8), the users in
``attacks/oracle_users.json``, and rows with ``"objective": "eval"`` (clean included, on the
same users). Then the targeted attacks on VBPR (``targeted.py``): targeted rows, the
targets' adversarial images and ``attacks/targets.json`` for the evaluation stage.
Existing attack files are reused, so a killed stage resumes where it stopped.
"""
from __future__ import annotations

import io
import time

import numpy as np
import torch

from vars_fast.attacks.oracle import attack_eval_lists, encode_lists, list_ranking, oracle_users
from vars_fast.attacks.taamr import popular_class
from vars_fast.attacks.targeted import choose_hook, choose_targets, target_scores, targeted_attack, targeted_metrics
from vars_fast.attacks.untargeted import amp_available, attack_catalogue
from vars_fast.io import atomic_write_bytes, atomic_write_json
from vars_fast.metrics import ranking_metrics
from vars_fast.recommenders import encode_catalogue
from vars_fast.registry import ATTACK_LOSSES, TARGETED


def _eps_key(eps):
    e = float(eps)
    return int(e) if e.is_integer() else e


def save_npy(path, arr: torch.Tensor) -> None:
    buf = io.BytesIO()
    np.save(buf, arr.cpu().numpy())
    atomic_write_bytes(path, buf.getvalue())


def load_npy(path, shape) -> torch.Tensor | None:
    """The saved uint8 array, or None when it is absent or does not match ``shape`` (stale)."""
    if not path.is_file():
        return None
    try:
        a = np.load(path)
    except (OSError, ValueError):
        return None
    if a.dtype != np.uint8 or tuple(a.shape) != tuple(shape):
        return None
    return torch.from_numpy(a)


def _available(ctx, name: str) -> bool:
    if not ctx.run.checkpoint(f"recommender_{name}").is_file():
        ctx.log.warning(f"attack: no checkpoint for {name} ({ctx.run.checkpoint(f'recommender_{name}')}); skipped")
        return False
    return True


def eps_for(cfg, model: str) -> list:
    """The eps a model is attacked at: all of attack.eps for curve models (Fig. 6), else the
    table eps only, which is what the evaluation stage reads (``evaluate.eps_for``)."""
    eps = list(cfg.attack.eps)
    if cfg.attack.all_models_all_eps or model in cfg.eval.curve_models:
        return eps
    return [e for e in eps if float(e) == float(cfg.eval.table_eps)] or eps[:1]


def _encode(ctx, rec, images_u8):
    return encode_catalogue(ctx.encoder(rec.name), images_u8, ctx.cfg.attack.batch_size * 2, ctx.device,
                            progress=ctx.cfg.run.progress)


def run_stage(ctx) -> None:
    cfg, acfg, run = ctx.cfg, ctx.cfg.attack, ctx.run
    cat = ctx.catalogue
    amp = bool(cfg.run.amp) and amp_available(ctx.device)
    if cfg.run.amp and not amp:
        ctx.log.info("attack: run.amp set but this device has no native bf16; running fp32")
    topk = tuple(cfg.eval.topk)
    timing = dict(run.load_metrics().get("meta", {}).get("attack_seconds", {}))
    made: list[tuple[str, str, float]] = []
    for name in acfg.models:
        if not _available(ctx, name):
            continue
        rec = ctx.recommender(name)
        if "eval" in acfg.objective and name in cfg.eval.oracle_models:
            run_oracle(ctx, name, rec, topk, timing)
        if "train" not in acfg.objective:
            continue
        triples = ATTACK_LOSSES[acfg.loss].targets(rec, cat, acfg.triples_per_item,
                                                   ctx.generator(f"attack:{name}:triples"), acfg.triple_roles)
        clean = ranking_metrics(rec, cat, topk=topk)
        rows = []
        for method in acfg.untargeted:
            for eps in eps_for(cfg, name):
                path = run.attack_file(name, method, eps)
                adv = load_npy(path, cat.images.shape)
                if adv is None:
                    t0 = time.perf_counter()
                    adv = attack_catalogue(rec, cat, method, eps, acfg, ctx.generator(f"attack:{name}:{method}:{eps}"),
                                           ctx.device, cfg.run.progress, compile=cfg.run.compile, amp=amp,
                                           channels_last=cfg.run.channels_last, triples=triples)
                    dt = time.perf_counter() - t0
                    timing[f"{name}/{method}/{_eps_key(eps)}"] = round(dt, 2)
                    save_npy(path, adv)
                    ctx.log.info(f"attack {name} {method} eps={eps}: {dt:.1f}s ({cat.n_items / dt:.0f} items/s)")
                with torch.no_grad():
                    m = ranking_metrics(rec, cat, visual=_encode(ctx, rec, adv), topk=topk)
                rows.append({"model": name, "defense": "none", "attack": method, "eps": _eps_key(eps),
                             "objective": "train", **m})
                made.append((name, method, eps))
                ctx.log.info(f"attack {name} {method} eps={eps}: HR@10 {clean.get('HR@10', float('nan')):.4f} -> "
                             f"{m.get('HR@10', float('nan')):.4f}")
        run.add_rows("ranking", rows, table="ranking")
        run.update_meta(attack_seconds=timing)
    if acfg.targets and acfg.target_eps and "VBPR" in cfg.recommender.models and _available(ctx, "VBPR"):
        run_targeted(ctx, amp, topk, timing)
    if cfg.eval.figures and made:
        try:
            attack_figure(ctx, made)
        except Exception as e:  # noqa: BLE001 - a figure must not lose the stage's results
            ctx.log.warning(f"attack: figure failed ({type(e).__name__}: {e})")


def oracle_eps(cfg, model: str) -> list:
    """The eps of the evaluation-aware attack: ``eval.oracle_eps`` (default: the table eps)."""
    return list(cfg.eval.oracle_eps) or [cfg.eval.table_eps]


def load_oracle_users(run) -> torch.Tensor | None:
    """The users the evaluation-aware attack ran on (None before the attack stage ran it)."""
    import json

    path = run.path / "attacks" / "oracle_users.json"
    if not path.is_file():
        return None
    return torch.tensor(json.loads(path.read_text())["users"], dtype=torch.long)


def oracle_users_for(ctx) -> torch.Tensor:
    """The seeded user subset of the "eval" objective, saved once so that every stage and a
    resumed run use the same users."""
    users = load_oracle_users(ctx.run)
    if users is None:
        users = oracle_users(ctx.catalogue, ctx.cfg.eval.oracle_users, ctx.generator("attack:oracle-users"))
        atomic_write_json(ctx.run.path / "attacks" / "oracle_users.json", {"users": users.tolist()})
    return users


def run_oracle(ctx, name: str, rec, topk, timing: dict) -> None:
    """The "eval" objective on one model: per-user images and their ranking rows."""
    cfg, acfg, run, cat = ctx.cfg, ctx.cfg.attack, ctx.run, ctx.catalogue
    users = oracle_users_for(ctx)
    shape = (users.numel(), 1 + cat.negatives.shape[1]) + tuple(cat.images.shape[1:])
    base = {"model": name, "defense": "none", "objective": "eval", "n_users": int(users.numel())}
    rows = [{**base, "attack": "clean", "eps": 0, **list_ranking(rec, cat, users, topk=topk)}]
    encoder = ctx.encoder(rec.name)
    for method in acfg.untargeted:
        for eps in oracle_eps(cfg, name):
            path = run.attack_file(name, f"{method}-eval", eps)
            adv = load_npy(path, shape)
            if adv is None:
                t0 = time.perf_counter()
                adv = attack_eval_lists(rec, cat, users, method, eps, acfg,
                                        ctx.generator(f"attack:{name}:{method}-eval:{eps}"), ctx.device,
                                        cfg.run.progress)
                dt = time.perf_counter() - t0
                timing[f"{name}/{method}-eval/{_eps_key(eps)}"] = round(dt, 2)
                save_npy(path, adv)
                ctx.log.info(f"attack {name} {method}-eval eps={eps}: {dt:.1f}s ({adv.shape[0] * adv.shape[1] / dt:.0f} images/s)")
            feats = encode_lists(encoder.encode, adv, acfg.batch_size * 2, ctx.device)
            m = list_ranking(rec, cat, users, feats, topk)
            rows.append({**base, "attack": method, "eps": _eps_key(eps), **m})
            ctx.log.info(f"attack {name} {method}-eval eps={eps} ({users.numel()} users): HR@10 "
                         f"{rows[0].get('HR@10', float('nan')):.4f} -> {m.get('HR@10', float('nan')):.4f}")
    run.add_rows("ranking", rows, table="oracle")
    run.update_meta(attack_seconds=timing)


def run_targeted(ctx, amp: bool, topk, timing: dict) -> None:
    """AIP-INSA / AIP-EXPA / TAaMR on VBPR's cold targets; targeted rows + targets.json."""
    acfg, run, cat, dev = ctx.cfg.attack, ctx.run, ctx.catalogue, ctx.device
    rec = ctx.recommender("VBPR")
    targets = choose_targets(cat, acfg.n_targets, ctx.generator("attack:targets"))
    hook = choose_hook(cat)
    target_class = None
    if any(TARGETED[t].through == "backbone" for t in acfg.targets):  # TAaMR: a class to push towards
        target_class, _ = popular_class(ctx.backbone, cat, acfg.batch_size * 2, dev)
    users = torch.arange(cat.n_users)
    if 0 < acfg.insa_users < cat.n_users:  # unbiased sample of the mean score (linear in users)
        users = torch.randperm(cat.n_users, generator=ctx.generator("attack:insa-users"))[: acfg.insa_users].sort().values
    with torch.no_grad():
        clean_vis = rec.item_visual[targets.to(dev)]
        hook_feature = rec.item_visual[hook]
        before = target_scores(rec, targets, clean_vis, cat.n_users)
        clean = targeted_metrics(rec, cat, targets, before, before, topk)
    atomic_write_json(run.path / "attacks" / "targets.json", {
        "model": "VBPR", "targets": targets.tolist(), "target_item_ids": [cat.item_ids[t] for t in targets.tolist()],
        "hook": hook, "hook_item_id": cat.item_ids[hook], "target_class": target_class,
        "clean": {k: v for k, v in clean.items() if k.startswith("HR@")}})
    shape = (targets.numel(),) + tuple(cat.images.shape[1:])
    rows = []
    warm = bool(acfg.target_warm_start)
    for name in acfg.targets:
        prev = None  # the result at the next smaller eps: the warm start of this one
        for eps in sorted(acfg.target_eps, key=float) if warm else acfg.target_eps:
            path = run.attack_file("VBPR", name, eps)
            adv = load_npy(path, shape)
            if adv is None:
                t0 = time.perf_counter()
                adv = targeted_attack(name, rec, ctx.backbone, cat, targets, eps, acfg,
                                      ctx.generator(f"attack:{name}:{eps}"), dev, users=users,
                                      hook_feature=hook_feature, target_class=target_class, amp=amp,
                                      init=prev if warm and TARGETED[name].iterative else None)
                timing[f"VBPR/{name}/{_eps_key(eps)}"] = round(time.perf_counter() - t0, 2)
                save_npy(path, adv)
            with torch.no_grad():
                after = target_scores(rec, targets, _encode(ctx, rec, adv).to(dev), cat.n_users)
                m = targeted_metrics(rec, cat, targets, before, after, topk)
            prev = adv
            rows.append({"attack": name, "eps": _eps_key(eps), "defense": "none", "model": "VBPR", **m})
            ctx.log.info(f"targeted {name} eps={eps}: prediction shift {m['prediction_shift']:.4f}, "
                         f"HR@10 {clean.get('HR@10', float('nan')):.4f} -> {m.get('HR@10', float('nan')):.4f}")
    run.add_rows("targeted", rows, table="targeted")
    run.update_meta(attack_seconds=timing)


def attack_figure(ctx, made, n_items: int = 4) -> None:
    """figures/attack_examples.png: clean / adversarial / |delta| x 10 for a few items."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cat = ctx.catalogue
    name, method, eps = next((m for m in made if m[1] == "pgd" and float(m[2]) == 8.0), made[-1])
    adv = load_npy(ctx.run.attack_file(name, method, eps), cat.images.shape)
    ok = [i for i, s in enumerate(cat.status) if s == "ok"] or list(range(cat.n_items))
    pick = torch.tensor(ok)[torch.randperm(len(ok), generator=ctx.generator("attack:figure"))[:n_items]]
    clean, a = cat.images[pick].float() / 255, adv[pick].float() / 255
    panels = [("clean", clean), (f"{method} eps={eps}", a), ("|delta| x 10", ((a - clean).abs() * 10).clamp(0, 1))]
    fig, axes = plt.subplots(3, len(pick), figsize=(2 * len(pick), 6.3), squeeze=False)
    for r, (title, imgs) in enumerate(panels):
        for c in range(len(pick)):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title)
    fig.suptitle(f"{name}: item images under attack")
    fig.tight_layout()
    fig.savefig(ctx.run.figure("attack_examples"), dpi=100)
    plt.close(fig)
