"""The top of the configuration: ``Config`` and its small sections (data, backbone, run).

The other sections live next to this file, one module each (``recommender``, ``attack``,
``defense``, ``evaluation``), with their sub-sections (``recommender.amr``, ``eval.adaptive``,
...). A field's comment is its documentation (``docs/config.md`` is generated from them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from vars_fast.config.attack import AttackConfig
from vars_fast.config.defense import DefenseConfig
from vars_fast.config.evaluation import EvalConfig
from vars_fast.config.recommender import RecommenderConfig


@dataclass
class DataConfig:
    source: str = "synthetic"  # where interactions and images come from (data/catalogue.py)
    seed: int = 0
    # synthetic catalogue
    n_users: int = 600
    n_items: int = 800
    n_categories: int = 8
    interactions_per_user: float = 12.0  # mean; Poisson around it, >= min_interactions
    popularity_weight: float = 0.5  # share of a user's taste driven by item popularity
    taste_strength: float = 4.0  # beta in P(i|u) ∝ exp(beta·visual affinity) × popularity^(2w·sigma)
    popularity_sigma: float = 0.7  # item popularity is lognormal(0, sigma): the length of the tail
    n_styles: int = 2  # (category, colour) styles per user, weights 1.0, 0.8, ...: more is a more diverse taste
    # False: the catalogue is the items someone bought, as in any catalogue read from a purchase
    # log (the real loaders); True: every generated item, never-bought ones included
    keep_unbought: bool = True
    # real data
    interactions: Optional[str] = None  # CSV/TSV/Parquet (generic), reviews JSON(.gz) (amazon), .npy (dvbpr_npy)
    metadata: Optional[str] = None  # amazon metadata JSON lines (for image paths / categories)
    images_root: Optional[str] = None
    path_template: str = "{item_id}.jpg"
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: Optional[str] = None
    sep: Optional[str] = None  # None: from the file suffix
    min_rating: float = 0.0  # ratings > min_rating count as positive feedback
    # preprocessing (paper: binarise, drop users with < 5 interactions, leave-one-out)
    min_interactions: int = 5
    n_negatives: int = 100
    image_size: int = 64
    cache_dir: Optional[str] = None  # decoded uint8 image cache; None: <run>/cache


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"  # the ImageNet CNN of the visual features (backbones.py)
    # "pretrained": the packaged / cached ImageNet weights; a path: a local state dict;
    # "none": random init (tests).
    weights: str = "pretrained"
    input_size: int = 0  # 0: the data image size; else images are resized to this first


@dataclass
class RunConfig:
    name: str = ""  # "" -> <preset>-<timestamp>
    out: str = "runs"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    seed: int = 0
    stages: list = field(default_factory=lambda: ["recommender", "attack", "defense", "evaluate"])
    compile: bool = False
    amp: bool = False  # bf16 autocast where the hardware has it
    channels_last: bool = False
    backend: str = "auto"  # custom ops backend (ops/_dispatch.py), or an alias; auto: per call
    workers: int = 0
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    progress: bool = True


@dataclass
class Config:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
