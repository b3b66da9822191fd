"""The models a screening worker holds once: defence (denoiser + detector + threshold) and the
backbone that extracts the clean visual features of the denoised image.

One batch: uint8 [B,3,S,S] -> x in [0,1] -> x' = D(x) -> ``detector.distance(x, x')`` (both
views in one encoder pass) -> flagged = distance > threshold -> backbone features of x'. The
denoiser runs once per image (``Defense.detect`` would run it a second time for the features);
tests/test_screen.py checks the result equals ``Defense.detect`` to float tolerance.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from vars_fast.backbones import build_backbone
from vars_fast.config import BackboneConfig
from vars_fast.defense import load_defense
from vars_fast.defense.denoiser import GlobalBlock
from vars_fast.nn.fuse import folded_copy, polyphase_copy
from vars_fast.utils import get_device


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (``checkpoints/defense.pt``) or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "defense.pt", p / "defense.pt"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"--checkpoint {p}: no checkpoints/defense.pt in this run folder "
                                "(run the defense stage first)")
    if not p.is_file():
        raise FileNotFoundError(f"--checkpoint {p}: no such file")
    return p


class Screener:
    """Holds the models; ``__call__(uint8 [B,3,S,S])`` -> (distance [B] f32, flagged [B] bool,
    feature [B,F] f32, denoised uint8 [B,3,S,S] | None) as numpy arrays."""

    def __init__(self, defense: Any, backbone: torch.nn.Module, device: torch.device, amp: bool = False,
                 channels_last: Optional[bool] = None, compile: bool = False, keep_denoised: bool = False,
                 fold_bn: bool = True):
        """``channels_last`` None: on (NHWC convs are faster with oneDNN and cuDNN alike);
        ``fold_bn``: inference copies of the models (``_fold``): the eval BatchNorms of the
        detector encoder and the feature backbone folded into their convs
        (``nn.fuse.fold_batchnorm``), their separate "same" padding copies dropped
        (``nn.fuse.streamline``), on CPU the denoiser's output conv in space-to-depth form
        (``nn.fuse.PolyphaseConv2d``) and NHWC-ordered transformer tokens; the folded and
        polyphase copies are kept only where their outputs match the
        original model on a probe batch (rtol 1e-3)."""
        if getattr(defense, "detector", None) is None:
            raise ValueError("this defence checkpoint has no detector (the no-detector ablation): it cannot screen")
        self.defense, self.backbone, self.device = defense, backbone, device
        self.threshold = float(defense.threshold)
        self.image_size = int(defense.image_size)
        channels_last = True if channels_last is None else bool(channels_last)
        self.channels_last, self.keep_denoised = channels_last, keep_denoised
        # bf16 autocast only where it pays: CUDA with bf16 support (on CPU it is slower here)
        self.amp = bool(amp) and device.type == "cuda" and torch.cuda.is_bf16_supported()
        for m in (defense.denoiser, defense.detector, backbone):
            m.eval().requires_grad_(False)
        self.folded = self._fold() if fold_bn else {}
        for m in (defense.denoiser, defense.detector, self.backbone):
            if channels_last:
                m.to(memory_format=torch.channels_last)
        self._step = torch.compile(self._forward, dynamic=True) if compile else self._forward

    @torch.no_grad()
    def _fold(self) -> dict[str, int]:
        """Inference copies, each kept only where it matches the original on a probe batch:
        BN folded and "same" paddings streamlined in the detector and the backbone
        (``nn.fuse.folded_copy``); on CPU, the denoiser's few-channel output conv run in
        space-to-depth form (``nn.fuse.polyphase_copy``) and its transformer block's
        tokens taken in NHWC order (``GlobalBlock.nhwc_tokens``). Returns the rewrites per model."""
        g = torch.Generator().manual_seed(0)
        probe = torch.rand(4, 3, self.image_size, self.image_size, generator=g).to(self.device)
        folded = {}
        for name in ("detector", "backbone"):
            owner = self.defense if name == "detector" else self
            run = (lambda m: m.embed(probe)) if name == "detector" else (lambda m: m.features(probe))
            model, n = folded_copy(getattr(owner, name), run, inplace_relu6=True, strided=True)
            if n:
                setattr(owner, name, model)
                folded[name] = n
        if self.device.type == "cpu":  # a oneDNN rewrite: on CUDA the model stays as is
            model, n = polyphase_copy(self.defense.denoiser, lambda m: m.residual(probe))
            model = model if n else copy.deepcopy(self.defense.denoiser)
            for m in model.modules():
                if isinstance(m, GlobalBlock):
                    m.nhwc_tokens = True  # used when the input is NHWC (``channels_last``)
                    n += 1
            if n:
                self.defense.denoiser = model
                folded["denoiser"] = n
        return folded

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | torch.device = "cpu", **kw) -> "Screener":
        device = get_device(device) if isinstance(device, str) else device
        ckpt = resolve_checkpoint(checkpoint)
        defense = load_defense(ckpt, device)
        bcfg = defense.backbone  # cfg.backbone as saved by the defense stage
        if not bcfg:
            raise KeyError(f"checkpoint {ckpt}: no 'backbone' config stored; cannot rebuild the feature extractor")
        known = {f for f in BackboneConfig.__dataclass_fields__}
        backbone = build_backbone(BackboneConfig(**{k: v for k, v in bcfg.items() if k in known})).to(device)
        return cls(defense, backbone, device, **kw)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xd = self.defense.purify(x)
        dist = self.defense.detector.distance(x, xd)
        feat = self.backbone.features(xd)
        return dist, feat, xd

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        x = torch.as_tensor(images)
        if x.shape[0] == 0:
            return (np.zeros(0, np.float32), np.zeros(0, bool), np.zeros((0, 0), np.float32), None)
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            dist, feat, xd = self._step(x)
        dist = dist.float()
        flagged = dist > self.threshold
        den = None
        if self.keep_denoised:
            den = (xd.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        return (dist.cpu().numpy().astype(np.float32), flagged.cpu().numpy(),
                feat.float().cpu().numpy().astype(np.float32), den)
