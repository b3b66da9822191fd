"""The deployed defences: how a platform turns an uploaded image into the feature its
recommender ranks with. Each is a ``Deployment`` registered in ``registry.DEPLOYMENTS``; the
ranking section ranks every attacked catalogue through every registered deployment, and the
report's tables label them by ``label``.

A new defence is one registration::

    DEPLOYMENTS.register("blur", Deployment(label="BLUR", order=60,
                                            rank=lambda ev, rec, x, den, rnd: ev.rank(rec, blur(x))))

``rank(ev, rec, images, den, rnd)`` gets the uploaded images (uint8 [N,3,S,S]) and their
purification by the trained denoiser (``den`` = D(x), ``rnd`` = resize-pad(D(x)), float, from
``Evaluation.purify_all``, so that the deployments that share D run it once) and returns the
ranking metrics, plus any field its rows should carry (``flagged``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from vars_fast.registry import DEPLOYMENTS


@dataclass(frozen=True)
class Deployment:
    label: Optional[str]                   # the report's name (None: the undefended model)
    order: float                           # its place in the tables
    rank: Optional[Callable[..., dict]] = None  # None: its rows come from earlier stages (undefended)
    detector: bool = False                 # needs the trained detector and its threshold
    table_eps_only: bool = False           # ranked at eval.table_eps only (not along the eps curve)
    recovery_need: Optional[float] = None  # the share of the damage it must recover (report targets)
    clean_need: Optional[float] = None     # the share of the undefended clean HR@10 it must keep
    judged: bool = False                   # shown in the recovery-of-the-damage table
    # which output of ``Evaluation.purify_all`` it ranks: "den" (D(x)) or "rnd" (resize-pad(D(x)));
    # the sections that purify (oracle, ablation, targeted, transfer, adaptive) rank those
    view: Optional[str] = None


def label(name: str) -> str:
    """The report's name of deployment ``name`` (a name no longer registered keeps its own)."""
    return (DEPLOYMENTS[name].label or name) if name in DEPLOYMENTS else name


def ordered(**match: Any) -> list[str]:
    """Deployment names in table order whose attributes equal ``match`` (``detector=True``)."""
    items = sorted(DEPLOYMENTS.items(), key=lambda kv: kv[1].order)
    return [n for n, d in items if all(getattr(d, k) == v for k, v in match.items())]


def purifying() -> list[str]:
    """The deployments that rank an output of ``purify_all`` (``view``), in table order."""
    return [n for n in ordered() if DEPLOYMENTS[n].view]


def views(den, rnd) -> list[tuple[str, Any]]:
    """(deployment, images) for every purifying deployment: D(x) or its resize-pad."""
    out = {"den": den, "rnd": rnd}
    return [(n, out[DEPLOYMENTS[n].view]) for n in purifying()]


def _gated(ev, rec, images, den, rnd) -> dict:
    imgs, share = ev.gate(images, den)
    return {"flagged": share, **ev.rank(rec, imgs)}


DEPLOYMENTS.register("none", Deployment(label=None, order=0))
DEPLOYMENTS.register("denoise", Deployment(
    label="OURS", order=10, rank=lambda ev, rec, images, den, rnd: ev.rank(rec, den), recovery_need=0.70,
    clean_need=0.98, judged=True, view="den"))
DEPLOYMENTS.register("denoise+rand", Deployment(
    label="OURS-rand", order=20, rank=lambda ev, rec, images, den, rnd: ev.rank(rec, rnd), recovery_need=0.50,
    judged=True, view="rnd"))
# what a screening platform deploys: D(x) only where the detector flags x, x itself elsewhere;
# ``flagged`` is the share of the catalogue that was denoised
DEPLOYMENTS.register("detect+denoise", Deployment(
    label="OURS-gated", order=30, rank=_gated, detector=True, table_eps_only=True, clean_need=0.98, judged=True))
# the platform that rejects a flagged upload: the item keeps its clean feature
# (``eval.withhold_fallback``); ``flagged`` is the share withheld
DEPLOYMENTS.register("detect+withhold", Deployment(
    label="OURS-withhold", order=40, rank=lambda ev, rec, images, den, rnd: ev.rank_withheld(rec, images, den),
    detector=True, table_eps_only=True))
