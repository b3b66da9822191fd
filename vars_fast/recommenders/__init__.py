"""Recommenders: VBPR, AMR, DVBPR (visual), BPR-MF and popularity (no images).

``build_recommender`` constructs an untrained model from the config; each class has
``fit(cat, cfg, generator, ...)``. Checkpoints hold ``{"name", "kwargs", "state_dict",
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
from vars_fast.recommenders.bpr import BPR
from vars_fast.recommenders.dvbpr import DVBPR
from vars_fast.recommenders.popularity import Pop
from vars_fast.recommenders.vbpr import VBPR

REGISTRY: dict[str, type[Recommender]] = {c.name: c for c in (VBPR, AMR, DVBPR, BPR, Pop)}

__all__ = ["Recommender", "VBPR", "AMR", "DVBPR", "BPR", "Pop", "REGISTRY", "bpr_loss", "encode_catalogue",
           "build_recommender", "save_recommender", "load_recommender"]


def build_recommender(name: str, n_users: int, n_items: int, cfg, backbone: Optional[nn.Module] = None,
                      seed: int = 0, feature_dim: Optional[int] = None) -> Recommender:
    """An untrained ``name`` model from a ``RecommenderConfig``; initialisation seeded by ``seed``.

    VBPR/AMR need the backbone (or ``feature_dim``) for the width of E.
    """
    if name not in REGISTRY:
        raise ValueError(f"recommender.models: unknown model {name!r} (choose from {', '.join(REGISTRY)})")
    with torch.random.fork_rng(devices=[]):  # deterministic init without touching the global stream
        torch.manual_seed(seed)
        if name in ("VBPR", "AMR"):
            fdim = feature_dim or getattr(backbone, "feature_dim", None)
            if fdim is None:
                raise ValueError(f"{name} needs a backbone (or feature_dim) to size E")
            kw = dict(k=cfg.k, visual_k=cfg.visual_k, tied=cfg.tied, biases=cfg.biases, reg=cfg.weight_decay,
                      reg_visual=cfg.reg_visual, init_std=cfg.init_std, feature_norm=cfg.feature_norm,
                      backbone=backbone)
            if name == "AMR":
                kw.update(amr_eps=cfg.amr_eps, amr_lambda=cfg.amr_lambda)
            return REGISTRY[name](n_users, n_items, fdim, **kw)
        if name == "DVBPR":
            if cfg.dvbpr_cnn == "backbone" and backbone is None:
                raise ValueError("DVBPR with recommender.dvbpr_cnn=backbone needs the backbone to fine-tune")
            return DVBPR(n_users, n_items, k=cfg.k, width=cfg.dvbpr_cnn_width, reg=cfg.weight_decay,
                         init_std=cfg.init_std, input_size=cfg.dvbpr_input_size, cnn=cfg.dvbpr_cnn,
                         train_blocks=cfg.dvbpr_train_blocks, backbone=backbone)
        if name == "BPR":
            return BPR(n_users, n_items, k=cfg.k, biases=cfg.biases, reg=cfg.weight_decay, init_std=cfg.init_std)
        return Pop(n_users, n_items)


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
    if name not in REGISTRY:
        raise ValueError(f"{path}: unknown recommender {name!r} in checkpoint")
    kw = dict(ck["kwargs"])
    n_users, n_items = kw.pop("n_users"), kw.pop("n_items")
    if name in ("VBPR", "AMR"):
        fdim = kw.pop("feature_dim")
        if backbone is not None and getattr(backbone, "feature_dim", fdim) != fdim:
            raise ValueError(f"{path}: {name} was trained on {fdim}-d features but the backbone "
                             f"{getattr(backbone, 'name', '?')} gives {backbone.feature_dim}-d (check backbone.name)")
        rec = REGISTRY[name](n_users, n_items, fdim, backbone=backbone, **kw)
    else:
        rec = REGISTRY[name](n_users, n_items, **kw)
    rec.load_state_dict(ck["state_dict"])
    rec.to(device)
    rec.set_item_visual(ck.get("item_visual"))
    return rec.eval().requires_grad_(False)
