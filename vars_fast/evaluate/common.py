"""What every evaluation section shares: the catalogue, the inference copy of the defence,
the held-out test items, purification, gating, withholding, encoding, ranking and the saved arrays."""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from vars_fast.evaluate.section import ARRAYS
from vars_fast.memory_budget import loop_batch
from vars_fast.metrics import ranking_metrics
from vars_fast.nn.fuse import folded_copy
from vars_fast.ops import random_resize_pad
from vars_fast.utils import progress, to_float

# detect+withhold: what a flagged item keeps (Evaluation.withhold)
WITHHOLD_FALLBACKS = ("clean", "mean")
__all__ = ["ARRAYS", "WITHHOLD_FALLBACKS", "Evaluation", "chunks", "det_json", "to_float"]


def chunks(n: int, bs: int):
    for s in range(0, n, bs):
        yield s, min(s + bs, n)


def det_json(m: dict) -> dict:
    """Detection metrics as plain JSON values (the confusion matrix as nested lists)."""
    out = {}
    for k, v in m.items():
        if isinstance(v, (Tensor, np.ndarray)):
            v = v.tolist()
        out[k] = float(v) if isinstance(v, (float, int, np.floating)) and k != "confusion" else v
    return out


class Evaluation:
    """Holds what the sections share (catalogue, defence, the clean purification, arrays)."""
    def __init__(self, ctx):
        self.ctx, self.cfg, self.run, self.dev, self.log = ctx, ctx.cfg, ctx.run, ctx.device, ctx.log
        self.cat = ctx.catalogue
        self.defense = self.fast_defense(ctx.defense())
        self.topk = tuple(int(k) for k in self.cfg.eval.topk)
        # purification / encoding / distance chunks: eval.batch_size, lowered to what the
        # device's memory holds (large images through a wide denoiser; vars_fast/memory_budget.py)
        self.bs = loop_batch(self.cfg, self.dev, int(self.cfg.eval.batch_size), grad=False)
        self.arrays: dict[str, np.ndarray] = {}
        self.timings: dict[str, float] = {}
        self._clean_purified = None
        self._d_clean = None
        self._d_val = None
        self._last_flags = None  # (images, den, flags) of the last flags() call
        self._features: dict[str, Tensor] = {}
        self.models = [m for m in self.cfg.attack.models if self.run.checkpoint(f"recommender_{m}").is_file()]
        self.test_items = self._test_items()

    def fast_defense(self, defense):
        """The defence for inference: a copy with the denoiser in NHWC and the detector's eval
        BatchNorms folded into its convs (``nn.fuse.folded_copy``), the fold kept only if the
        embeddings match the original on real images (rtol 1e-3). It stays differentiable
        (the adaptive attack goes through it); the weights are frozen."""
        fast = copy.copy(defense)
        fast.denoiser = copy.deepcopy(defense.denoiser).eval().to(memory_format=torch.channels_last)
        if defense.detector is not None:
            probe = to_float(self.cat.images[:8], self.dev)
            det, n = folded_copy(defense.detector, lambda m: m.embed(probe))
            if n:
                fast.detector = det.to(memory_format=torch.channels_last)
        return fast

    def bar(self, total: int, desc: str):
        return progress(total=total, desc=desc, unit="img", enabled=self.cfg.run.progress)

    def _test_items(self) -> Tensor:
        """Held-out test items of the defence (never trained on, threshold not chosen on them)."""
        split = self.defense.split or {}
        test = split.get("test")
        if test is None or len(test) == 0:
            self.log.warning("defense checkpoint has no extra['split']['test']: detection uses all ok items")
            test = [i for i, s in enumerate(self.cat.status) if s == "ok"]
        test = torch.as_tensor(test, dtype=torch.long).flatten()
        g = self.ctx.generator("evaluate:detect-items")
        test = test[torch.randperm(test.numel(), generator=g)]
        return test[: int(self.cfg.eval.detect_items)]

    @property
    def has_detector(self) -> bool:
        return self.defense.detector is not None and self.defense.threshold is not None

    @torch.no_grad()
    def purify_all(self, images: Tensor, defense=None, desc: str = "purify", tag: str = "") -> tuple[Tensor, Tensor]:
        """uint8/float [N,3,S,S] -> (D(x), resize-pad(D(x))) float [N,3,S,S] on CPU.

        The denoiser runs once; OURS-rand applies the same random resize-pad as
        ``Defense.purify(rand=True)`` to its output, from a generator seeded by ``tag``.
        """
        d = defense or self.defense
        S = images.shape[-1]
        g = self.ctx.generator(f"evaluate:rand:{tag or desc}")
        den = torch.empty(images.shape, dtype=torch.float32)
        rnd = torch.empty_like(den)
        bar = self.bar(images.shape[0], desc)
        for s, e in chunks(images.shape[0], self.bs):
            out = d.purify(to_float(images[s:e], self.dev).contiguous(memory_format=torch.channels_last))
            den[s:e] = out.cpu()
            rnd[s:e] = random_resize_pad(out, S, d.rand_min_size(S), generator=g)[0].cpu()
            bar.update(e - s)
        bar.close()
        return den, rnd

    @torch.no_grad()
    def gate(self, images: Tensor, den: Tensor) -> tuple[Tensor, float]:
        """detect+denoise: D(x) where the detector flags x, x elsewhere -> (float [N,3,S,S], flagged share)."""
        flagged = self.flags(images, den)
        out = torch.where(flagged.view(-1, 1, 1, 1), den, to_float(images, "cpu"))
        return out, int(flagged.sum()) / max(images.shape[0], 1)

    @torch.no_grad()
    def flags(self, images: Tensor, den: Tensor) -> Tensor:
        """The detector's decision per image, bool [N] (CPU): d(x, D(x)) > threshold, with D(x) given.
        The last call's answer is kept (by reference to its inputs): the two gated deployments
        ask it of the same catalogue one after the other."""
        last = self._last_flags
        if last is not None and last[0] is images and last[1] is den:
            return last[2]
        det, thr = self.defense.detector, float(self.defense.threshold)
        out = torch.cat([(det.distance(to_float(images[s:e], self.dev), den[s:e].to(self.dev)).float() > thr).cpu()
                         for s, e in chunks(images.shape[0], self.bs)])
        self._last_flags = (images, den, out)
        return out

    def clean_features(self, enc) -> Tensor:
        """Features [N, F] of the clean catalogue under ``enc`` (cached per encoder)."""
        key = f"clean_features:{getattr(enc, 'name', id(enc))}"
        if key not in self._features:
            self._features[key] = self.encode_all(enc, self.cat.images)
        return self._features[key]

    @torch.no_grad()
    def withhold(self, enc, images: Tensor, flagged: Tensor, fallback: Optional[str] = None) -> Tensor:
        """detect+withhold: features [N, F] of the uploaded ``images``, except that a flagged
        item's upload is withheld and the item keeps its last clean feature (``fallback``
        "clean": the clean catalogue's feature of that item) or, for an item with no clean
        history, the catalogue's mean feature ("mean"). Default ``eval.withhold_fallback``."""
        fallback = fallback or self.cfg.eval.withhold_fallback
        if fallback not in WITHHOLD_FALLBACKS:
            raise ValueError(f"eval.withhold_fallback: unknown {fallback!r} ({' | '.join(WITHHOLD_FALLBACKS)})")
        feats = self.encode_all(enc, images)
        clean = self.clean_features(enc)
        keep = clean if fallback == "clean" else clean.mean(0, keepdim=True).expand_as(clean)
        return torch.where(flagged.to(feats.device).view(-1, 1), keep, feats)

    @torch.no_grad()
    def rank_withheld(self, rec, images: Tensor, den: Tensor) -> dict:
        """Ranking metrics of detect+withhold on ``images`` (purified ``den``) plus ``flagged``."""
        flagged = self.flags(images, den)
        feats = self.withhold(self.ctx.encoder(rec.name), images, flagged)
        m = ranking_metrics(rec, self.cat, visual=feats, topk=self.topk)
        return {"flagged": float(flagged.float().mean()) if flagged.numel() else 0.0,
                "fallback": self.cfg.eval.withhold_fallback, **{k: float(v) for k, v in m.items()}}

    @torch.no_grad()
    def encode_all(self, rec, images: Tensor) -> Tensor:
        """[N,3,S,S] (uint8 or float) -> rec.encode features [N, F] on the device."""
        return torch.cat([rec.encode(to_float(images[s:e], self.dev)).float()
                          for s, e in chunks(images.shape[0], self.bs)])

    @torch.no_grad()
    def rank(self, rec, images: Tensor) -> dict:
        m = ranking_metrics(rec, self.cat, visual=self.encode_all(self.ctx.encoder(rec.name), images), topk=self.topk)
        return {k: float(v) for k, v in m.items()}

    @torch.no_grad()
    def distances(self, images: Tensor, defense=None) -> Tensor:
        d = defense or self.defense
        return torch.cat([d.distance(to_float(images[s:e], self.dev)).float().cpu()
                          for s, e in chunks(images.shape[0], self.bs)])

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Detector embeddings [N, D] on the CPU."""
        return torch.cat([self.defense.detector.embed(to_float(images[s:e], self.dev)).float().cpu()
                          for s, e in chunks(images.shape[0], self.bs)])

    def load_attack(self, model: str, attack: str, eps) -> Optional[Tensor]:
        path = self.run.attack_file(model, attack, eps)
        if not path.is_file():
            self.log.warning("evaluate: %s missing (attack stage not run for %s %s eps=%s): rows skipped",
                             path, model, attack, eps)
            return None
        return torch.from_numpy(np.load(path))

    def d_val(self) -> Tensor:
        """Detector distances of the clean validation items of the defence (never its training
        items, never the test items the rates are measured on); cached. Thresholds chosen at
        evaluation time come from these."""
        if self._d_val is None:
            val = (self.defense.split or {}).get("val")
            if val is None or len(val) == 0:
                self.log.warning("defense checkpoint has no extra['split']['val']: thresholds use the test items")
                self._d_val = self.d_clean()
            else:
                self._d_val = self.distances(self.cat.images[torch.as_tensor(val, dtype=torch.long).flatten()])
        return self._d_val

    def d_clean(self) -> Tensor:
        """Detector distances of the clean held-out test items under the main defence (cached)."""
        if self._d_clean is None:
            self._d_clean = self.distances(self.cat.images[self.test_items])
        return self._d_clean

    def clean_purified(self) -> tuple[Tensor, Tensor]:
        if self._clean_purified is None:
            self._clean_purified = self.purify_all(self.cat.images, desc="purify clean", tag="clean")
        return self._clean_purified

    def eps_for(self, model: str) -> list:
        """The attack eps with defended rows for ``model``: the table eps, and for
        ``eval.curve_models`` the ``eval.curve_eps`` too (every attack eps when that is empty)."""
        eps = [e for e in self.cfg.attack.eps]
        if model in self.cfg.eval.curve_models:
            curve = {float(e) for e in self.cfg.eval.curve_eps} | {float(self.cfg.eval.table_eps)}
            return eps if not self.cfg.eval.curve_eps else [e for e in eps if float(e) in curve]
        return [e for e in eps if float(e) == float(self.cfg.eval.table_eps)] or eps[:1]
