"""Dataclass configuration, presets, YAML files and ``--set a.b=v`` overrides.

One ``Config`` holds everything a run needs; it is saved resolved as ``config.yaml`` in the
run folder so that any stage can be re-run alone. Presets:

* ``quick``   -- the whole pipeline in a few minutes on 2 CPU cores (CI uses it).
* ``default`` -- what ``python -m vars_fast.train`` runs with no arguments: about 15 minutes
  on 2 cores, large enough for meaningful numbers.
* ``paper``   -- ResNet50 at 224 px with the paper's schedule; meant for GPUs.

Values the paper leaves blank are ours; each field documents its choice.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from vars_fast.errors import ConfigError  # noqa: F401 - re-exported: callers import it from here
from vars_fast import registry as R




# Keys that moved to another section: a config file or ``--set`` that still uses the old key
# gets a one-line error naming the new one, instead of "unknown key".
MOVED_KEYS: dict[str, str] = {
    "defense.addition_change": "eval.addition_change",
    "defense.n_detect_items": "eval.detect_items",
    "defense.eval_eps": "eval.detect_eps",
    "defense.noise_sigmas": "eval.noise_sigmas",
    "defense.adaptive": "eval.adaptive",
    "defense.adaptive_eot": "eval.adaptive_eot",
}


def _after_phase1(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A ``DefenseConfig`` field that phase 1 of defence training (denoiser only, detector
    idle) never reads: configs that differ only in such fields share their phase-1 result
    (``defense.training.phase1_fingerprint``). Untagged fields count, so a new field disables
    sharing until it is tagged, instead of breaking it."""
    return field(default=default, metadata={"phase1": False}, **kw)


@dataclass
class DataConfig:
    source: str = "synthetic"  # a member of registry.SOURCES
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
    name: str = "efficientnet_lite0"  # a member of registry.BACKBONES
    # "pretrained": the packaged / cached ImageNet weights; a path: a local state dict;
    # "none": random init (tests).
    weights: str = "pretrained"
    input_size: int = 0  # 0: the data image size; else images are resized to this first


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
    # per-catalogue model selection for the models trained by fit_bpr (BPR, VBPR; AMR starts from
    # the chosen VBPR): select_trials settings drawn (seeded) from the grid below, the config's own
    # first, each early-stopped on the same holdout by select_metric; the best is retrained on every
    # training pair for its best epoch count. auto: on for catalogues read from files (a fixed
    # schedule fitted to synthetic data lost a quarter of VBPR's HR@10 on a real long-tail log),
    # off for synthetic ones (docs/results/longtail.md)
    select: Literal["auto", "on", "off"] = "auto"
    select_trials: int = 6
    select_lr: list = field(default_factory=lambda: [1e-2, 3e-3])
    select_weight_decay: list = field(default_factory=lambda: [1e-2, 3e-2, 1e-1])
    select_k: list = field(default_factory=lambda: [16, 64])
    select_metric: Literal["auc", "mrr"] = "mrr"  # AUC weighs the bottom of the list like the top (base.Holdout)
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
    amr_eps: float = 0.5
    amr_lambda: float = 1.0
    amr_epochs: int = 5
    amr_lr: float = 1e-3
    amr_batch_size: int = 1024  # AMR's steps cost ~3 of VBPR's: kept at the batch its epochs were set for
    # DVBPR (Kang et al. 2017): the CNN is trained end to end with the recommender
    # (numbers: docs/results/dvbpr.md)
    dvbpr_cnn: Literal["backbone", "small"] = "backbone"  # backbone: the ImageNet backbone.name fine-tuned; small: a CNN from scratch
    dvbpr_train_blocks: int = 1  # backbone: trailing blocks that train (cost: docs/results/dvbpr.md)
    dvbpr_epochs: int = 5
    dvbpr_lr: float = 1e-3  # theta and the projection (1e-2 overfits theta; docs/results/dvbpr.md)
    dvbpr_backbone_lr_mult: float = 1.0  # the pretrained blocks train at this x dvbpr_lr
    dvbpr_cnn_width: int = 32  # small only
    dvbpr_input_size: int = 0  # Phi sees images resized to this (0: the data's image size)
    dvbpr_batch_size: int = 256  # triples per step: Phi runs on the batch's distinct items, so small batches
    # give more CNN updates for the same number of images encoded


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
    # triple distribution: pop / (pop + |D|/N)) or "balanced" (half); see attacks/catalogue.py
    triple_roles: Literal["bpr", "balanced"] = "bpr"
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
    # triples (what an uploader can do, attacks/catalogue.py); "eval" crafts per-user images
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


