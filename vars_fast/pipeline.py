"""The stage context: what every stage of ``python -m vars_fast.train`` is handed.

Stages read what earlier stages wrote into the run folder, so any stage can be re-run
alone. Heavy objects (catalogue, backbone, trained models) load lazily, once.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from vars_fast.backbones import build_backbone
from vars_fast.config import Config
from vars_fast.data import load_catalogue
from vars_fast.defense import load_defense
from vars_fast.nn.fuse import fast_copy
from vars_fast.recommenders import load_recommender
from vars_fast.run import RunFolder


@dataclass
class Context:
    cfg: Config
    run: RunFolder
    device: torch.device
    log: logging.Logger
    _cache: dict[str, Any] = field(default_factory=dict)

    def generator(self, tag: str, device: str | torch.device = "cpu") -> torch.Generator:
        """A generator seeded from (run.seed, tag): stages and items get independent, reproducible streams."""
        h = int.from_bytes(hashlib.sha256(f"{self.cfg.run.seed}:{tag}".encode()).digest()[:8], "little")
        return torch.Generator(device=device).manual_seed(h & ((1 << 63) - 1))

    @property
    def catalogue(self):
        if "catalogue" not in self._cache:
            cache_dir = self.cfg.data.cache_dir or str(self.run.cache_dir)
            self._cache["catalogue"] = load_catalogue(self.cfg.data, cache_dir, progress=self.cfg.run.progress)
        return self._cache["catalogue"]

    @property
    def backbone(self):
        if "backbone" not in self._cache:
            bb = build_backbone(self.cfg.backbone).to(self.device).eval()
            if self.cfg.run.channels_last:
                bb = bb.to(memory_format=torch.channels_last)
            self._cache["backbone"] = bb
        return self._cache["backbone"]

    def recommender(self, name: str):
        key = f"rec:{name}"
        if key not in self._cache:
            path = self.run.checkpoint(f"recommender_{name}")
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the 'recommender' stage first")
            self._cache[key] = load_recommender(path, backbone=self.backbone, device=self.device,
                                                split_key=self.catalogue.meta.get("split_key"))
        return self._cache[key]

    def encoder(self, name: str):
        """Recommender ``name`` for frozen feature extraction (re-encoding attacked or purified
        catalogues): its BN-folded NHWC copy when ``attack.fast_encoder`` (``nn.fuse.
        fast_copy``, checked against the original on real images; docs/results/defaults.md), else
        the recommender itself. Built once per run."""
        key = f"encoder:{name}"
        if key not in self._cache:
            rec = self.recommender(name)
            if getattr(self.cfg.attack, "fast_encoder", False):
                probe = self.catalogue.item_batch(torch.arange(min(8, self.catalogue.n_items)), self.device)
                rec = fast_copy(rec, probe)
            self._cache[key] = rec
        return self._cache[key]

    def defense(self):
        if "defense" not in self._cache:
            path = self.run.checkpoint("defense")
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the 'defense' stage first")
            self._cache["defense"] = load_defense(path, device=self.device)
        return self._cache["defense"]

    def put(self, key: str, value: Any) -> None:
        self._cache[key] = value
