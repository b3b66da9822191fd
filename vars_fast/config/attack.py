"""``attack``: the untargeted (``ATTACKS``), evaluation-aware (``OBJECTIVES``) and targeted
(``TARGETED``) attacks of the attack stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AttackConfig:
    untargeted: list = field(default_factory=lambda: ["fgsm", "pgd"])
    eps: list = field(default_factory=lambda: [4, 8, 16, 32, 64])  # /255 pixel units
    # 5 steps keep the default attack stage short on a CPU and already make PGD far stronger
    # than FGSM (docs/results/defaults.md); the paper preset uses 10
    pgd_steps: int = 5
    pgd_alpha: float = 0.0  # /255; 0: 2.5 * eps / steps (Madry et al.)
    random_start: bool = True
    triples_per_item: int = 16  # training triples per item for its perturbation (cheap: no extra CNN work)
    # how many of an item's triples have it as the positive: "bpr" (as often as in the BPR
    # triple distribution: pop / (pop + |D|/N)) or "balanced" (half); see attacks/untargeted.py
    triple_roles: Literal["bpr", "balanced"] = "bpr"
    # the per-item objective of the "train" catalogue attack: "bpr" (the paper's: the BPR loss over
    # the item's training triples) or "margin" (each of the item's training users' score gap to
    # their 10th-best competitor, pushed negative: attacks/margin.py); the "eval" objective keeps
    # its BPR list loss
    loss: str = "bpr"
    batch_size: int = 64
    targets: list = field(default_factory=lambda: ["aip-insa", "aip-expa", "taamr-fgsm", "taamr-pgd"])
    target_eps: list = field(default_factory=lambda: [4, 8, 16, 32])
    n_targets: int = 50
    # targeted PGD (AIP-INSA/EXPA, TAaMR-PGD): large sign steps (2.5 eps / 5) overshoot, so a
    # larger eps can come out weaker; smaller steps, each target's best iterate, and each eps
    # warm-started from the next smaller eps's result make the attack at a larger eps at least
    # as strong as at a smaller one (by its own loss); see docs/results/defaults.md
    target_steps: int = 20  # 0: attack.pgd_steps
    target_alpha: float = 0.0  # /255; 0: 2.5 * eps / target_steps
    target_keep_best: bool = True
    target_warm_start: bool = True
    insa_users: int = 256  # AIP-INSA averages the score over at most this many users (seeded sample; 0: all)
    models: list = field(default_factory=lambda: ["VBPR", "AMR", "DVBPR"])
    # threat models (README "Threat models"): "train" crafts one image per item from training
    # triples (what an uploader can do, attacks/untargeted.py); "eval" crafts per-user images
    # on each evaluated user's candidate list (the paper's protocol, an oracle upper bound,
    # attacks/oracle.py) for eval.oracle_models on eval.oracle_users
    objective: list = field(default_factory=lambda: ["train", "eval"])
    # False: models outside eval.curve_models are attacked at eval.table_eps only (the rows the
    # evaluation reads for them); True: every model at every attack.eps
    all_models_all_eps: bool = False
    # attack a copy of the model with BatchNorm folded into the convs and channels_last weights
    # (same function to ~1e-5, faster input gradients on CPU; nn/fuse.py, docs/results/defaults.md)
    fast_encoder: bool = True
    save_images: bool = True