@dataclass
class DefenseConfig:
    # denoiser (Fig. 4): 9x9 in -> residual blocks -> global transformer -> 3x3 -> 9x9 out.
    # CPU defaults (the paper's 9 blocks / width 64 are the "paper" preset): width 16 x 4 blocks
    # recovers as much HR@10 as 32 x 6 at half the compute (docs/results/defaults.md)
    width: int = 16
    n_res_blocks: int = 4
    norm: Literal["instance", "batch"] = "instance"
    patch_size: int = 8
    heads: int = 4
    mlp_ratio: float = 2.0
    embed_dim: int = 64  # token width of the global transformer block (patch -> embed_dim)
    unpatchify: Literal["pixel", "smooth"] = "pixel"  # tokens back to the map (defense/denoiser.py)
    # subtract the residual's spatial mean per image and channel: no colour shift of every image
    # (docs/results/denoiser_fidelity.md)
    zero_mean_residual: bool = False
    # Eq. 12 weights (the paper's values are lost): L_VBPR + l1 L_c + l2 L_p + l3 L_con
    lambda_content: float = 1.0
    lambda_perceptual: float = 0.01  # L_p is large next to L_c; see docs/results/defaults.md
    lambda_contrastive: float = _after_phase1(0.1)
    lambda_rec: float = 0.01
    # extra content weight on the clean views only (D(x) = x for clean x); see
    # docs/results/denoiser_fidelity.md
    lambda_identity: float = 0.0
    use_perceptual: bool = True
    use_detector: bool = _after_phase1(True)
    # schedule: phase 1 clean + FGSM, phase 2 clean/FGSM/PGD ~1:1:1 (seeded RNG per iteration)
    epochs_phase1: int = 5  # paper: ~10
    epochs_phase2: int = _after_phase1(2)  # paper: ~3
    # paper: ~2; a single detector epoch can leave a weak detector (docs/results/defaults.md)
    detector_epochs: int = _after_phase1(2)
    # False: the detector phase leaves the denoiser as phase 2 left it (docs/results/denoiser_fidelity.md)
    denoiser_in_detector_phase: bool = _after_phase1(False)
    lr: float = 1e-3
    # small batches give 4x the updates of 32 at equal epochs, which the detector needs
    # (docs/results/defaults.md)
    batch_size: int = 8
    train_eps: list = field(default_factory=lambda: [4, 8, 16, 32])  # /255, drawn per batch
    train_pgd_steps: int = 3
    triples_per_item: int = 4  # training triples per item for the on-the-fly attacks and L_VBPR
    fast_frozen: bool = True  # frozen recommender/backbone paths on a BN-folded NHWC copy (nn/fuse.py)
    clean_noise_sigma: float = 0.1  # half the clean views get N(0, s^2), s ~ U[0, this]; 0: off
    encoder_lr_mult: float = _after_phase1(0.1)  # detector encoder (pretrained) lr = lr * this
    train_item_frac: float = 0.5  # seeded item split: train / val (threshold) / test (the rest)
    val_item_frac: float = 0.2
    ablations: list = _after_phase1(default_factory=lambda: ["no-detector", "no-perceptual"])  # Table 5
    # train the variants in two CPU processes at half the threads each (defense/stage.py); the
    # no-detector ablation reuses the full model's phase 1 (identical by construction)
    parallel_variants: bool = _after_phase1(True)
    # detector
    proj_hidden: int = _after_phase1(512)
    proj_dim: int = _after_phase1(128)  # paper: 128-d embedding
    temperature: float = _after_phase1(0.1)
    contrastive_items: int = _after_phase1(8)  # items per batch in L_con (4 encoder views each); 0: the whole batch
    share_negatives: bool = _after_phase1(True)  # every item's x_adv is a negative for every anchor (else own item's)
    # FGSM eps of the detector phase and the threshold calibration, one drawn per batch. The
    # paper trains at one eps; but the denoiser cannot undo a large eps, so D(x_adv) stays near
    # x_adv and the distance is small: training at the evaluated eps range is what teaches the
    # detector those distances (docs/results/defaults.md)
    detector_eps: list = _after_phase1(default_factory=lambda: [8, 16, 32, 64])
    threshold_rule: str = _after_phase1("youden")  # a member of registry.THRESHOLD_RULES
    # adversarial training of the pair against the adaptive attacker: in the detector phase,
    # every other iteration's adversarial view is AdaptivePGD through the current denoiser
    # (EOT over the resize-pad) with the detector hinge, so the detector learns the images
    # that evade it (defense/training.py; docs/results/adaptive_hardening.md)
    adaptive_train: bool = _after_phase1(False)
    adaptive_train_steps: int = _after_phase1(3)
    adaptive_train_eot: int = _after_phase1(2)
    adaptive_train_weight: float = _after_phase1(1.0)  # the hinge's weight in that attacker's loss
    # random resize-pad at inference (OURS-rand)
    rand_min_frac: float = _after_phase1(0.85)  # r' drawn uniformly in [rand_min_frac * r, r)


