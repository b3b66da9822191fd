"""Recommenders: VBPR, AMR, DVBPR (visual), BPR-MF and popularity (no images).

Each class registers itself in ``RECOMMENDERS`` (``recommender.models``) and knows how to
build itself from a ``RecommenderConfig`` (``from_config``); ``build_recommender`` seeds that,
and each class has ``fit(cat, cfg, generator, ...)``. Checkpoints hold ``{"name", "kwargs", "state_dict",
"item_visual"}`` only (tensors, numbers, strings), so they load with ``weights_only=True``;
the shared backbone is re-attached at load time, never stored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vars_fast.io import load_checkpoint, save_checkpoint
from vars_fast.recommenders.amr import AMR
from vars_fast.recommenders.base import Recommender, bpr_loss, encode_catalogue
from vars_fast.recommenders.bounded import BoundedAMR, BoundedVBPR
from vars_fast.recommenders.bpr import BPR
from vars_fast.recommenders.dvbpr import DVBPR
from vars_fast.recommenders.popularity import Pop
from vars_fast.recommenders.vbpr import VBPR
from vars_fast.registry import RECOMMENDERS

__all__ = ["Recommender", "VBPR", "BoundedVBPR", "AMR", "BoundedAMR", "DVBPR", "BPR", "Pop", "RECOMMENDERS", "bpr_loss", "encode_catalogue",
           "build_recommender", "save_recommender", "load_recommender"]


def build_recommender(name: str, n_users: int, n_items: int, cfg, backbone: Optional[nn.Module] = None,
                      seed: int = 0, feature_dim: Optional[int] = None) -> Recommender:
    """An untrained ``name`` model from a ``RecommenderConfig``; initialisation seeded by ``seed``.

    Models with ``uses_features`` (VBPR/AMR) need the backbone (or ``feature_dim``) for the
    width of E. An unknown ``name`` raises a ConfigError naming ``recommender.models``.
    """
    cls = RECOMMENDERS[name]
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the global stream
        torch.manual_seed(seed)
        return cls.from_config(n_users, n_items, cfg, backbone=backbone, feature_dim=feature_dim)


def save_recommender(rec: Recommender, path: str | Path, split_key: Optional[str] = None) -> None:
    """Atomic checkpoint of constructor kwargs + weights + cached clean item representation.

    ``split_key`` names the data split the model was trained on (``Catalogue.meta["split_key"]``)
    so that a checkpoint is never silently evaluated against another split."""
    save_checkpoint({
        "split_key": split_key,
        "name": rec.name,
        "kwargs": dict(rec.kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in rec.state_dict().items()},
        "item_visual": None if rec.item_visual is None else rec.item_visual.detach().cpu(),
    }, path)


def load_recommender(path: str | Path, backbone: Optional[nn.Module] = None,
                     device: torch.device | str = "cpu", split_key: Optional[str] = None) -> Recommender:
    """Rebuild a saved model (eval mode, parameters frozen: it is evaluated or attacked, not trained).

    With ``split_key``, refuse a checkpoint trained on another data split."""
    ck = load_checkpoint(path)
    saved = ck.get("split_key")
    if split_key is not None and saved is not None and saved != split_key:
        raise ValueError(f"{path} was trained on data split {saved} but the current data is split {split_key}: "
                         "re-run the 'recommender' stage (or use the run folder's own config)")
    name = ck.get("name")
    if name not in RECOMMENDERS:
        raise ValueError(f"{path}: unknown recommender {name!r} in checkpoint")
    cls = RECOMMENDERS[name]
    kw = dict(ck["kwargs"])
    n_users, n_items = kw.pop("n_users"), kw.pop("n_items")
    if cls.uses_features:
        fdim = kw.pop("feature_dim")
        if backbone is not None and getattr(backbone, "feature_dim", fdim) != fdim:
            raise ValueError(f"{path}: {name} was trained on {fdim}-d features but the backbone "
                             f"{getattr(backbone, 'name', '?')} gives {backbone.feature_dim}-d (check backbone.name)")
        rec = cls(n_users, n_items, fdim, backbone=backbone, **kw)
    else:
        rec = cls(n_users, n_items, **kw)
    rec.load_state_dict(ck["state_dict"])
    rec.to(device)
    rec.set_item_visual(ck.get("item_visual"))
    return rec.eval().requires_grad_(False)
