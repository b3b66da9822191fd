"""``recommender``: the models (``RECOMMENDERS``) and how they train, with the sub-sections of
model selection (``recommender.select``), AMR (``recommender.amr``), DVBPR
(``recommender.dvbpr``) and the bounded VBPR (``recommender.bounded``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SelectConfig:
    # per-catalogue model selection for the models trained by fit_bpr (BPR, VBPR; AMR starts from
    # the chosen VBPR): a coordinate search over the grid below from the config's own setting, at
    # most `trials` settings, each early-stopped on one shared training holdout by `metric`; the
    # best is retrained on every training pair for its best epoch count.
    # auto: on for catalogues read from files (a fixed schedule fitted to synthetic data lost a
    # quarter of VBPR's HR@10 on a real long-tail log), off for generated ones (docs/results/longtail.md)
    mode: Literal["auto", "on", "off"] = "auto"
    trials: int = 6
    lr: list = field(default_factory=lambda: [1e-2, 3e-3, 1e-3])
    weight_decay: list = field(default_factory=lambda: [1e-2, 3e-2, 1e-1])
    k: list = field(default_factory=lambda: [16, 64])
    # on the longtail preset the holdout AUC ranked four VBPR settings exactly as their test HR@10
    # did; MRR did not follow it (docs/results/longtail.md)
    metric: Literal["auc", "mrr"] = "auc"


@dataclass
class AMRConfig:
    eps: float = 0.5  # the feature perturbation's norm, a fraction of the typical ||f~|| (~1)
    lambda_adv: float = 1.0  # weight of the adversarial term
    epochs: int = 5  # fine-tuning epochs
    lr: float = 1e-3  # fine-tuning learning rate
    batch_size: int = 1024  # AMR's steps cost ~3 of VBPR's: kept at the batch its epochs were set for


@dataclass
class DVBPRConfig:
    # backbone: the ImageNet backbone.name fine-tuned; small: a CNN from scratch
    cnn: Literal["backbone", "small"] = "backbone"
    train_blocks: int = 1  # backbone: trailing blocks that train (cost: docs/results/dvbpr.md)
    epochs: int = 5
    lr: float = 1e-3  # theta and the projection (1e-2 overfits theta; docs/results/dvbpr.md)
    backbone_lr_mult: float = 1.0  # the pretrained blocks train at this x lr
    cnn_width: int = 32  # channels of the small CNN (small only)
    input_size: int = 0  # Phi sees images resized to this (0: the data's image size)
    # triples per step: Phi runs on the batch's distinct items, so small batches give more CNN
    # updates for the same number of images encoded
    batch_size: int = 256


@dataclass
class BoundedConfig:
    # VBPR-bounded and AMR-bounded (recommenders/bounded.py): each user's visual weight is capped
    # at this norm, so no image moves a score by more than 2 * cap; the frontier:
    # docs/results/bounded_vbpr.md
    cap: float = 1.0


@dataclass
class RecommenderConfig:
    models: list = field(default_factory=lambda: ["VBPR", "AMR", "DVBPR", "BPR", "Pop"])
    k: int = 64  # latent factors (paper K = 64)
    visual_k: int = 64  # width of E f_i when separate (VBPR's theta_i); paper ties it to k
    biases: bool = True  # VBPR's beta_i and beta'^T f_i
    # early stopping on a holdout carved from the *training* interactions (one per user; see
    # recommenders/base.py): lr until the validation AUC plateaus for `patience` epochs, then
    # lr_low until the next plateau, best weights kept; `epochs` is then a cap. False: the
    # paper's fixed schedule, lr for lr_drop_frac of `epochs`, then lr_low
    early_stopping: bool = True
    patience: int = 10  # the holdout AUC dips after a first peak and rises past it (docs/results/recommender_tuning.md)
    val_negatives: int = 100  # sampled non-positives each held-out item is ranked against
    val_metric: Literal["auc", "mrr"] = "auc"  # what early stopping reads on the holdout (recommenders/base.py Holdout)
    select: SelectConfig = field(default_factory=SelectConfig)
    bounded: BoundedConfig = field(default_factory=BoundedConfig)
    epochs: int = 60  # a cap under early stopping
    lr: float = 1e-2
    lr_low: float = 1e-3  # paper: higher lr for 80% of epochs then lower
    lr_drop_frac: float = 0.8
    # lambda_Theta: 1e-3 lets BPR overfit the default data; 3e-2 with batch 256 closes most of
    # the gap to Cornac's BPR (docs/results/recommender_tuning.md)
    weight_decay: float = 3e-2
    batch_size: int = 256
    tied: bool = True  # paper form p_u^T (q_i + E f_i); False: original VBPR gamma_u/theta_u split (visual_k)
    reg_visual: float = 0.0  # lambda on E and beta' (per batch); 0: same as weight_decay
    init_std: float = 0.01  # N(0, init_std) init of user / item factors
    # VBPR/AMR feature transform, fitted on the clean catalogue and stored in the model:
    # center_scale: f~ = (f - mean) / mean||f - mean|| (so ||f~|| ~ 1); none: raw features
    feature_norm: Literal["center_scale", "none"] = "center_scale"
    feature_batch: int = 128  # images per batch when extracting catalogue features
    # torch CPU threads while training (0: leave torch's setting). The embedding models' ops are
    # tiny, so a second OpenMP thread mostly waits at barriers (docs/results/defaults.md)
    threads: int = 1
    # AMR (Tang et al. 2020): feature-space adversarial fine-tuning of a trained VBPR
    amr: AMRConfig = field(default_factory=AMRConfig)
    # DVBPR (Kang et al. 2017): the CNN is trained end to end with the recommender
    # (numbers: docs/results/dvbpr.md)
    dvbpr: DVBPRConfig = field(default_factory=DVBPRConfig)
