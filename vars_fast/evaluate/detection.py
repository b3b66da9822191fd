"""Table 4: FGSM at each ``eval.detect_eps`` on the defence's held-out test items
(``Defense.split["test"]``), ours (distance vs the stored threshold) vs ADDITION, and
Gaussian-noise rows (``attack: "gaussian", eps: sigma``) with the share judged clean."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vars_fast.attacks.untargeted import attack_catalogue
from vars_fast.defense.addition import fit_in_run
from vars_fast.evaluate.common import Evaluation, det_json, to_float
from vars_fast.evaluate.section import Doc, Section, find, missing, table
from vars_fast.metrics import detection_metrics
from vars_fast.registry import DEFENSES, SECTIONS

NAME = "detection"  # the section: its registry name and the ``table`` of its rows


def fgsm_items(ev: Evaluation, rec, items: Tensor, eps) -> Tensor:
    """FGSM images uint8 for ``items``: the attack stage's catalogue when saved, else attacked
    now by the catalogue attack on these items alone."""
    adv = ev.load_attack(rec.name, "fgsm", eps)
    if adv is not None:
        return adv[items]

    return attack_catalogue(rec, ev.cat, "fgsm", eps, ev.cfg.attack, ev.ctx.generator(f"evaluate:fgsm:{eps}"),
                            ev.dev, progress=False, batch_size=ev.bs, fast=False, items=items)


def detection(ev: Evaluation) -> None:
    """Ours vs ADDITION per eps, and the Gaussian-noise check."""
    if ev.defense.detector is None or not math.isfinite(ev.defense.threshold):
        ev.log.warning("evaluate: the defence has no detector/threshold: detection rows skipped")
        return
    if "VBPR" not in ev.models:
        ev.log.warning("evaluate: no VBPR recommender: detection rows skipped")
        return
    ecfg = ev.cfg.eval
    rec, items, thr = ev.ctx.recommender("VBPR"), ev.test_items, float(ev.defense.threshold)
    clean = ev.cat.images[items]
    d_clean = ev.d_clean()
    # ADDITION, trained on the defence's training items, its threshold chosen on the validation
    # items by the rule ours uses; its rows at the paper's 20% criterion carry variant "criterion"
    add, _ = fit_in_run(ev.ctx, "VBPR")
    add_thr = {None: float(add.threshold), "criterion": float(add.change)}
    c_clean = add.score_change_all(clean, items, ev.bs)
    ev.arrays.update(d_clean=d_clean.numpy(), threshold=np.array(thr), addition_clean=c_clean.numpy())
    rows = []
    for eps in ecfg.detect_eps:
        adv = fgsm_items(ev, rec, items, eps)
        d_adv = ev.distances(adv)
        c_adv = add.score_change_all(adv, items, ev.bs)
        ev.arrays[f"d_fgsm_{eps}"] = d_adv.numpy()
        ev.arrays[f"addition_fgsm_{eps}"] = c_adv.numpy()
        base = {"attack": "fgsm", "eps": eps, "n_clean": int(d_clean.numel()), "n_adv": int(d_adv.numel())}
        rows.append({"detector": "ours", **base, **det_json(detection_metrics(d_clean, d_adv, thr))})
        for variant, t in add_thr.items():
            rows.append({"detector": "addition", **base, **({"variant": variant} if variant else {}),
                         **det_json(detection_metrics(c_clean, c_adv, t))})
    x = to_float(clean, "cpu")
    g = ev.ctx.generator("evaluate:gaussian")
    for sigma in ecfg.noise_sigmas:
        noisy = (x + float(sigma) * torch.randn(x.shape, generator=g)).clamp(0, 1)
        d = ev.distances(noisy)
        c = add.score_change_all(noisy, items, ev.bs)
        ev.arrays[f"d_gauss_{sigma}"] = d.numpy()
        judged = [("ours", None, d, thr)] + [("addition", v, c, t) for v, t in add_thr.items()]
        for det, variant, score, t in judged:
            share = float((score <= t).float().mean())
            rows.append({"detector": det, "attack": "gaussian", "eps": sigma, "clean_rate": share,
                         "accuracy": share, "fpr": 1.0 - share, "threshold": t, "n_clean": int(score.numel()),
                         **({"variant": variant} if variant else {})})
    ev.run.add_rows("detection", rows, table=NAME)


def _rule_label(name: str, variant, rule: str) -> str:
    """A detector's row label: its registered label and how its threshold was chosen."""
    label = DEFENSES.meta(name).get("label", name)
    if variant is None:
        return f"{label} ({rule} threshold on validation items)"
    return f"{label} ({DEFENSES.meta(name).get('thresholds', {}).get(variant, variant)})"


