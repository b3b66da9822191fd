"""The attack suite against the undefended models (beyond the paper; #22): the yardstick a
defence's number must be measured with, and the checks that the yardstick is not broken.

At each ``eval.suite.eps``, every member attacks every item of ``eval.suite.models`` (the
``train`` objective: one upload per item, crafted from its training targets):

* ``pgd5``: the attack stage's PGD catalogue (``attack.pgd_steps`` steps), when it ran at that eps;
* ``apgd``: APGD (Croce & Hein 2020) with ``eval.suite.restarts`` random restarts of
  ``eval.suite.apgd_steps`` steps, once per ``attack.loss`` of ``eval.suite.losses`` (the BPR
  loss; the ranking margin against the 10th-best competitor);
* ``square``: the Square attack (gradient-free) on the yardstick loss, ``square_queries``
  queries, on a seeded subset of ``square_items`` items (the others keep their clean image);
* ``transfer``: the PGD catalogue crafted against another image model (DVBPR's for VBPR),
  ranked by this one: an attacker without this model's gradients;
* ``noise``: uniform noise in the same ball, not an attack: what a random perturbation costs.

The ``suite`` row is the worst result across the suite: the lowest HR@10 of the members and of
their per-item combination, in which every item keeps the member image whose yardstick loss
(``eval.suite.yardstick``) is largest, the choice an attacker who can try them all makes
(``worst`` names which). Rows go to ``robustness`` (``defense: "none"``, ``certified: false``, the strength
and budget of each member); each APGD run's loss against the iteration goes to
``meta.suite.traces`` (the report draws it: a suite whose loss still climbs is too short).
The report checks what a reviewer checks first: HR@10 falls with eps, reaches popularity at
64/255, noise costs almost nothing, the suite is at least as strong as PGD-5, and neither
Square nor transfer beats the white-box attack (if they do, gradients are masked).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from vars_fast.attacks.apgd import APGD
from vars_fast.attacks.base import quantize_within
from vars_fast.attacks.square import Square
from vars_fast.attacks.untargeted import attack_items, item_loss_fn
from vars_fast.evaluate.common import Evaluation, chunks
from vars_fast.evaluate.ranking import floor_line, image_blind_floor
from vars_fast.evaluate.section import Doc, Section, find, missing, table
from vars_fast.registry import ATTACK_LOSSES, RECOMMENDERS, SECTIONS
from vars_fast.utils import to_float

NAME = "suite"
NOISE_BUDGET = 0.02  # HR@10 that uniform noise in the ball may cost (the sanity bound)


def _targets(ev: Evaluation, rec, loss: str):
    return ATTACK_LOSSES[loss].targets(rec, ev.cat, ev.cfg.attack.triples_per_item,
                                       ev.ctx.generator(f"suite:targets:{loss}"), ev.cfg.attack.triple_roles)


@torch.no_grad()
def item_losses(ev: Evaluation, rec, images: torch.Tensor, targets, loss: str) -> torch.Tensor:
    """Each item's attacker loss ``loss`` of its image in ``images`` (uint8 [N,3,S,S]), [N]."""
    out = torch.empty(ev.cat.n_items)
    fn_loss = ATTACK_LOSSES[loss].item_loss
    for s, e in chunks(ev.cat.n_items, ev.bs):
        idx = torch.arange(s, e)
        d = lambda t: t[idx].to(ev.dev)  # noqa: E731
        fn = item_loss_fn(rec, idx.to(ev.dev), d(targets.users), d(targets.others), d(targets.sign), loss=fn_loss)
        out[s:e] = fn(to_float(images[s:e], ev.dev)).float().cpu()
    return out


class _Traces:
    """The batch-weighted mean of an optimiser's per-iteration loss over the batches it ran."""

    def __init__(self):
        self.total, self.n = None, 0

    def add(self, trace: torch.Tensor, batch: int) -> None:
        t = trace.float().mean(0) * batch  # [steps + 1]: the mean over restarts
        self.total = t if self.total is None else self.total + t
        self.n += batch

    def curve(self) -> list[float]:
        return [] if self.total is None else [round(float(v), 5) for v in self.total / max(self.n, 1)]


def _apgd(ev: Evaluation, rec, eps255: float, loss: str, traces: _Traces) -> torch.Tensor:
    s = ev.cfg.eval.suite
    gen = ev.ctx.generator(f"suite:apgd:{rec.name}:{loss}:{eps255}")

    def attack(fn, x, idx):
        a = APGD(fn, eps255 / 255.0, steps=s.apgd_steps, n_restarts=s.restarts, generator=gen)
        out = a(x)
        traces.add(a.trace, x.shape[0])
        return out

    return attack_items(rec, ev.cat, torch.arange(ev.cat.n_items), attack, _targets(ev, rec, loss), eps255, ev.dev,
                        ev.bs, loss=ATTACK_LOSSES[loss].item_loss, channels_last=True,
                        desc=f"suite apgd-{loss} eps={eps255:g}", progress=ev.cfg.run.progress)


