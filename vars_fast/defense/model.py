"""``Defense``: a denoiser D (Sec. 3.3) and a contrastive detector (Sec. 3.4) packed together
to purify, score and flag images, and its checkpoint.

Checkpoint format (``save_defense``; loads with ``weights_only=True``)::

    {"format": "vars_fast.defense/1",
     "denoiser": {"kwargs": {...}, "state_dict": {...}},
     "detector": {"kwargs": {...}, "state_dict": {...}} | None,   # None: the no-detector ablation
     "threshold": float, "rand_min_frac": float, "image_size": int,
     "backbone": {...},            # cfg.backbone as a dict: screening rebuilds the extractor from it
     "extra": {"split": {"train": [...], "val": [...], "test": [...]}, ...}}
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from vars_fast.defense.denoiser import Denoiser
from vars_fast.defense.detector import Detector
from vars_fast.io import load_checkpoint, pack_module, save_checkpoint
from vars_fast.ops import random_resize_pad
from vars_fast.registry import DEFENSES

FORMAT = "vars_fast.defense/1"


@DEFENSES.register("ours", label="OURS")
class Defense:
    """Denoiser + detector + the decision threshold. Modules are kept in eval mode.

    ``purify`` and ``distance`` do not disable autograd (the adaptive attacker differentiates
    through them); wrap calls in ``torch.no_grad()`` when only values are needed.
    """

    def __init__(self, denoiser: Denoiser, detector: Optional[Detector] = None, threshold: float = float("nan"),
                 rand_min_frac: float = 0.85, image_size: int = 64, backbone: Optional[dict] = None,
                 extra: Optional[dict] = None):
        self.denoiser = denoiser.eval()
        self.detector = detector.eval() if detector is not None else None
        self.threshold = float(threshold)
        self.rand_min_frac = float(rand_min_frac)
        self.image_size = int(image_size)
        self.backbone = dict(backbone or {})
        self.extra = dict(extra or {})

    @property
    def split(self) -> dict:
        return self.extra.get("split", {})

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "Defense":
        self.denoiser.to(device)
        if self.detector is not None:
            self.detector.to(device)
        return self

    def rand_min_size(self, size: Optional[int] = None) -> int:
        """Smallest side r' of OURS-rand's resize for an r x r image: ceil(rand_min_frac * r),
        kept in [1, r-1] (the same rule as ``vars_fast.attacks.adaptive.rand_min_size``)."""
        r = int(size or self.image_size)
        return max(1, min(r - 1, int(math.ceil(self.rand_min_frac * r))))

    def purify(self, x: Tensor, rand: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """x [B,3,S,S] in [0,1] -> D(x), then (``rand``) resized to a random r' in
        [rand_min_size, S) and zero-padded at a random offset back to S x S (OURS-rand)."""
        out = self.denoiser(x)
        if rand:
            S = x.shape[-1]
            out = random_resize_pad(out, out_size=S, min_size=self.rand_min_size(S), generator=generator)[0]
        return out

    def _need_detector(self) -> Detector:
        if self.detector is None:
            raise RuntimeError("this defence has no detector (the 'no-detector' ablation): "
                               "distance/detect are undefined")
        return self.detector

    def distance(self, x: Tensor) -> Tensor:
        """||z(x) - z(D(x))||_2 on unit-norm embeddings, [B]."""
        return self._need_detector().distance(x, self.denoiser(x))

    def detect(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(distance [B], flagged bool [B]): flagged = distance > threshold."""
        d = self.distance(x)
        return d, d > self.threshold


def save_defense(defense: Defense, path: str | Path, extra: Optional[dict] = None) -> None:
    """Atomic save (``vars_fast.io.save_checkpoint``) of everything ``load_defense`` needs.

    ``extra`` (merged over ``defense.extra``) must hold only tensors, numbers, strings, lists
    and dicts; it carries the item split (``extra["split"]``) and training history."""
    obj = {
        "format": FORMAT,
        "denoiser": pack_module(defense.denoiser),
        "detector": pack_module(defense.detector) if defense.detector is not None else None,
        "threshold": float(defense.threshold),
        "rand_min_frac": float(defense.rand_min_frac),
        "image_size": int(defense.image_size),
        "backbone": dict(defense.backbone),
        "extra": {**defense.extra, **(extra or {})},
    }
    save_checkpoint(obj, path)


def build_detector(kwargs: dict) -> Detector:
    """A detector from stored kwargs, without loading pretrained weights (a state dict follows)."""
    kw = dict(kwargs)
    kw["backbone"] = {**kw["backbone"], "weights": "none"}
    det = Detector(**kw)
    det._kwargs["backbone"] = dict(kwargs["backbone"])  # keep the original config in the record
    return det


def load_defense(path: str | Path, device: torch.device | str = "cpu") -> Defense:
    """Rebuild a ``Defense`` saved by ``save_defense`` (weights_only load), on ``device``."""
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vars_fast defence checkpoint (format {FORMAT!r} expected)")
    den = Denoiser(**ck["denoiser"]["kwargs"])
    den.load_state_dict(ck["denoiser"]["state_dict"])
    det = None
    if ck.get("detector") is not None:
        det = build_detector(ck["detector"]["kwargs"])
        det.load_state_dict(ck["detector"]["state_dict"])
    return Defense(den, det, threshold=ck["threshold"], rand_min_frac=ck["rand_min_frac"],
                   image_size=ck["image_size"], backbone=ck.get("backbone"), extra=ck.get("extra")).to(device)


__all__ = ["Defense", "Denoiser", "Detector", "save_defense", "load_defense", "build_detector"]
