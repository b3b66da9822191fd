"""Does the detector generalise beyond what it trained on? The "seen / unseen" detection table
(evaluation section ``generalisation``; rows in ``detection`` carry ``"seen"``).

The paper trains its detector on FGSM at one eps and reports (Table 4) that its accuracy holds
at other eps. ``generalisation_rows`` measures that claim on the defence's held-out test items
(never trained on, threshold not chosen on them), each row against the same clean set:

* adversarial rows (``side: "adversarial"``), crafted per item against the recommender:
  FGSM at eps 4-64 and PGD (L-inf, the catalogue attack's per-item BPR objective); PGD-L2 on
  the same objective (``eps`` is the per-pixel RMS budget in /255, ``l2`` the radius in [0,1]
  units; ``attacks/pgd_l2.py``); a transfer attack, a feature-space PGD on a surrogate backbone
  the defence never saw (``attacks/surrogate.py``; ResNet18 by default);
* benign rows (``side: "benign"``), what must *not* be flagged: Gaussian noise (``eps`` =
  sigma in [0,1] units) and JPEG re-compression (``quality``) of the clean images.

``seen`` says whether that exact (attack, eps) is among the inputs the detector trains on:
every adversarial kind and eps of a detector-active epoch of ``defense/training.epoch_plan``
(the detector phase and phase 2, where the contrastive term is on), and, for Gaussian noise,
sigma up to ``defense.clean_noise_sigma`` (clean views carry that noise in training).

Every image is rounded to uint8 before it is judged (what a platform receives): the L-inf
attacks with ``quantize_within`` (the ball still holds exactly), the others by rounding.

Row metrics (``vars_fast.metrics.detection_metrics`` at the defence's threshold; "flagged" =
distance > threshold): adversarial rows give accuracy on the balanced set of n_clean clean +
n_adv attacked images, the ROC AUC, TPR and FPR (FPR is the clean set's, the same in every
row). Benign rows judge the benign images alone: ``flagged`` = ``fpr`` = the share flagged,
``accuracy`` = 1 - flagged, ``tpr`` = None, and ``auc`` = P(d_benign > d_clean), the detector's
separation of the benign images from the originals (0.5: it cannot tell them apart, the ideal).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from vars_fast.attacks.fgsm import FGSM
from vars_fast.attacks.pgd import PGD
from vars_fast.attacks.pgd_l2 import PGDL2, l2_radius
from vars_fast.attacks.surrogate import build_surrogate, transfer_attack
from vars_fast.attacks.untargeted import attack_items, sample_item_triples
from vars_fast.corruptions import gaussian_noise, jpeg
from vars_fast.defense.training import epoch_plan
from vars_fast.evaluate.section import Doc, Section, missing
from vars_fast.metrics import auc_score, detection_metrics
from vars_fast.registry import SECTIONS

NAME = "generalisation"  # the section: its registry name and the ``table`` of its rows

ROW_KEYS = ("detector", "attack", "eps", "seen", "side", "accuracy", "auc", "tpr", "fpr", "n_clean", "n_adv")


def seen_inputs(dcfg) -> set[tuple[str, float]]:
    """(attack, eps) pairs the detector trains on under ``dcfg`` (a DefenseConfig): the
    adversarial kinds and eps of every epoch of ``epoch_plan`` with the detector on."""
    return {(kind, float(e)) for ep in epoch_plan(dcfg) if ep["detector"]
            for kind in ep["kinds"] if kind != "clean" for e in ep["eps"]}


def _u8(x: Tensor) -> Tensor:
    return torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()


@torch.no_grad()
def _distances(defense, images: Tensor, batch_size: int, device) -> Tensor:
    """Detector distance of uint8 or float images [N,3,S,S] -> float [N] (CPU)."""
    out = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        out.append(defense.distance(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _metrics(d_clean: Tensor, d_x: Tensor, threshold: float, benign: bool) -> dict:
    if benign:
        flagged = float((d_x > threshold).float().mean()) if d_x.numel() else float("nan")
        return {"accuracy": 1.0 - flagged, "auc": auc_score(d_clean, d_x), "tpr": None, "fpr": flagged,
                "flagged": flagged, "n_clean": int(d_x.numel()), "n_adv": 0}
    m = detection_metrics(d_clean, d_x, threshold)
    return {k: float(m[k]) for k in ("accuracy", "auc", "tpr", "fpr")} | {
        "n_clean": int(d_clean.numel()), "n_adv": int(d_x.numel())}


def generalisation_rows(defense, rec, cat, items, generator: torch.Generator, dcfg, *,
                        fgsm_eps: Sequence[float] = (4, 8, 16, 32, 64), pgd_eps: Sequence[float] = (8, 16),
                        pgd_steps: int = 5, l2_rms: Sequence[float] = (4, 8), l2_steps: int = 10,
                        transfer_eps: Sequence[float] = (8, 16), transfer_steps: int = 10,
                        surrogate=None, surrogate_name: str = "resnet18", surrogate_weights: str = "none",
                        noise_sigmas: Sequence[float] = (0.05, 0.1), jpeg_qualities: Sequence[int] = (75, 50),
                        triples_per_item: int = 16, triple_roles: str = "bpr", batch_size: int = 64,
                        device: torch.device | str = "cpu", log=None) -> list[dict]:
    """The seen / unseen detection rows (module docstring) for ``defense`` on ``items``.

    defense: a ``vars_fast.defense.Defense`` with a detector and a finite threshold; rec: the
    recommender the item attacks target (VBPR); cat: the Catalogue; items: held-out item ids
    [n] (the defence split's "test"); generator: seeds the triples, random starts, the
    surrogate's random init and the noise, consumed in a fixed order; dcfg: the DefenseConfig
    the defence was trained with (it decides ``seen``). eps values are /255 (L-inf), l2_rms is
    the per-pixel RMS budget /255 of PGD-L2, noise sigmas are in [0,1] units. ``surrogate``: a
    Backbone to craft the transfer attack on; None builds ``surrogate_name`` with
    ``surrogate_weights`` ("none": random init, "pretrained": torchvision cache, or a path).
    Returns one dict per row with ``ROW_KEYS`` (+ ``flagged`` on benign rows, ``l2`` on PGD-L2
    rows, ``quality`` on JPEG rows, ``surrogate`` on transfer rows).
    """
    import math

    if defense.detector is None or not math.isfinite(float(defense.threshold)):
        raise ValueError("generalisation_rows: the defence has no detector or no calibrated threshold")
    device = torch.device(device)
    items = torch.as_tensor(items, dtype=torch.long).flatten().cpu()
    if items.numel() == 0:
        raise ValueError("generalisation_rows: no items to evaluate")
    thr = float(defense.threshold)
    seen = seen_inputs(dcfg)
    B = max(1, int(batch_size))
    clean = cat.images[items]
    d_clean = _distances(defense, clean, B, device)
    tr = sample_item_triples(cat, triples_per_item, generator, triple_roles)
    rows: list[dict] = []

    def craft(attack, eps255: float) -> Tensor:
        """uint8 images of ``items`` from ``attack(loss_fn, x, idx)`` through the catalogue loop
        (the per-item BPR objective on ``tr``; ``eps255`` bounds the uint8 rounding)."""
        return attack_items(rec, cat, items, attack, tr, eps255, device, B)

    def add(attack: str, eps, images: Tensor, benign: bool = False, seen_flag: Optional[bool] = None, **extra):
        d = _distances(defense, images, B, device)
        s = (attack, float(eps)) in seen if seen_flag is None else seen_flag
        row = {"detector": "ours", "attack": attack, "eps": eps, "seen": bool(s),
               "side": "benign" if benign else "adversarial", **_metrics(d_clean, d, thr, benign), **extra}
        rows.append(row)
        if log is not None:
            log.info("detection generalisation: %s %s seen=%s accuracy %.3f auc %.3f", attack,
                     f"eps={eps}" if eps is not None else extra, row["seen"], row["accuracy"], row["auc"])

    for e in fgsm_eps:
        add("fgsm", e, craft(lambda fn, x, _: FGSM(fn, e / 255.0)(x), e))
    for e in pgd_eps:
        add("pgd", e, craft(lambda fn, x, _: PGD(fn, e / 255.0, steps=pgd_steps, generator=generator)(x), e))
    S = tuple(cat.images.shape[1:])
    for r in l2_rms:
        rad = l2_radius(r, S)  # an L2 ball: the uint8 rounding only clamps to [0, 255]
        add("pgd-l2", r, craft(lambda fn, x, _: PGDL2(fn, rad, steps=l2_steps)(x), 255), l2=rad)

    if transfer_eps:
        if surrogate is None:
            with torch.random.fork_rng(devices=[]):  # a seeded random init that leaves the global stream alone
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                surrogate = build_surrogate(surrogate_name, surrogate_weights, device)
        name = getattr(surrogate, "name", type(surrogate).__name__)
        for e in transfer_eps:
            # the surrogate's own feature objective: the loop's recommender loss goes unused
            adv = craft(lambda fn, x, _: transfer_attack(surrogate, x, e / 255.0, transfer_steps, generator), e)
            add("transfer", e, adv, seen_flag=False, surrogate=name)

    x_clean = clean.float() / 255.0
    for sigma in noise_sigmas:
        seen_noise = 0 < float(sigma) <= float(getattr(dcfg, "clean_noise_sigma", 0.0))
        add("gaussian", sigma, _u8(gaussian_noise(x_clean, sigma, generator)), benign=True, seen_flag=seen_noise)
    for q in jpeg_qualities:
        add("jpeg", None, _u8(jpeg(x_clean, q)), benign=True, seen_flag=False, quality=int(q))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The seen / unseen table as Markdown: one line per row, adversarial rows first."""
    def f(v, nd=3):
        return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    def budget(r):
        if r["attack"] == "jpeg":
            return f"quality {r.get('quality')}"
        if r["attack"] == "gaussian":
            return f"σ = {r['eps']:g}"
        if r["attack"] == "pgd-l2":
            return f"RMS {r['eps']:g}/255 (‖δ‖₂ ≤ {r['l2']:.2f})"
        return f"{r['eps']:g}/255" + (f" ({r['surrogate']})" if r.get("surrogate") else "")

    lines = ["| attack | budget | seen | accuracy | AUC | TPR | FPR (flagged) | n_clean | n_adv |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("side") == "benign"):
        lines.append(f"| {r['attack']} | {budget(r)} | {'seen' if r['seen'] else 'unseen'} | {f(r['accuracy'])} | "
                     f"{f(r['auc'])} | {f(r['tpr'])} | {f(r['fpr'])} | {r['n_clean']} | {r['n_adv']} |")
    return "\n".join(lines)


def generalisation(ev) -> None:
    """The evaluation section: the seen / unseen rows for VBPR on the defence's test items."""
    cfg = ev.cfg
    if not cfg.eval.generalisation or not ev.has_detector or "VBPR" not in ev.models:
        return
    rows = generalisation_rows(
        ev.defense, ev.ctx.recommender("VBPR"), ev.cat, ev.test_items, ev.ctx.generator("evaluate:generalisation"),
        cfg.defense, fgsm_eps=cfg.eval.generalisation_fgsm_eps, pgd_eps=[cfg.eval.table_eps],
        pgd_steps=cfg.attack.pgd_steps, noise_sigmas=cfg.eval.noise_sigmas,
        triples_per_item=cfg.attack.triples_per_item, triple_roles=cfg.attack.triple_roles,
        batch_size=ev.bs, device=ev.dev, log=ev.log)
    ev.run.add_rows("detection", [{**r, "model": "VBPR"} for r in rows], table=NAME)


def report(doc: Doc) -> list[str]:
    rows = doc.rows("detection", "generalisation")
    return ["## Does the detector generalise? Seen / unseen attacks (VBPR, held-out test items)", "",
            "`seen`: that attack and eps are among the detector's training inputs (`defense.detector_eps`, "
            "`defense.train_eps`); benign rows (Gaussian noise, JPEG) give the share flagged. Train the "
            "detector on one eps with `--config configs/detector_single_eps.yaml`.", "",
            markdown_table(rows) if rows else missing("eval.generalisation off or not run"), ""]


SECTIONS.register(NAME, Section(order=40, run=generalisation, report=report))