def _square(ev: Evaluation, rec, eps255: float, items: torch.Tensor) -> torch.Tensor:
    s = ev.cfg.eval.suite
    gen = ev.ctx.generator(f"suite:square:{rec.name}:{eps255}")

    def attack(fn, x, idx):
        return Square(fn, eps255 / 255.0, n_queries=s.square_queries, generator=gen)(x)

    out = ev.cat.images.clone()
    out[items] = attack_items(rec, ev.cat, items, attack, _targets(ev, rec, s.yardstick), eps255, ev.dev, ev.bs,
                              loss=ATTACK_LOSSES[s.yardstick].item_loss, desc=f"suite square eps={eps255:g}",
                              progress=ev.cfg.run.progress)
    return out


def _noise(ev: Evaluation, eps255: float) -> torch.Tensor:
    g = ev.ctx.generator(f"suite:noise:{eps255}")
    x = ev.cat.images.float() / 255.0
    u = (2 * torch.rand(x.shape, generator=g) - 1) * (eps255 / 255.0)
    return quantize_within((x + u).clamp(0, 1), ev.cat.images, eps255)


def _transfer_source(ev: Evaluation, model: str, eps255: float) -> Optional[str]:
    """Another image model whose PGD catalogue at this eps exists (an undefended surrogate)."""
    for m in ev.models:
        cls = RECOMMENDERS[m] if m in RECOMMENDERS else None
        if m != model and cls is not None and cls.uses_images and cls.base is None \
                and ev.run.attack_file(m, "pgd", eps255).is_file():
            return m
    return None


def _members(ev: Evaluation, rec, eps255: float, traces: dict) -> dict[str, tuple[torch.Tensor, dict]]:
    """{member: (uint8 catalogue, fields of its row)} at one eps."""
    s, model = ev.cfg.eval.suite, rec.name
    out = {}
    if ev.run.attack_file(model, "pgd", eps255).is_file():
        out["pgd5"] = (ev.load_attack(model, "pgd", eps255), {"steps": int(ev.cfg.attack.pgd_steps)})
    for loss in s.losses:
        tr = traces.setdefault(f"{model}/apgd-{loss}/{eps255:g}", _Traces())
        out[f"apgd-{loss}"] = (_apgd(ev, rec, eps255, loss, tr), {"loss": loss, "steps": s.apgd_steps,
                                                                 "restarts": s.restarts})
    n_sq = min(int(s.square_items) or ev.cat.n_items, ev.cat.n_items)
    if s.square_queries > 0 and n_sq > 0:
        items = torch.randperm(ev.cat.n_items, generator=ev.ctx.generator("suite:square-items"))[:n_sq].sort().values
        out["square"] = (_square(ev, rec, eps255, items), {"queries": s.square_queries, "n_items": n_sq,
                                                          "loss": s.yardstick, "_items": items})
    src = _transfer_source(ev, model, eps255)
    if src is not None:
        out["transfer"] = (ev.load_attack(src, "pgd", eps255), {"surrogate": src})
    return out


def _worst_case(ev: Evaluation, rec, members: dict) -> tuple[torch.Tensor, dict]:
    """Each item's member image with the largest yardstick loss; ``(catalogue, {member: items won})``."""
    s = ev.cfg.eval.suite
    targets = _targets(ev, rec, s.yardstick)
    names = list(members)
    losses = torch.stack([item_losses(ev, rec, members[n][0], targets, s.yardstick) for n in names])
    if "square" in members:  # items Square did not attack carry their clean image: not a candidate
        outside = torch.ones(ev.cat.n_items, dtype=torch.bool)
        outside[members["square"][1]["_items"]] = False
        losses[names.index("square"), outside] = -float("inf")
    best = losses.argmax(0)
    out = torch.stack([members[n][0] for n in names])[best, torch.arange(ev.cat.n_items)]
    return out, {n: int((best == i).sum()) for i, n in enumerate(names)}