@dataclass
class EvalConfig:
    topk: list = field(default_factory=lambda: [5, 10, 20])
    tsne_points: int = 300  # detector embeddings in the t-SNE figure, split over 4 groups
    figures: bool = True
    batch_size: int = 64  # purification / encoding / detection batches
    # Tables 2/3/5 and the adaptive rows use one eps (the paper's value is lost; 8/255 is the
    # usual imperceptible budget). curve_models get defended rows at every attack eps (Fig. 6).
    table_eps: int = 8
    # each defended catalogue is a denoiser pass + 2 encodes, so defended rows are limited to
    # the paper's base models (AMR rows of Tables 2/3 are undefended) and the Fig. 6 defended
    # curves to a few eps (docs/results/defaults.md)
    models: list = field(default_factory=lambda: ["VBPR", "DVBPR"])  # models with OURS rows
    curve_models: list = field(default_factory=lambda: ["VBPR"])
    curve_eps: list = field(default_factory=lambda: [8, 32])  # defended Fig. 6 points; empty: every attack.eps
    # detection (Table 4): FGSM at each detect_eps on detect_items held-out test items per
    # class (as the paper; capped by the catalogue), and Gaussian noise at each noise_sigmas
    detect_eps: list = field(default_factory=lambda: [8, 16, 32, 64])
    detect_items: int = 1000
    noise_sigmas: list = field(default_factory=lambda: [0.02, 0.05, 0.1])
    # ADDITION baseline (defense/addition.py): the paper's criterion (flag a score change above
    # this share), the users whose scores it compares (seeded subset), the range of its
    # noise-level network, the size of its FFDNet-like denoiser and its training; measured in
    # docs/results/addition.md
    addition_change: float = 0.2
    addition_users: int = 256
    addition_sigma_min: float = 0.005
    addition_sigma_max: float = 0.15
    addition_hidden: int = 64  # noise-level MLP width
    addition_width: int = 48
    addition_depth: int = 5
    addition_train_eps: list = field(default_factory=lambda: [8, 16, 32])  # FGSM training examples, /255
    addition_triples_per_item: int = 4
    addition_denoiser_epochs: int = 3  # its loss settles after the first (docs/results/addition.md)
    addition_noise_epochs: int = 3  # clean levels settle by the second (docs/results/addition.md)
    addition_joint: bool = True  # the denoiser keeps training with the noise-level network (stage 2)
    addition_batch_size: int = 8
    addition_lr: float = 1e-3
    addition_lambda_score: float = 1.0  # recommender-guided term of the denoiser loss
    addition_lambda_sigma: float = 0.01  # preference for the smallest sufficient noise
    # the "eval" attack objective: 1 + data.n_negatives images per user and attack, so a seeded
    # subset of users (clean HR is reported on the same subset)
    # 32 keep the default run near its budget (each user costs seconds of attack and evaluation:
    # docs/results/full_run.md times 100 users against 32); the "full" preset runs 100; 0: every user
    oracle_users: int = 32
    oracle_models: list = field(default_factory=lambda: ["VBPR", "DVBPR"])
    oracle_eps: list = field(default_factory=list)  # /255; empty: eval.table_eps
    # the "seen / unseen" detection table (evaluate/generalisation.py): FGSM at these eps, PGD at
    # table_eps, PGD-L2, a ResNet18-surrogate transfer attack, Gaussian noise and JPEG
    generalisation: bool = True
    generalisation_fgsm_eps: list = field(default_factory=lambda: [4, 8, 16, 32, 64])
    # adaptive attacker (attacks/adaptive.py): every item is attacked through the defence with
    # adaptive_steps PGD steps, EOT over adaptive_eot random resize-pad draws per step against
    # denoise+rand, and a detector hinge of weight adaptive_detect_weight. The default preset's
    # EOT is what fits its budget; the "full" preset runs EOT 8 (docs/results/adaptive_cost.md)
    adaptive: bool = True
    adaptive_eot: int = 4
    adaptive_eps: int = 0  # /255; 0: table_eps
    adaptive_steps: int = 10  # 0: attack.pgd_steps
    # items attacked adaptively (seeded subset, the rest keep their plain PGD image: a mixed
    # attacker, for cost studies only); 0: every item
    adaptive_items: int = 0
    # the "eval" objective adaptively (whole lists through the defence) on a seeded subset of
    # the oracle users; 0: every oracle user, -1: off. Each user is 1 + n_negatives images, so
    # the default leaves it to the "full" preset (docs/results/adaptive_cost.md)
    adaptive_oracle_users: int = -1
    adaptive_detect_weight: float = 1.0  # weight of the detector hinge in the attacker's loss
    # transfer (evaluate/transfer.py): the defence trained on this catalogue (A) applied to a
    # synthetic catalogue B of another seed and style, with 0 and transfer_finetune_epochs
    # epochs of denoiser fine-tuning on B; the detector stays as trained on A
    transfer: bool = False  # ~3 min (192 s) on the default preset: docs/results/transfer.md
    transfer_seed: int = 1  # B's data.seed
    transfer_style: str = "geometric"  # B's rendering style (data/synthetic.py STYLES)
    transfer_users: int = 0  # B's users; 0: data.n_users
    transfer_items: int = 0  # B's items; 0: data.n_items
    transfer_finetune_epochs: int = 2
    # detect+withhold: a flagged item keeps its clean feature ("clean"), or the catalogue's mean
    # feature ("mean": an item with no clean history)
    withhold_fallback: Literal["clean", "mean"] = "clean"


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
    backend: str = "auto"  # ops backend, or an alias (registry.BACKENDS)
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


