"""Tables 2/3, image fidelity and Fig. 6/7: the clean and the attacked catalogues through every
deployed defence (``evaluate/deployments.py``), re-encoded and ranked.

The attacked catalogues are the attack stage's (attacked against the *undefended* model, as
in the paper). ``denoise`` = D(x), ``denoise+rand`` = D(x) then a seeded random resize-pad;
the detector-gated deployments (``detect+denoise``, ``detect+withhold``) are ranked at
``eval.table_eps`` only, their rows carrying ``flagged``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from vars_fast.evaluate import deployments
from vars_fast.evaluate.common import Evaluation
from vars_fast.evaluate.section import METRICS, Doc, Section, find, missing, table
from vars_fast.metrics import SSIM_WINDOW, fidelity_rows, psnr_per_image, ssim_per_image
from vars_fast.registry import DEPLOYMENTS, RECOMMENDERS, SECTIONS

NAME = "ranking"  # the section: its registry name and the ``table`` of its rows


def _deployed_rows(ev: Evaluation, rec, base: dict, images: Tensor, den: Tensor, rnd: Tensor,
                   table_eps: bool) -> list[dict]:
    """One row per registered deployment for the uploaded ``images`` (purified ``den``, ``rnd``)."""
    rows = []
    for name in deployments.ordered():
        dep = DEPLOYMENTS[name]
        if dep.rank is None or (dep.detector and not ev.has_detector) or (dep.table_eps_only and not table_eps):
            continue
        rows.append({**base, "defense": name, **dep.rank(ev, rec, images, den, rnd)})
    return rows


def ranking(ev: Evaluation) -> None:
    """The clean and every attacked catalogue through every deployed defence, per model of ``eval.models``."""
    den_c, rnd_c = ev.clean_purified()
    table_eps = float(ev.cfg.eval.table_eps)
    items = ev.test_items
    fidelity_sets = {}  # (attack, eps) -> (x_adv, D(x_adv)) of VBPR's test items
    for name in [m for m in ev.models if m in ev.cfg.eval.models]:
        rec = ev.ctx.recommender(name)
        rows = []
        if not ev.run.rows("ranking", model=name, defense="none", attack="clean", objective="train"):
            rows.append({"model": name, "defense": "none", "attack": "clean", "eps": 0,
                         **ev.rank(rec, ev.cat.images)})
        clean = {"model": name, "attack": "clean", "eps": 0}
        rows += _deployed_rows(ev, rec, clean, ev.cat.images, den_c, rnd_c, True)
        for attack in ev.cfg.attack.untargeted:
            for eps in ev.eps_for(name):
                adv = ev.load_attack(name, attack, eps)
                if adv is None:
                    continue
                den, rnd = ev.purify_all(adv, desc=f"purify {name} {attack} eps={eps}", tag=f"{name}:{attack}:{eps}")
                base = {"model": name, "attack": attack, "eps": eps}
                rows += _deployed_rows(ev, rec, base, adv, den, rnd, float(eps) == table_eps)
                if name == "VBPR":
                    fidelity_sets[(attack, eps)] = (adv[items], den[items])
                    if float(eps) == table_eps:
                        examples(ev, attack, adv, den, rnd)
        ev.run.add_rows("ranking", rows, table=NAME)
        ev.log.info("evaluate ranking %s: %d rows", name, len(rows))
    # image fidelity on the held-out test items: D(clean), x_adv and D(x_adv) against clean
    ev.run.add_rows("fidelity", fidelity_rows(ev.cat.images[items], den_c[items], fidelity_sets), table=NAME)


def examples(ev: Evaluation, attack: str, adv: Tensor, den: Tensor, rnd: Tensor) -> None:
    """Fig. 7 material: a few test items, clean / D(clean) / adv / D(adv) / D+rand(adv)."""
    idx = ev.test_items[:4]
    den_c, _ = ev.clean_purified()
    u8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    ev.arrays["ex_items"] = idx.numpy()
    ev.arrays["ex_clean"] = ev.cat.images[idx].numpy()
    ev.arrays["ex_clean_denoised"] = u8(den_c[idx])
    ev.arrays[f"ex_{attack}"] = adv[idx].numpy()
    ev.arrays[f"ex_{attack}_denoised"] = u8(den[idx])
    ev.arrays[f"ex_{attack}_rand"] = u8(rnd[idx])
    ev.arrays["ex_eps"] = np.array(float(ev.cfg.eval.table_eps))


# ------------------------------------------------------------------ report
def attacks_in(R: list[dict]) -> list[str]:
    """"clean", then the attacks that have rows, in the order the rows were written (the
    attack stage writes them in ``attack.untargeted`` order)."""
    return ["clean"] + [a for a in dict.fromkeys(r["attack"] for r in R) if a != "clean"]


def image_blind_floor(R: list[dict]) -> Optional[dict]:
    """The clean row of the best model that ignores the images (BPR, popularity, ...): a visual
    model, defended or not, is worth its images only above it."""
    blind = [r for r in R if r.get("attack") == "clean" and r.get("defense") == "none" and r.get("variant") is None
             and r.get("objective", "train") == "train" and r["model"] in RECOMMENDERS
             and not RECOMMENDERS[r["model"]].uses_images]
    return max(blind, key=lambda r: r.get("HR@10", 0.0), default=None)


def floor_line(R: list[dict]) -> str:
    f = image_blind_floor(R)
    return "" if f is None else (f"Ignore the images: {f['model']} scores HR@10 {f['HR@10']:.4f} clean, whatever "
                                 "the uploads; a visual defence is worth having only above that line.")


def ranking_table(R: list[dict], model: str, eps: float) -> str:
    """Tables 2/3: every attack x {model, the models fine-tuned from it (AMR), each deployed defence}.

    AMR is adversarially trained VBPR (``base = "VBPR"``), so its rows belong in VBPR's table
    only: every other model's table holds that model's rows and nothing else."""
    out = []
    companions = [n for n in RECOMMENDERS.names() if getattr(RECOMMENDERS[n], "base", None) == model]
    for attack in attacks_in(R):
        e = 0 if attack == "clean" else eps
        methods = [(model, model, "none"), *((c, c, "none") for c in companions)]
        methods += [(deployments.label(d), model, d) for d in deployments.ordered() if d != "none"]
        for label, mod, d in methods:
            r = find(R, model=mod, defense=d, attack=attack, eps=e)
            if r is not None:
                out.append([attack.upper() if attack != "clean" else "Clean", label] + [r.get(k) for k in METRICS])
    if not out:
        return missing(f"no ranking rows for {model}")
    floor = image_blind_floor(R)
    if floor is not None:  # the same under every attack: no image reaches it
        out.append(["any", f"{floor['model']} (ignores the images)"] + [floor.get(k) for k in METRICS])
    return table(["attack", "method"] + list(METRICS), out)


def fidelity_table(F: list[dict]) -> str:
    """PSNR / SSIM against the clean image: D(clean), and x_adv (the reference) and D(x_adv) per attack."""
    if not F:
        return missing("no fidelity rows")
    rows = [[r["model"], r["attack"].upper() if r["attack"] != "clean" else "clean", r["eps"],
             "D(x)" if r["images"] == "denoised" else "x (attacked)", r.get("psnr"), r.get("ssim"), r.get("n")]
            for r in sorted(F, key=lambda r: (r["model"], r["attack"] != "clean", r["attack"], float(r["eps"]),
                                              r["images"]))]
    return table(["model", "attack", "eps", "image", "PSNR (dB)", "SSIM", "n"], rows)


def curve_table(R: list[dict]) -> str:
    """HR@10 per eps (the numbers behind Fig. 6)."""
    R = [r for r in R if r.get("variant") is None]
    eps = sorted({float(r["eps"]) for r in R if r["attack"] != "clean"})
    keys = sorted({(r["model"], r["defense"]) for r in R})
    rows = []
    for attack in attacks_in(R)[1:]:
        for model, d in keys:
            c = find(R, model=model, defense=d, attack="clean", eps=0)
            vals = [(find(R, model=model, defense=d, attack=attack, eps=e) or {}).get("HR@10") for e in eps]
            if any(v is not None for v in vals):
                rows.append([attack.upper(), model, d, (c or {}).get("HR@10")] + vals)
    if not rows:
        return missing("no attacked ranking rows")
    return table(["attack", "model", "defense", "clean"] + [f"eps={e:g}" for e in eps], rows)


def fig6(R: list[dict], plt):
    """HR@10 vs eps, a line per model x defence, one panel per attack."""
    R = [r for r in R if r.get("variant") is None]
    attacks = attacks_in(R)[1:]
    if not attacks:
        return None
    fig, axes = plt.subplots(1, len(attacks), figsize=(5 * len(attacks), 4), sharey=True, squeeze=False)
    models = sorted({r["model"] for r in R})
    colour = {m: f"C{i}" for i, m in enumerate(models)}  # colour = model, line style = defence
    lines = (":", "-", "--", "-.", (0, (1, 3)), (0, (5, 1)))
    style = {d: lines[i % len(lines)] for i, d in enumerate(deployments.ordered())}
    for ax, attack in zip(axes[0], attacks):
        for model, d in sorted({(r["model"], r["defense"]) for r in R if r["attack"] == attack}):
            pts = sorted((float(r["eps"]), r["HR@10"]) for r in R
                         if r["model"] == model and r["defense"] == d and r["attack"] in (attack, "clean"))
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", color=colour[model], ls=style.get(d, "-."),
                        label=f"{model} {deployments.label(d) if d != 'none' else 'undefended'}")
        ax.set_title(f"{attack.upper()}: HR@10 vs eps")
        ax.set_xlabel("eps (/255)")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("HR@10")
    return fig


EXAMPLE_COLUMNS = (("ex_clean", "clean"), ("ex_clean_denoised", "D(clean)"), ("ex_fgsm", "FGSM"),
                   ("ex_fgsm_denoised", "D(FGSM)"), ("ex_pgd", "PGD"), ("ex_pgd_denoised", "D(PGD)"),
                   ("ex_pgd_rand", "D+rand(PGD)"))


def _quality(a: dict, k: str, n: int) -> list[str]:
    """PSNR / SSIM of example column ``k`` against the clean images, one label per image."""
    ref = a.get("ex_clean")
    if ref is None or k == "ex_clean" or a[k].shape != ref.shape:
        return [""] * n
    p = psnr_per_image(ref, a[k]).tolist()
    q = ssim_per_image(ref, a[k]).tolist() if min(ref.shape[-2:]) >= SSIM_WINDOW else [None] * n
    return [f"{pi:.1f} dB" + ("" if qi is None else f" / {qi:.3f}") for pi, qi in zip(p, q)]


def fig7(F: list[dict], a: dict, plt):
    """Denoised examples; under each image its PSNR / SSIM against the clean image, and in the
    title the catalogue means from the fidelity rows when there."""
    cols = [(k, t) for k, t in EXAMPLE_COLUMNS if k in a]
    if not cols:
        return None
    n = a[cols[0][0]].shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.75 * n), squeeze=False)
    for j, (k, title) in enumerate(cols):
        quality = _quality(a, k, n)
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(np.transpose(a[k][i], (1, 2, 0)))
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            ax.set_xlabel(quality[i], fontsize=6)
        axes[0, j].set_title(title, fontsize=8)
    ex_eps = float(a.get("ex_eps", np.nan))
    title = f"eps = {ex_eps:g}/255; under each image: PSNR / SSIM against the clean image"
    F = [r for r in F if r.get("model", "VBPR") == "VBPR"]
    means = []
    for attack, e, images, label in (("clean", 0, "denoised", "D(clean)"), ("fgsm", ex_eps, "denoised", "D(FGSM)"),
                                     ("pgd", ex_eps, "attacked", "PGD"), ("pgd", ex_eps, "denoised", "D(PGD)")):
        r = find(F, attack=attack, eps=e, images=images)
        if r is not None and r.get("psnr") is not None:
            means.append(f"{label} {r['psnr']:.1f} dB / {r.get('ssim', float('nan')):.3f}")
    if means:
        title += "\nmean over the test items: " + ", ".join(means)
    fig.suptitle(title, fontsize=8)
    return fig


def report(doc: Doc) -> list[str]:
    R, F, eps = doc.rows("ranking", "ranking"), doc.rows("fidelity"), doc.eps
    # one table per image model that is not fine-tuned from another (AMR joins VBPR's table)
    tabled = [n for n in RECOMMENDERS.names() if RECOMMENDERS[n].uses_images and RECOMMENDERS[n].base is None]
    # the paper's models first (Tables 2, 3), then the robust variants (bounded VBPR), unnumbered
    tabled.sort(key=lambda n: hasattr(RECOMMENDERS[n], "robustness_label"))
    models = [m for m in tabled if any(r["model"] == m for r in R)] or tabled[:1]
    out = []
    for n, model in enumerate(models):
        number = f"Table {2 + n}: r" if not hasattr(RECOMMENDERS[model], "robustness_label") else "R"
        out += [f"## {number}ecommendation under attack ({model}, eps = {eps:g})", "",
                ranking_table(R, model, eps), ""]
    out += ["## Image fidelity (held-out test items, against the clean image)", "", fidelity_table(F), "",
            *doc.figure("fig7_denoised_examples", "Fig. 7: denoised examples", lambda plt: fig7(F, doc.arrays, plt)),
            "## HR@10 versus eps (Fig. 6)", "", curve_table(R), "",
            *doc.figure("fig6_hr_vs_eps", "Fig. 6: HR@10 vs eps", lambda plt: fig6(R, plt))]
    return out


SECTIONS.register(NAME, Section(order=10, run=ranking, report=report))