def suite(ev: Evaluation) -> None:
    s = ev.cfg.eval.suite
    if not s.enabled:
        return
    traces: dict[str, _Traces] = {}
    # every model of eval.suite.models the run has trained (a bounded model need not be in
    # attack.models: the suite is its attacker)
    for model in [m for m in s.models if ev.run.checkpoint(f"recommender_{m}").is_file()]:
        rec = ev.ctx.encoder(model)
        # a model that is itself the defence (the bounded VBPR) labels its rows so
        label = getattr(RECOMMENDERS[model], "robustness_label", "none")
        base = {"model": model, "defense": label, "certified": False, "objective": "train", "strength": s.strength}
        rows = [{**base, "attack": "clean", "eps": 0, **_hr(ev, rec, ev.cat.images)}]
        for eps255 in s.eps:
            members = _members(ev, rec, float(eps255), traces)
            for name, (imgs, fields) in members.items():
                extra = {k: v for k, v in fields.items() if not k.startswith("_")}
                row = {**base, "attack": name.split("-")[0], "eps": eps255, **extra, **_hr(ev, rec, imgs)}
                white = members.get(f"apgd-{s.yardstick}")
                if name == "square" and white is not None:  # white-box on the same items: the masking check
                    wb, items = ev.cat.images.clone(), fields["_items"]
                    wb[items] = white[0][items]
                    row["white_box_same_items_HR@10"] = _hr(ev, rec, wb)["HR@10"]
                rows.append(row)
            worst, won = _worst_case(ev, rec, members)
            combined = _hr(ev, rec, worst)
            # the suite's number is its worst result: the per-item combination or a member alone
            # (the yardstick loss does not rank a user's list, so the combination can lose to one)
            here = [r for r in rows if r["eps"] == eps255 and r["attack"] != "clean"] + [
                {"attack": "combined", **combined}]
            low = min(here, key=lambda r: r["HR@10"])
            rows.append({**base, "attack": "suite", "eps": eps255, "members": sorted(members), "won": won,
                         "combined_HR@10": combined["HR@10"], "worst": _label(low),
                         "HR@10": low["HR@10"], "NDCG@10": low["NDCG@10"]})
            rows.append({**base, "attack": "noise", "eps": eps255, **_hr(ev, rec, _noise(ev, float(eps255)))})
            ev.log.info("suite %s eps=%s: HR@10 %s", model, eps255,
                        {r["attack"] + (f"-{r['loss']}" if r.get("loss") else ""): round(r["HR@10"], 4)
                         for r in rows if r["eps"] == eps255})
        ev.run.add_rows("robustness", rows, table=NAME)
    old = ev.run.load_metrics().get("meta", {}).get("suite", {}).get("traces", {})  # other models' runs stay
    ev.run.update_meta(suite={"traces": {**old, **{k: t.curve() for k, t in traces.items()}}})


def _hr(ev: Evaluation, rec, images: torch.Tensor) -> dict:
    m = ev.rank(rec, images)
    return {"HR@10": m["HR@10"], "NDCG@10": m["NDCG@10"]}


# ------------------------------------------------------------------ report
def _label(r: dict) -> str:
    return r["attack"] + (f"-{r['loss']}" if r.get("loss") and r["attack"] == "apgd" else "")


def suite_table(rows: list[dict], model: str) -> str:
    R = [r for r in rows if r["model"] == model and not r.get("certified")]
    eps = sorted({float(r["eps"]) for r in R if r["attack"] != "clean"})
    cols = list(dict.fromkeys(_label(r) for r in R if r["attack"] not in ("clean", "suite")))
    clean = (find(R, attack="clean") or {}).get("HR@10")
    body = [[f"{e:g}", clean] + [next((r["HR@10"] for r in R if float(r["eps"]) == e and _label(r) == c), None) for c in cols]
            + [(find([r for r in R if float(r["eps"]) == e], attack="suite") or {}).get("HR@10")] for e in eps]
    return table(["eps", "clean"] + cols + ["suite (worst per item)"], body)