# Presets are overrides on top of the dataclass defaults (which are the "default" preset).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        "data.n_users": 200,
        "data.n_items": 240,
        "data.image_size": 32,
        "recommender.epochs": 15,
        "recommender.batch_size": 256,  # ~2.2k training pairs: 1024 would leave 3 steps per epoch
        "recommender.amr_epochs": 2,
        "recommender.dvbpr_epochs": 3,
        "recommender.dvbpr_cnn_width": 16,
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
        "eval.adaptive_eot": 2,
        "eval.tsne_points": 90,
        "eval.curve_eps": [],
        "eval.adaptive_steps": 3,
        "eval.oracle_users": 16,
        "eval.adaptive_oracle_users": 4,
        # a smoke run: the adaptive attacker on a seeded subset, ADDITION and the seen / unseen
        # table at their smallest (the default preset runs them in full)
        "eval.adaptive_items": 48,
        "eval.addition_denoiser_epochs": 1,
        "eval.addition_noise_epochs": 1,
        "eval.generalisation_fgsm_eps": [8, 32],
    },
    # the default preset plus what its budget leaves out: the eval objective on 100 users, the
    # adaptive attacker at EOT 8 on every item and on the eval objective's lists
    # (docs/results/adaptive_cost.md)
    "full": {
        "eval.oracle_users": 100,
        "eval.adaptive_items": 0,
        "eval.adaptive_steps": 10,
        "eval.adaptive_eot": 8,
        "eval.adaptive_oracle_users": 16,
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
        "recommender.select": "on",
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


def _hint(tp: Any) -> Any:
    """Strip Optional[...] and return the core type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    core = _hint(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(core, '__name__', core)})")
    try:
        if core is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if core is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if core is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if core is str:
            return str(value)
        if typing.get_origin(core) is Literal:  # a closed choice: validate() checks the value
            if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(core):
                return "on" if value else "off"  # YAML reads a bare on/off as a bool
            return str(value)
        if core is list or typing.get_origin(core) is list:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [
                    yaml.safe_load(v) for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return list(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}: bad value {value!r} (expected {getattr(core, '__name__', core)})")


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` on ``cfg`` with type checking; unknown keys raise ConfigError."""
    if dotted in MOVED_KEYS:
        raise ConfigError(f"{dotted} is now {MOVED_KEYS[dotted]}")
    parts = dotted.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts):
        if not is_dataclass(obj):
            raise ConfigError(f"unknown config key {dotted!r}")
        hints = typing.get_type_hints(type(obj))
        names = {f.name for f in fields(obj)}
        if p not in names:
            choices = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {dotted!r} ({'.'.join(parts[:i]) or 'top level'} has: {choices})")
        if i == len(parts) - 1:
            cur = getattr(obj, p)
            if is_dataclass(cur):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: expected a mapping of keys")
                for k, v in value.items():
                    set_value(cfg, f"{dotted}.{k}", v)
                return
            setattr(obj, p, _coerce(dotted, value, hints[p]))
        else:
            obj = getattr(obj, p)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    for k, v in overrides.items():
        set_value(cfg, k, v)
    return cfg


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c.d=[1,2]"]`` -> ``{"a.b": 1, "c.d": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    return data


