"""Presets: overrides on top of the dataclass defaults, which are the "default" preset.

* ``quick``   -- the whole pipeline in a few minutes on 2 CPU cores (CI uses it).
* ``default`` -- what ``python -m vars_fast.train`` runs with no arguments: about 15 minutes
  on 2 cores, large enough for meaningful numbers.
* ``full``, ``sparse``, ``longtail`` -- see their comments; ``paper`` -- ResNet50 at 224 px
  with the paper's schedule, meant for GPUs.
"""
from __future__ import annotations

from typing import Any

# Presets are overrides on top of the dataclass defaults (which are the "default" preset).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        "data.n_users": 200,
        "data.n_items": 240,
        "data.image_size": 32,
        "recommender.epochs": 15,
        "recommender.batch_size": 256,  # ~2.2k training pairs: 1024 would leave 3 steps per epoch
        "recommender.amr.epochs": 2,
        "recommender.dvbpr.epochs": 3,
        "recommender.dvbpr.cnn_width": 16,
        "attack.eps": [8, 16],
        "attack.pgd_steps": 3,
        "attack.triples_per_item": 4,
        "attack.target_eps": [8, 16],
        "attack.n_targets": 8,
        "defense.n_res_blocks": 2,
        "defense.patch_size": 8,
        "defense.heads": 2,
        "defense.embed_dim": 32,
        "defense.epochs_phase1": 2,
        "defense.epochs_phase2": 1,
        "defense.detector_epochs": 1,
        "defense.train_pgd_steps": 2,
        "eval.detect_items": 120,
        "eval.detect_eps": [8, 16],
        "eval.noise_sigmas": [0.05, 0.1],
        "eval.adaptive.eot": 2,
        "eval.tsne_points": 90,
        "eval.curve_eps": [],
        "eval.adaptive.steps": 3,
        "eval.oracle_users": 16,
        "eval.adaptive.oracle_users": 4,
        # a smoke run: the adaptive attacker on a seeded subset, ADDITION and the seen / unseen
        # table at their smallest (the default preset runs them in full)
        "eval.adaptive.items": 48,
        "eval.suite.apgd_steps": 3,
        "eval.suite.square_queries": 20,
        "eval.suite.square_items": 32,
        "defense.addition.denoiser_epochs": 1,
        "defense.addition.noise_epochs": 1,
        "eval.generalisation_fgsm_eps": [8, 32],
    },
    # the default preset plus what its budget leaves out: the eval objective on 100 users, the
    # adaptive attacker at EOT 8 on every item and on the eval objective's lists
    # (docs/results/adaptive_cost.md)
    "full": {
        "eval.oracle_users": 100,
        "eval.adaptive.items": 0,
        "eval.adaptive.steps": 10,
        "eval.adaptive.eot": 8,
        "eval.adaptive.oracle_users": 16,
        # the full attack suite (#22): APGD 100 steps x 3 restarts, Square 1000 queries on every
        # item, the sanity eps from 2 to 64
        "eval.suite.strength": "full",
        "eval.suite.eps": [2, 4, 8, 16, 64],
        "eval.suite.apgd_steps": 100,
        "eval.suite.restarts": 3,
        "eval.suite.square_queries": 1000,
        "eval.suite.square_items": 0,
    },
    # a real-sized, sparse catalogue shaped like a fashion shop's purchase log (~16k products,
    # ~900 customers, ~30 purchases each, density 0.19%, 30% of the items never bought in
    # training) with small images so that it stays cheap on 2 cores. The default popularity
    # tail (sigma 0.7: top 10% of items take 35% of the purchases) gives popularity HR@10
    # 0.18, as on the real catalogue (0.17); sigma 1.3 would give 0.43
    "sparse": {
        "data.n_users": 900,
        "data.n_items": 16000,
        "data.interactions_per_user": 30.0,
        "data.image_size": 64,
    },
    # the regime of a real fashion shop's purchase log (887 customers, 16.6k products, 25k training
    # purchases, most products bought once): the catalogue is what was bought (keep_unbought off),
    # the tail long enough that a third of the test items have no training purchase and most at
    # most one, so that popularity beats BPR and only images carry the cold products; model
    # selection on, as for real data (docs/results/longtail.md)
    "longtail": {
        "data.n_users": 887,
        "data.n_items": 40000,  # generated; ~15k of them are bought
        "data.keep_unbought": False,
        "data.interactions_per_user": 29.7,
        "data.popularity_sigma": 1.0,
        "data.image_size": 64,
        "recommender.select.mode": "on",
    },
    "paper": {
        "data.image_size": 224,
        "backbone.name": "resnet50",
        "recommender.epochs": 100,
        "recommender.batch_size": 512,
        "defense.width": 64,
        "defense.n_res_blocks": 9,
        "defense.patch_size": 16,
        "defense.heads": 8,
        "defense.embed_dim": 256,
        "defense.epochs_phase1": 10,
        "defense.epochs_phase2": 3,
        "defense.detector_epochs": 2,
        "defense.train_pgd_steps": 5,
        "defense.batch_size": 32,
        "defense.contrastive_items": 0,
        "attack.batch_size": 64,
        "attack.pgd_steps": 10,
        "attack.objective": ["eval"],  # the protocol the paper's tables imply (attacks/oracle.py)
        "eval.oracle_users": 0,
        "run.device": "auto",
        "run.amp": True,
        "run.channels_last": True,
    },
}