def detection_table(D: list[dict], rule: str = "validation") -> str:
    """Table 4: accuracy per eps, the baselines then ours (FGSM on held-out items), one row per
    detector and threshold rule: ``rule`` (defense.threshold_rule) on the validation items, and
    each registered alternative (ADDITION's 20% criterion, rows with ``variant: criterion``)."""
    D = [r for r in D if r.get("attack") == "fgsm"]
    if not D:
        return missing("no detection rows")
    eps = sorted({float(r["eps"]) for r in D})
    names = sorted(DEFENSES.names(), key=lambda n: not DEFENSES.meta(n).get("baseline", False))
    rows, detail = [], []
    for name in names:
        variants = [None] + sorted({r["variant"] for r in D if r["detector"] == name and r.get("variant")})
        for v in variants:
            mine = [r for r in D if r["detector"] == name and r.get("variant") == v]
            if not mine:
                continue
            label = _rule_label(name, v, rule)
            rows.append([label] + [(find(mine, eps=e, variant=v) or {}).get("accuracy") for e in eps])
            detail += [[label, r["eps"], r.get("accuracy"), r.get("auc"), r.get("tpr"), r.get("fpr"), r.get("threshold"),
                        r.get("n_clean"), r.get("n_adv")] for r in sorted(mine, key=lambda r: float(r["eps"]))]
    return (table(["detector (threshold)"] + [f"eps={e:g}" for e in eps], rows) + "\n\nDetails:\n\n" +
            table(["detector (threshold)", "eps", "accuracy", "AUC", "TPR", "FPR", "threshold", "n clean", "n adv"],
                  detail))


def gaussian_table(D: list[dict]) -> str:
    G = [r for r in D if r.get("attack") == "gaussian"]
    if not G:
        return missing("no Gaussian-noise rows")
    sig = sorted({float(r["eps"]) for r in G})
    rows = [[d] + [(find(G, detector=d, attack="gaussian", eps=s) or {}).get("clean_rate") for s in sig]
            for d in sorted({r["detector"] for r in G})]
    return table(["detector (share judged clean)"] + [f"sigma={s:g}" for s in sig], rows)


def roc(d_clean: np.ndarray, d_adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR, TPR over all thresholds (adversarial = score above the threshold)."""
    t = np.unique(np.concatenate([d_clean, d_adv]))[::-1]
    fpr = np.concatenate([[0.0], [(d_clean >= x).mean() for x in t]])
    tpr = np.concatenate([[0.0], [(d_adv >= x).mean() for x in t]])
    return fpr, tpr


def _fgsm_distances(a: dict) -> list[tuple[float, np.ndarray]]:
    return sorted((float(k[len("d_fgsm_"):]), a[k]) for k in a if k.startswith("d_fgsm_")) if "d_clean" in a else []


def fig8(a: dict, plt):
    """Histograms of the detector distances, clean vs FGSM, one panel per eps, with the threshold."""
    adv, thr = _fgsm_distances(a), a.get("threshold")
    if not adv:
        return None
    dc = a["d_clean"]
    fig, axes = plt.subplots(1, len(adv), figsize=(3.2 * len(adv), 3), squeeze=False)
    for ax, (e, d) in zip(axes[0], adv):
        bins = np.linspace(min(dc.min(), d.min()), max(dc.max(), d.max()), 40)
        ax.hist(dc, bins=bins, alpha=0.6, label="clean")
        ax.hist(d, bins=bins, alpha=0.6, label="FGSM")
        if thr is not None:
            ax.axvline(float(thr), color="k", ls="--", label="threshold")
        ax.set_title(f"eps={e:g}")
        ax.set_xlabel("distance")
        ax.legend(fontsize=7)
    return fig


def fig9(a: dict, plt):
    """ROC per eps with the stored threshold's point."""
    adv, thr = _fgsm_distances(a), a.get("threshold")
    if not adv:
        return None
    dc = a["d_clean"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for e, d in adv:
        fpr, tpr = roc(dc, d)
        line, = ax.plot(fpr, tpr, label=f"eps={e:g}")
        if thr is not None:
            ax.plot([(dc > float(thr)).mean()], [(d > float(thr)).mean()], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("FPR")
    ax.set_ylabel("TPR")
    ax.set_title("ROC (dot: the stored threshold)")
    ax.legend(fontsize=7)
    return fig


def fig10(a: dict, plt):
    """Confusion matrix at the stored threshold, all FGSM eps pooled."""
    adv, thr = _fgsm_distances(a), a.get("threshold")
    if not adv or thr is None:
        return None
    dc, da, thr = a["d_clean"], np.concatenate([d for _, d in adv]), float(thr)
    cm = np.array([[(dc <= thr).sum(), (dc > thr).sum()], [(da <= thr).sum(), (da > thr).sum()]])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center")
    ax.set_xticks([0, 1], ["pred clean", "pred adv"])
    ax.set_yticks([0, 1], ["clean", "adversarial"])
    ax.set_title("confusion (FGSM, all eps)")
    return fig


def report(doc: Doc) -> list[str]:
    D, a = doc.rows("detection", "detection"), doc.arrays
    rule = doc.meta.get("config", {}).get("defense", {}).get("threshold_rule", "validation")
    return ["## Table 4: detection accuracy (FGSM, held-out test items)", "", detection_table(D, rule), "",
            *doc.figure("fig8_distance_hist", "Fig. 8: detector distances, clean vs adversarial",
                        lambda plt: fig8(a, plt)),
            *doc.figure("fig9_roc", "Fig. 9: ROC with the chosen threshold", lambda plt: fig9(a, plt)),
            *doc.figure("fig10_confusion", "Fig. 10: confusion matrix", lambda plt: fig10(a, plt)),
            "### Gaussian noise must be judged clean", "", gaussian_table(D), ""]


SECTIONS.register(NAME, Section(order=30, run=detection, report=report))