def make_config(preset: str | None = None, config_file: str | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Resolve preset -> YAML file -> overrides, in that order (later wins)."""
    file_data = load_yaml(config_file) if config_file else {}
    preset = preset or file_data.pop("preset", None) or "default"
    file_data.pop("preset", None)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = Config(preset=preset)
    apply_overrides(cfg, PRESETS[preset])
    apply_overrides(cfg, _flatten(file_data))
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def _check_choices(obj: Any, prefix: str) -> None:
    """Every ``Literal[...]`` field of the dataclass ``obj`` (recursively) holds one of its values."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        v, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(v):
            _check_choices(v, key + ".")
        elif typing.get_origin(_hint(hints[f.name])) is Literal and v not in typing.get_args(_hint(hints[f.name])):
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, typing.get_args(_hint(hints[f.name]))))} "
                              f"(got {v!r})")


def validate(cfg: Config) -> None:
    """Names against their family's registry, closed choices against the field's ``Literal``
    type, and the ranges; a ConfigError names the key."""
    def check(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg} (got {eval_key(cfg, key)!r})")

    _check_choices(cfg, "")
    R.SOURCES.check(cfg.data.source)
    R.BACKBONES.check(cfg.backbone.name)
    for key in ("recommender.models", "attack.models", "eval.models", "eval.curve_models", "eval.oracle_models"):
        R.RECOMMENDERS.check(eval_key(cfg, key), key)
    R.ATTACKS.check(cfg.attack.untargeted, ball="linf")  # eps in /255 per pixel
    check(len(cfg.attack.objective) > 0, "attack.objective", "must name at least one objective")
    R.OBJECTIVES.check(cfg.attack.objective)
    R.TARGETED.check(cfg.attack.targets)
    R.DEFENSE_VARIANTS.check(cfg.defense.ablations)
    R.THRESHOLD_RULES.check(cfg.defense.threshold_rule)
    R.BACKENDS.check(cfg.run.backend)
    R.STAGES.check(cfg.run.stages)
    from vars_fast.data.synthetic import STYLES  # numpy only

    check(cfg.eval.transfer_style in STYLES, "eval.transfer_style", f"must be one of {', '.join(STYLES)}")
    check(cfg.data.image_size >= 16, "data.image_size", "must be >= 16")
    check(cfg.data.min_interactions >= 2, "data.min_interactions", "must be >= 2 (leave-one-out needs a train item)")
    check(cfg.data.n_negatives >= 1, "data.n_negatives", "must be >= 1")
    check(cfg.recommender.select_trials >= 1, "recommender.select_trials", "must be >= 1")
    check(cfg.recommender.dvbpr_backbone_lr_mult > 0, "recommender.dvbpr_backbone_lr_mult", "must be > 0")
    check(cfg.recommender.dvbpr_train_blocks >= 0, "recommender.dvbpr_train_blocks", "must be >= 0")
    check(all(0 < float(e) <= 255 for e in cfg.attack.eps), "attack.eps", "entries must be in (0, 255] (/255 units)")
    check(cfg.attack.pgd_steps >= 1, "attack.pgd_steps", "must be >= 1")
    check(cfg.eval.oracle_users >= 0, "eval.oracle_users", "must be >= 0 (0: every user)")
    check(cfg.eval.transfer_finetune_epochs >= 0, "eval.transfer_finetune_epochs", "must be >= 0")
    check(cfg.eval.transfer_users >= 0 and cfg.eval.transfer_items >= 0, "eval.transfer_items",
          "eval.transfer_users/transfer_items must be >= 0 (0: as data)")
    check(cfg.eval.adaptive_eot >= 1, "eval.adaptive_eot", "must be >= 1")
    check(cfg.eval.adaptive_steps >= 0, "eval.adaptive_steps", "must be >= 0 (0: attack.pgd_steps)")
    check(cfg.eval.adaptive_items >= 0, "eval.adaptive_items", "must be >= 0 (0: every item)")
    check(cfg.eval.adaptive_oracle_users >= -1, "eval.adaptive_oracle_users",
          "must be >= -1 (0: every oracle user, -1: off)")
    check(cfg.eval.adaptive_detect_weight >= 0, "eval.adaptive_detect_weight", "must be >= 0")
    check(0.0 < cfg.defense.rand_min_frac < 1.0, "defense.rand_min_frac", "must be in (0, 1)")
    check(cfg.defense.adaptive_train_steps >= 1, "defense.adaptive_train_steps", "must be >= 1")
    check(cfg.defense.adaptive_train_eot >= 1, "defense.adaptive_train_eot", "must be >= 1")
    check(cfg.defense.temperature > 0, "defense.temperature", "must be > 0")


def eval_key(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a run folder's config.yaml)."""
    d = dict(d)
    preset = d.pop("preset", "default")
    cfg = Config(preset=preset)
    apply_overrides(cfg, _flatten(d))
    validate(cfg)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
