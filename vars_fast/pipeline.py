"""The stage context: what every stage of ``python -m vars_fast train`` is handed.

Stages read what earlier stages wrote into the run folder, so any stage can be re-run
alone. Heavy objects (catalogue, backbone, trained models) load lazily, once. A run folder is
opened one way, ``Context.open(run_dir, overrides)``: by the pipeline, by ``python -m vars_fast
evaluate``, by the tools and benchmarks that measure a finished run.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from vars_fast.backbones import build_backbone
from vars_fast.config import Config, apply_overrides, from_dict, load_yaml, validate
from vars_fast.data import load_catalogue
from vars_fast.defense import load_defense
from vars_fast.distributed import ddp
from vars_fast.nn.fuse import fast_copy
from vars_fast.recommenders import load_recommender
from vars_fast.run import RunFolder
from vars_fast.utils import get_device, setup_logging


@dataclass
class Context:
    cfg: Config
    run: RunFolder
    device: torch.device
    log: logging.Logger
    _cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir: str | Path, overrides: Optional[dict[str, Any]] = None, *, cfg: Optional[Config] = None,
             device: Optional[torch.device | str] = None, log: Optional[logging.Logger] = None) -> "Context":
        """The context of run folder ``run_dir``.

        Its config is the folder's ``config.yaml`` (a folder without one is not a run: one-line
        ``FileNotFoundError``), or ``cfg`` for a run being created; ``overrides`` ({"eval.
        table_eps": 16, ...}, as ``--set`` gives) apply on top and are validated. ``device``
        defaults to ``run.device``; ``log`` to the package logger, writing ``log.txt`` in the
        folder (rank 0 only under DDP)."""
        path = Path(run_dir)
        if cfg is None:
            if not (path / "config.yaml").is_file():
                raise FileNotFoundError(f"{path / 'config.yaml'} not found: {path} is not a run folder "
                                        "(python -m vars_fast train --out DIR makes one)")
            cfg = from_dict(load_yaml(path / "config.yaml"))
        if overrides:
            apply_overrides(cfg, overrides)
            validate(cfg)
        path.mkdir(parents=True, exist_ok=True)
        if log is None:
            log = setup_logging(str(path / "log.txt") if ddp.is_main() else None)
        dev = torch.device(device) if device is not None else get_device(cfg.run.device)
        return cls(cfg=cfg, run=RunFolder(path), device=dev, log=log)

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