def sanity(rows: list[dict], model: str, popularity: Optional[float]) -> list[str]:
    """The checks a reviewer runs before trusting a robustness number, each "ok" or "FAILED".
    On an undefended model the damage must grow with eps down to popularity; a defended one
    (the bounded VBPR) must instead never fall below its own certificate."""
    R = [r for r in rows if r["model"] == model and not r.get("certified")]
    undefended = all(r.get("defense", "none") == "none" for r in R)
    cert = next((r["HR@10"] for r in rows if r["model"] == model and r.get("certified")), None)
    at = lambda a, e: next((r for r in R if _label(r) == a and float(r["eps"]) == e), None)  # noqa: E731
    suite = sorted((float(r["eps"]), r["HR@10"]) for r in R if r["attack"] == "suite")
    clean = (find(R, attack="clean") or {}).get("HR@10")
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'ok' if ok else '**FAILED**'}: {text}")

    if undefended:
        check(all(b[1] <= a[1] + 1e-9 for a, b in zip(suite, suite[1:])), "the suite's HR@10 falls as eps grows: "
              + ", ".join(f"{e:g}: {h:.4f}" for e, h in suite))
    for e, h in suite:
        if cert is not None:
            check(h >= cert - 1e-9, f"eps {e:g}: the suite ({h:.4f}) stays above the certificate ({cert:.4f})")
        p = at("pgd5", e)
        if p is not None:
            check(h <= p["HR@10"] + 1e-9, f"eps {e:g}: the suite ({h:.4f}) is at least as strong as PGD-5 "
                                          f"({p['HR@10']:.4f})")
        n = at("noise", e)
        if n is not None and clean is not None and e <= 8:
            check(clean - n["HR@10"] <= NOISE_BUDGET, f"eps {e:g}: uniform noise costs {clean - n['HR@10']:.4f} "
                                                      f"(at most {NOISE_BUDGET})")
        sq, apgd = at("square", e), [r for r in R if r["attack"] == "apgd" and float(r["eps"]) == e]
        if sq is not None and sq.get("white_box_same_items_HR@10") is not None:
            wb = sq["white_box_same_items_HR@10"]
            check(sq["HR@10"] >= wb - 1e-9, f"eps {e:g}: Square ({sq['HR@10']:.4f}) does not beat the white-box "
                                            f"attack on the same items ({wb:.4f})")
        tr = at("transfer", e)
        if tr is not None and apgd:
            wb = min(r["HR@10"] for r in apgd)
            check(tr["HR@10"] >= wb - 1e-9, f"eps {e:g}: transfer from {tr.get('surrogate')} ({tr['HR@10']:.4f}) "
                                            f"does not beat the white-box APGD ({wb:.4f})")
    if undefended and popularity is not None and suite and suite[-1][0] >= 64:
        check(suite[-1][1] <= popularity + 1e-9, f"eps {suite[-1][0]:g}: the suite ({suite[-1][1]:.4f}) reaches "
                                                 f"the popularity floor ({popularity:.4f})")
    return out


def fig_traces(traces: dict, plt):
    """APGD's best loss against the iteration (mean over items and restarts), one line per run."""
    if not traces:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, curve in sorted(traces.items()):
        if curve:
            ax.plot(np.arange(len(curve)), curve, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("best attacker loss (mean over items)")
    ax.set_title("APGD in the attack suite: the loss should flatten")
    ax.legend(fontsize=6)
    return fig


def certified_table(rows: list[dict], floor: Optional[dict]) -> str:
    """The bounded models' certificates: HR@10 whatever every image becomes, beside clean."""
    C = [r for r in rows if r.get("certified")]
    body = []
    for r in C:
        clean = next((c["HR@10"] for c in rows if c["model"] == r["model"] and c["attack"] == "clean"
                      and not c.get("certified")), None)
        body.append([r["model"], r.get("cap"), clean, r["HR@10"],
                     None if floor is None else ("above" if r["HR@10"] > floor["HR@10"] else "below")])
    head = ["model", "cap", "HR@10 clean", "certified HR@10 (any image change)",
            "vs " + ("the image-blind floor" if floor is None else f"{floor['model']} clean {floor['HR@10']:.4f}")]
    return table(head, body)


def report(doc: Doc) -> list[str]:
    rows = doc.rows("robustness", NAME)
    if not rows:
        return ["## The attack suite (undefended models)", "", missing("eval.suite off or not run"), ""]
    ranking = doc.rows("ranking", "ranking")
    pop = next((r["HR@10"] for r in ranking if r["model"] == "Pop" and r["attack"] == "clean"
                and r["defense"] == "none"), None)
    strength = rows[0].get("strength", "?")
    out = ["## The attack suite (undefended models)", "",
           f"Strength: **{strength}** (`eval.suite`; `--preset full` runs APGD 100 steps x 3 restarts and Square "
           "1000 queries on every item). HR@10, `train` objective; `suite` is the worst of the members and of "
           "their per-item combination (each item keeps the member image with the largest attacker loss; "
           "`vars_fast/evaluate/suite.py`).", ""]
    for model in dict.fromkeys(r["model"] for r in rows if not r.get("certified") and r["attack"] != "clean"):
        out += [f"### {model}", "", suite_table(rows, model), "", floor_line(ranking), "",
                *sanity(rows, model, pop), ""]
    if any(r.get("certified") for r in rows):
        out += ["### Certified: bounded visual influence", "",
                "No image, however it is changed, moves a bounded model's score by more than 2 x its capped "
                "visual weight (`recommenders/bounded.py`): the test item at its worst against every candidate "
                "at its best, user by user.", "", certified_table(rows, image_blind_floor(ranking)), ""]
    out += doc.figure("fig_suite_traces", "APGD loss against the iteration",
                      lambda plt: fig_traces(doc.meta.get("suite", {}).get("traces", {}), plt))
    return out


SECTIONS.register(NAME, Section(order=72, run=suite, report=report))
