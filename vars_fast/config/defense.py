"""``defense``: our denoiser + detector and their training, with the sub-sections of the
adaptive hardening (``defense.adaptive_train``) and the ADDITION baseline
(``defense.addition``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _after_phase1(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A ``DefenseConfig`` field that phase 1 of defence training (denoiser only, detector
    idle) never reads: configs that differ only in such fields share their phase-1 result
    (``defense.training.phase1_fingerprint``). Untagged fields count, so a new field disables
    sharing until it is tagged, instead of breaking it."""
    return field(default=default, metadata={"phase1": False}, **kw)


@dataclass
class AdaptiveTrainConfig:
    enabled: bool = False  # every other detector-phase iteration attacks through the defence
    steps: int = 3  # AdaptivePGD steps of that attacker
    eot: int = 2  # random resize-pad draws it averages per step
    weight: float = 1.0  # the hinge's weight in that attacker's loss


@dataclass
class AdditionConfig:
    # the paper's criterion (flag a score change above this share), the users whose scores it
    # compares (seeded subset), the range of its noise-level network, the size of its FFDNet-like
    # denoiser and its training; measured in docs/results/addition.md
    change: float = 0.2
    users: int = 256
    sigma_min: float = 0.005
    sigma_max: float = 0.15
    hidden: int = 64  # noise-level MLP width
    width: int = 48
    depth: int = 5
    train_eps: list = field(default_factory=lambda: [8, 16, 32])  # FGSM training examples, /255
    triples_per_item: int = 4
    denoiser_epochs: int = 3  # its loss settles after the first (docs/results/addition.md)
    noise_epochs: int = 3  # clean levels settle by the second (docs/results/addition.md)
    joint: bool = True  # the denoiser keeps training with the noise-level network (stage 2)
    batch_size: int = 8
    lr: float = 1e-3
    lambda_score: float = 1.0  # recommender-guided term of the denoiser loss
    lambda_sigma: float = 0.01  # preference for the smallest sufficient noise


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
    # how the detection threshold is chosen on the validation items (metrics.choose_threshold)
    threshold_rule: str = _after_phase1("youden")
    # adversarial training of the pair against the adaptive attacker: in the detector phase,
    # every other iteration's adversarial view is AdaptivePGD through the current denoiser
    # (EOT over the resize-pad) with the detector hinge, so the detector learns the images
    # that evade it (defense/training.py; docs/results/adaptive_hardening.md)
    adaptive_train: AdaptiveTrainConfig = _after_phase1(default_factory=AdaptiveTrainConfig)
    # random resize-pad at inference (OURS-rand)
    rand_min_frac: float = _after_phase1(0.85)  # r' drawn uniformly in [rand_min_frac * r, r)
    # the ADDITION baseline (defense/addition/), trained and compared by the evaluation; no
    # part of our defence's training
    addition: AdditionConfig = _after_phase1(default_factory=AdditionConfig)
