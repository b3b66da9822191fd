"""Joint training of the denoiser and the detector (Eq. 12), with the recommender frozen:

    L = lambda_rec L_VBPR(D(x')) + lambda_1 L_c + lambda_2 L_p + lambda_3 L_con

Schedule (METHOD.md "Denoiser"/"Detector"; the epoch counts are config fields):

* phase 1 (``epochs_phase1``): each iteration's input x' is clean or FGSM, 1:1, drawn per
  iteration by the seeded RNG; the detector is idle.
* phase 2 (``epochs_phase2``): clean / FGSM / PGD, 1:1:1 per iteration. The detector and the
  contrastive term join: in an adversarial iteration the batch carries both the clean view x
  and x_adv, so that the four views x, x_adv, D(x), D(x_adv) of Eq. 8 exist (clean:adv = 1:1).
* detector phase (``detector_epochs``): FGSM at ``detector_eps`` every iteration (the paper
  trains its detector on FGSM at one eps); the denoiser stays as phase 2 left it unless
  ``denoiser_in_detector_phase`` (docs/results/denoiser_fidelity.md). With ``adaptive_train.enabled``,
  FGSM and the adaptive attacker 1:1 (``make_adaptive``: PGD through the current denoiser with
  EOT and the detector hinge), so the detector also learns the images built to evade it.

Attacks are generated on the fly against the frozen recommender with the same per-item BPR
objective as the catalogue attack (``vars_fast.attacks.untargeted.item_loss``: each item's
own training triples, the other item of a triple clean), eps drawn per batch from
``train_eps``, and rounded to the uint8 grid the evaluated catalogue lives on. L_VBPR is that
same per-item BPR loss evaluated on the denoised image, *minimised*. The random resize-pad is
a test-time operation and is not used here.

Our additions, each a config field: half of the clean views get Gaussian noise with sigma
uniform in [0, ``clean_noise_sigma``] (content target: the clean image), so that the denoiser
learns to remove it and the detector learns to call noisy clean images clean (so that
Gaussian noise up to sigma 0.1 is not flagged); the detector encoder (pretrained) trains at
``encoder_lr_mult`` x the learning rate.

Eq. 12 weights (the paper's are lost; config fields): lambda_rec = 0.01, lambda_1 (content) =
1, lambda_2 (perceptual) = 0.01, lambda_3 (contrastive) = 0.1. On EfficientNet-Lite0 maps L_p
is far larger than L_c, so L_p dominates the gradient, which is what restores the
recommender's features. Both models learn only with enough updates, hence the small default
batch. The measurements behind these choices are in docs/results/defaults.md.

Resumable: after every epoch an atomic checkpoint holds the weights, the optimiser, the
epoch, the RNG state and the loss history; a killed run restarts from the last finished epoch
and reproduces the uninterrupted run (one seeded generator drives every random choice).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vars_fast.attacks.adaptive import AdaptivePGD
from vars_fast.attacks.base import frozen
from vars_fast.attacks.untargeted import item_loss, sample_item_triples
from vars_fast.config import DefenseConfig
from vars_fast.defense import Defense
from vars_fast.defense.denoiser import Denoiser
from vars_fast.defense.detector import Detector
from vars_fast.defense.losses import content_loss, contrastive_loss, perceptual_loss
from vars_fast.distributed import ddp
from vars_fast.io import load_checkpoint, save_checkpoint
from vars_fast.metrics import choose_threshold, detection_metrics
from vars_fast.nn.fuse import fast_copy
from vars_fast.registry import ATTACKS, DEFENSE_VARIANTS
from vars_fast.utils import index_batches, progress as progress_bar

LOSS_KEYS = ("total", "rec", "content", "perceptual", "contrastive")


# ---------------------------------------------------------------------------- configuration

def variant_config(dcfg: DefenseConfig, variant: str) -> DefenseConfig:
    """The config of a member of ``DEFENSE_VARIANTS`` (Table 5's ablations; ``defense.ablations``)."""
    return DEFENSE_VARIANTS[variant](dcfg)


# full_phase1: the variant's phase 1 is the full model's (it differs in fields read after phase 1
# only), so the defence stage trains it in the full model's lane, from its phase 1
@DEFENSE_VARIANTS.register("full", full_phase1=True, label="unmodified architecture")
def _full(dcfg: DefenseConfig) -> DefenseConfig:
    return dcfg


@DEFENSE_VARIANTS.register("no-detector", full_phase1=True, label="remove detection & contrastive loss")
def _no_detector(dcfg: DefenseConfig) -> DefenseConfig:
    """lambda_3 = 0 and no detector."""
    return dataclasses.replace(dcfg, use_detector=False, lambda_contrastive=0.0)


@DEFENSE_VARIANTS.register("no-perceptual", full_phase1=False, label="remove perceptual loss")
def _no_perceptual(dcfg: DefenseConfig) -> DefenseConfig:
    """lambda_2 = 0."""
    return dataclasses.replace(dcfg, use_perceptual=False, lambda_perceptual=0.0)


def epoch_plan(dcfg: DefenseConfig) -> list[dict]:
    """One entry per epoch: phase name, the input kinds drawn per iteration, detector on/off, eps list."""
    det = bool(dcfg.use_detector)
    plan = [dict(phase="clean+fgsm", kinds=["clean", "fgsm"], detector=False, eps=list(dcfg.train_eps))
            for _ in range(dcfg.epochs_phase1)]
    plan += [dict(phase="clean/fgsm/pgd", kinds=["clean", "fgsm", "pgd"], detector=det, eps=list(dcfg.train_eps))
             for _ in range(dcfg.epochs_phase2)]
    if det:
        kinds = ["fgsm", "adaptive"] if dcfg.adaptive_train.enabled else ["fgsm"]
        plan += [dict(phase="detector", kinds=kinds, detector=True, eps=detector_eps(dcfg))
                 for _ in range(dcfg.detector_epochs)]
    return plan


def detector_eps(dcfg: DefenseConfig) -> list[float]:
    """``defense.detector_eps`` as a list (a single number in older configs)."""
    e = dcfg.detector_eps
    return [float(v) for v in (e if isinstance(e, (list, tuple)) else [e])]


def split_items(cat, generator: torch.Generator, train_frac: float = 0.5, val_frac: float = 0.2) -> dict:
    """Seeded item split for the defence: {"train", "val", "test"} lists of item indices.

    Only items whose image decoded (status "ok") take part. The denoiser/detector train on
    "train", the threshold is chosen on "val", and the evaluation's detection table uses "test"
    (items the detector never saw)."""
    status = getattr(cat, "status", None) or ["ok"] * cat.n_items
    ok = torch.tensor([k for k, s in enumerate(status) if s == "ok"], dtype=torch.long)
    if ok.numel() < 3:
        raise ValueError(f"defence split: only {ok.numel()} items have an image (need >= 3)")
    perm = ok[torch.randperm(ok.numel(), generator=generator)]
    n_tr = max(1, int(round(train_frac * perm.numel())))
    n_va = max(1, int(round(val_frac * perm.numel())))
    return {"train": sorted(perm[:n_tr].tolist()), "val": sorted(perm[n_tr:n_tr + n_va].tolist()),
            "test": sorted(perm[n_tr + n_va:].tolist())}


def _config_hash(*parts) -> str:
    """16 hex digits of the SHA-1 of ``parts`` as sorted JSON: what a checkpoint's "fingerprint"
    holds, to tell whether it was made by the same configuration."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def phase1_fingerprint(dcfg: DefenseConfig, *parts) -> str:
    """What determines the state after phase 1 (with the seed, split, image size, backbone in
    ``parts``): every ``DefenseConfig`` field except those tagged as read after phase 1 only
    (``config.defense._after_phase1``)."""
    values = dataclasses.asdict(dcfg)
    return _config_hash({f.name: values[f.name] for f in dataclasses.fields(dcfg) if f.metadata.get("phase1", True)},
                        *parts)


# ---------------------------------------------------------------------------- attacks / checks

class _ItemObjective:
    """The catalogue attack's per-item BPR objective (``vars_fast.attacks.untargeted.item_loss``)
    for a batch of items ``idx`` [B] with their sampled triples; ``__call__(x [B,3,S,S]) -> [B]``.

    ``from_visual(f [B,F])`` evaluates it from precomputed visual features, so that the
    training loop can take the features and the perceptual maps from one backbone pass.
    """

    def __init__(self, rec, triples, idx: Tensor, device):
        d = lambda t: t[idx.cpu()].to(device)  # noqa: E731
        self.rec, self.items = rec, idx.to(device)
        self.users, others, self.sign = d(triples.users), d(triples.others), d(triples.sign)
        B, m = self.users.shape
        with torch.no_grad():  # the other item of each triple keeps its clean cached visual
            self.s_other = rec.score(self.users.reshape(-1), others.reshape(-1)).float().view(B, m)

    def __call__(self, x: Tensor) -> Tensor:
        return item_loss(self.rec, x, self.users, self.items, self.s_other, self.sign)

    def from_visual(self, f: Tensor) -> Tensor:
        B, m = self.users.shape
        s_k = self.rec.score(self.users.reshape(-1), self.items.repeat_interleave(m),
                             visual=f.repeat_interleave(m, dim=0)).float().view(B, m)
        return F.softplus(-self.sign * (s_k - self.s_other)).mean(1)


def make_adversarial(kind: str, loss_fn, x: Tensor, eps255: float, pgd_steps: int,
                     generator: Optional[torch.Generator]) -> Tensor:
    """x [B,3,S,S] -> the ``ATTACKS`` member ``kind`` (fgsm; pgd with a random start) against
    ``loss_fn``, on the uint8 grid."""
    eps = float(eps255) / 255.0
    x_adv = ATTACKS[kind].craft(loss_fn, x, eps, steps=pgd_steps, random_start=True, generator=generator)
    # the evaluated catalogue is uint8: train on what the denoiser will see
    return torch.minimum(torch.maximum(torch.round(x_adv * 255) / 255, x - eps), x + eps).clamp_(0, 1)


def make_adaptive(loss_fn, x: Tensor, den, det, dcfg: DefenseConfig, eps255: float, image_size: int,
                  generator: Optional[torch.Generator]) -> Tensor:
    """The detector phase's adaptive view (``defense.adaptive_train.enabled``): AdaptivePGD through the
    current denoiser with EOT over the resize-pad and the detector hinge, on the uint8 grid.

    The threshold does not exist yet (it is calibrated after training), so the hinge's target
    is the mean detector distance of the clean batch: the attacker aims to look like a typical
    clean image to the detector as it is now."""
    eps = float(eps255) / 255.0
    with torch.no_grad():
        tau = float(det.distance(x, den(x)).float().mean())
    view = SimpleNamespace(denoiser=den, detector=det, threshold=max(tau, 1e-6),
                           rand_min_frac=dcfg.rand_min_frac, image_size=image_size)
    x_adv = AdaptivePGD(loss_fn, view, eps, steps=int(dcfg.adaptive_train.steps), eot=int(dcfg.adaptive_train.eot),
                        rand=True, detect_weight=float(dcfg.adaptive_train.weight), generator=generator)(x)
    return torch.minimum(torch.maximum(torch.round(x_adv * 255) / 255, x - eps), x + eps).clamp_(0, 1)


@torch.no_grad()
def calibrate_threshold(defense: Defense, rec, cat, items: list[int], dcfg: DefenseConfig,
                        generator: torch.Generator, device, batch_size: int = 64) -> tuple[float, dict]:
    """Choose the detector threshold on held-out items: distances of the clean images vs their
    FGSM images at ``detector_eps`` (the detector's training attack; with several eps, batch k
    uses the k-th, cycling, so every eps is equally represented), rule ``threshold_rule``
    (``vars_fast.metrics.choose_threshold``; default Youden's J = max TPR - FPR, the ROC point
    farthest above the chance diagonal). Returns (threshold, detection metrics on those items)."""
    triples = sample_item_triples(cat, dcfg.triples_per_item, generator)
    d_clean, d_adv = [], []
    eps = detector_eps(dcfg)
    for k, idx in enumerate(index_batches(items, max(1, min(batch_size, len(items) // len(eps))))):
        x = cat.item_batch(idx, device)
        x_adv = make_adversarial("fgsm", _ItemObjective(rec, triples, idx, device), x, eps[k % len(eps)], 1, None)
        d_clean.append(defense.distance(x).float().cpu())
        d_adv.append(defense.distance(x_adv).float().cpu())
    dc, da = torch.cat(d_clean), torch.cat(d_adv)
    thr = float(choose_threshold(dc, da, rule=dcfg.threshold_rule))
    m = detection_metrics(dc, da, thr)
    return thr, {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in m.items()}


@torch.no_grad()
def restoration_check(defense: Defense, rec, cat, items: list[int], dcfg: DefenseConfig,
                      generator: torch.Generator, device, eps255: float = 8.0, batch_size: int = 64) -> dict:
    """Does D undo the attack for the recommender? Mean per-item BPR loss (the attack's
    objective) on held-out items for clean, D(clean), FGSM, D(FGSM), PGD, D(PGD) at ``eps255``."""
    triples = sample_item_triples(cat, dcfg.triples_per_item, generator)
    sums = dict.fromkeys(["clean", "denoised_clean", "fgsm", "denoised_fgsm", "pgd", "denoised_pgd"], 0.0)
    n = 0
    for idx in index_batches(items, batch_size):
        x = cat.item_batch(idx, device)
        fn = _ItemObjective(rec, triples, idx, device)
        views = {"clean": x, "fgsm": make_adversarial("fgsm", fn, x, eps255, 1, None),
                 "pgd": make_adversarial("pgd", fn, x, eps255, dcfg.train_pgd_steps, generator)}
        for k, v in views.items():
            sums[k] += float(fn(v).sum())
            sums[f"denoised_{k}"] += float(fn(defense.purify(v)).sum())
        n += idx.numel()
    return {k: v / max(n, 1) for k, v in sums.items()} | {"eps": eps255, "items": n}


# ---------------------------------------------------------------------------- training

def _rec_and_perceptual(rec, backbone, fn: _ItemObjective, x: Tensor, out: Tensor, n_views: int,
                        perceptual: bool) -> tuple[Tensor, Tensor]:
    """L_VBPR and L_p of the denoised views ``out`` [n_views*B,3,S,S] against the clean x [B,...].

    When the recommender's visual features come from the perceptual backbone itself (VBPR,
    AMR), one trunk pass gives both the stage maps and the pooled features, which saves one
    of the three backbone passes of a phase-1 step (docs/results/defaults.md)."""
    zero = out.new_zeros((), dtype=torch.float32)
    if perceptual:
        with torch.no_grad():  # the clean maps once, shared by every view
            x_maps = [m.repeat(n_views, 1, 1, 1) for m in backbone.stages(x)]
    if perceptual and getattr(rec, "backbone", None) is backbone and hasattr(backbone, "_trunk"):
        last, maps = backbone._trunk(out, keep_stages=False)
        l_rec = sum(fn.from_visual(f).mean() for f in last.mean(dim=(2, 3)).chunk(n_views)) / n_views
        l_p = sum(F.mse_loss(b.float(), a.float()) for a, b in zip(x_maps, maps))
        return l_rec, l_p
    l_rec = sum(fn(o).float().mean() for o in out.chunk(n_views)) / n_views
    l_p = perceptual_loss(backbone, x.repeat(n_views, 1, 1, 1), out, x_maps=x_maps) if perceptual else zero
    return l_rec, l_p


def build_models(dcfg: DefenseConfig, image_size: int, backbone, backbone_cfg: dict, device):
    """Fresh denoiser (+ detector whose encoder is a trainable copy of ``backbone``)."""
    den = Denoiser(width=dcfg.width, n_res_blocks=dcfg.n_res_blocks, norm=dcfg.norm, patch_size=dcfg.patch_size,
                   heads=dcfg.heads, embed_dim=dcfg.embed_dim, mlp_ratio=dcfg.mlp_ratio, image_size=image_size,
                   unpatchify=getattr(dcfg, "unpatchify", "pixel"),
                   zero_mean_residual=getattr(dcfg, "zero_mean_residual", False))
    det = None
    if dcfg.use_detector:
        enc = backbone.trainable_copy() if hasattr(backbone, "trainable_copy") else None
        det = Detector(backbone_cfg, dcfg.proj_hidden, dcfg.proj_dim, encoder=enc)
    return den.to(device), (det.to(device) if det is not None else None)


def _initial_models(dcfg: DefenseConfig, image_size: int, backbone, backbone_cfg: dict, device,
                    seed: int, init_denoiser: Optional[Denoiser]):
    """The models training starts from: fresh ones seeded with ``seed`` (the global RNG stream
    left as it was), the denoiser replaced by a trainable copy of ``init_denoiser`` when given."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global stream
        torch.manual_seed(seed)
        den, det = build_models(dcfg, image_size, backbone, backbone_cfg, device)
    if init_denoiser is not None:
        den = copy.deepcopy(init_denoiser).to(device=device, memory_format=torch.contiguous_format)
        den.requires_grad_(True)
    return den, det


def _fast_frozen(rec, backbone, cat, train_items, device):
    """(rec, backbone) for the frozen paths: the recommender and its backbone are frozen here, so
    attack generation, L_VBPR and L_p run on a BN-folded NHWC copy (nn/fuse.py; same function to
    ~1e-5, checked on real images, the original kept otherwise). The detector encoder was copied
    from the original backbone before, so its BatchNorms still train."""
    shared = getattr(rec, "backbone", None) is backbone
    probe = torch.tensor(list(train_items)[:4] or [0], dtype=torch.long)
    fast = fast_copy(rec, cat.item_batch(probe, device))
    if fast is not rec:
        rec = fast
        if shared:
            backbone = fast.backbone
    return rec, backbone


class _Trainer:
    """The state of one ``train_defense`` call: the models and their Adam, the generator that
    drives every random choice (one stream, so that a resumed run reproduces the uninterrupted
    one), the history so far, and the frozen recommender and backbone they train against.
    ``start`` is the first epoch of ``plan`` still to train."""

    def __init__(self, cat, rec, backbone, dcfg: DefenseConfig, den: Denoiser, det: Optional[Detector], *,
                 device: torch.device, seed: int, log, desc: str):
        self.cat, self.rec, self.backbone, self.dcfg, self.den, self.det = cat, rec, backbone, dcfg, den, det
        self.device, self.log, self.desc = device, log, desc
        self.image_size = int(cat.images.shape[-1])
        self.plan = epoch_plan(dcfg)
        groups = [{"params": list(den.parameters()), "lr": dcfg.lr}]
        if det is not None:
            groups += [{"params": list(det.head.parameters()), "lr": dcfg.lr},
                       {"params": list(det.encoder.parameters()), "lr": dcfg.lr * dcfg.encoder_lr_mult}]
        self.n_den = len(groups[0]["params"])  # the denoiser group is group 0, its parameters are 0..n_den-1
        self.opt = torch.optim.Adam(groups)
        self.gen = torch.Generator().manual_seed(seed)
        self.history: list[dict] = []
        self.start = 0
        self.lam_p = dcfg.lambda_perceptual if dcfg.use_perceptual else 0.0
        self.use_amp, self.den_fwd, self.det_fwd = False, den, (det.project if det is not None else None)

    # ------------------------------------------------------------ where training starts
    def resume(self, path, fingerprint: str) -> None:
        """Continue after the last finished epoch of the checkpoint ``path`` when the same
        configuration (``fingerprint``) made it."""
        st = load_checkpoint(path)
        if st.get("fingerprint") != fingerprint:
            if self.log:
                self.log.info(f"{self.desc}: {path} was made by another configuration; training from scratch")
            return
        self.den.load_state_dict(st["denoiser"])
        if self.det is not None:
            self.det.load_state_dict(st["detector"])
        self.opt.load_state_dict(st["optimizer"])
        self.gen.set_state(st["rng"])
        self.history, self.start = list(st["history"]), int(st["epoch"])
        if self.log and self.start < len(self.plan):
            self.log.info(f"{self.desc}: resuming from {path} after epoch {self.start}/{len(self.plan)}")

    def reuse_phase1(self, path, fingerprint: str) -> None:
        """Start after phase 1 from the state in ``path`` when an identical phase 1
        (``phase1_fingerprint``) wrote it: the denoiser, its Adam state, the RNG, the history."""
        st = load_checkpoint(path)
        if st.get("fingerprint") != fingerprint:
            if self.log:
                self.log.info(f"{self.desc}: {path} holds another phase-1 configuration; training phase 1")
            return
        n_p1 = int(self.dcfg.epochs_phase1)
        self.den.load_state_dict(st["denoiser"])
        o = self.opt.state_dict()
        o["state"].update({int(k): v for k, v in st["optimizer_state"].items()})
        o["param_groups"][0].update({k: v for k, v in st["optimizer_group"].items() if k != "params"})
        self.opt.load_state_dict(o)
        self.gen.set_state(st["rng"])
        self.history, self.start = list(st["history"]), n_p1
        if self.log:
            self.log.info(f"{self.desc}: phase 1 ({n_p1} epochs) taken from {path} (identical phase-1 config)")

    def prepare(self, amp: bool, compile: bool) -> None:
        """bf16 autocast on GPUs only (fp32 on CPU), compiled forwards when asked, the recommender
        in eval mode."""
        self.use_amp = amp and self.device.type == "cuda"
        if compile:
            self.den_fwd = torch.compile(self.den, dynamic=False)
            self.det_fwd = torch.compile(self.det.project, dynamic=False) if self.det is not None else None
        self.rec.eval()

    # ------------------------------------------------------------ checkpoints
    def save(self, path, fingerprint: str, epochs_done: int) -> None:
        """The resumable checkpoint after ``epochs_done`` epochs."""
        save_checkpoint({"fingerprint": fingerprint, "epoch": epochs_done, "denoiser": self.den.state_dict(),
                         "detector": self.det.state_dict() if self.det is not None else None,
                         "optimizer": self.opt.state_dict(), "rng": self.gen.get_state(), "history": self.history},
                        path)

    def save_phase1(self, path, fingerprint: str) -> None:
        """The state after phase 1 that ``reuse_phase1`` reads (the denoiser's part of Adam only)."""
        o = self.opt.state_dict()
        save_checkpoint({"fingerprint": fingerprint, "denoiser": self.den.state_dict(),
                         "optimizer_state": {k: v for k, v in o["state"].items() if int(k) < self.n_den},
                         "optimizer_group": {k: v for k, v in o["param_groups"][0].items() if k != "params"},
                         "rng": self.gen.get_state(), "history": self.history}, path)

    # ------------------------------------------------------------ training
    def epoch(self, epoch: int, train_items: list[int], progress: bool) -> dict:
        """Train epoch ``epoch`` of the plan; appends its record (mean losses, seconds) to the
        history and returns it."""
        ep, dcfg, gen = self.plan[epoch], self.dcfg, self.gen
        # the detector phase trains the detector only unless told otherwise: its FGSM reaches
        # eps 64, which D cannot undo, and its content loss there taught D to blur and tint
        # clean images (docs/results/denoiser_fidelity.md)
        train_den = ep["phase"] != "detector" or bool(getattr(dcfg, "denoiser_in_detector_phase", False))
        self.den.train(train_den)
        self.den.requires_grad_(train_den)
        if self.det is not None:
            self.det.train()
        triples = sample_item_triples(self.cat, dcfg.triples_per_item, gen)
        order = torch.tensor(train_items)[torch.randperm(len(train_items), generator=gen)]
        B = min(int(dcfg.batch_size), len(train_items))
        n_iter = len(train_items) // B  # drop the last partial batch: fixed shapes, no recompiles
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        t0, c0 = time.perf_counter(), time.process_time()
        bar = progress_bar(range(n_iter), desc=f"{self.desc} {epoch + 1}/{len(self.plan)} {ep['phase']}",
                           enabled=progress)
        for it in bar:
            vals = self.step(ep, triples, ddp.shard(order[it * B:(it + 1) * B]), train_den)
            for k in LOSS_KEYS:
                sums[k] += vals[k]
            bar.set_postfix({k[:4]: f"{v:.4f}" for k, v in vals.items()})
        bar.close()
        secs = time.perf_counter() - t0
        # cpu_s (process CPU time) is what the epoch costs on an idle machine; wall time on a shared one is noise
        record = {"epoch": epoch + 1, "phase": ep["phase"], "seconds": secs, "cpu_s": time.process_time() - c0,
                  "it_per_s": n_iter / max(secs, 1e-9), **{k: sums[k] / max(n_iter, 1) for k in LOSS_KEYS}}
        self.history.append(record)
        if self.log:
            self.log.info(f"{self.desc} epoch {epoch + 1}/{len(self.plan)} [{ep['phase']}] "
                          + " ".join(f"{k}={record[k]:.4f}" for k in LOSS_KEYS)
                          + f" ({secs:.1f}s wall, {record['cpu_s']:.1f}s cpu, {record['it_per_s']:.2f} it/s)")
        return record

    def step(self, ep: dict, triples, idx: Tensor, train_den: bool) -> dict:
        """One iteration on items ``idx``: draw the input kind and eps, make the views, one Adam
        step on Eq. 12. Returns the loss values (``LOSS_KEYS``)."""
        dcfg, gen = self.dcfg, self.gen
        kind = ep["kinds"][int(torch.randint(len(ep["kinds"]), (1,), generator=gen))]
        eps255 = ep["eps"][int(torch.randint(len(ep["eps"]), (1,), generator=gen))]
        x = self.cat.item_batch(idx, self.device)
        fn = _ItemObjective(self.rec, triples, idx, self.device)
        x_adv = self._adversarial(kind, fn, x, eps255)
        x_c = self._clean_view(x)
        contrast = ep["detector"] and x_adv is not None and self.det is not None and dcfg.lambda_contrastive > 0
        views = [x_c] if x_adv is None else ([x_c, x_adv] if contrast else [x_adv])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            out = self.den_fwd(torch.cat(views))
            parts = self._losses(fn, x, out, len(views), (x_c, x_adv) if contrast else None)
        total = (dcfg.lambda_rec * parts["rec"] + dcfg.lambda_content * parts["content"]
                 + self.lam_p * parts["perceptual"] + dcfg.lambda_contrastive * parts["contrastive"])
        lam_id = float(getattr(dcfg, "lambda_identity", 0.0))
        if lam_id > 0 and views[0] is x_c and train_den:  # the clean view is the first one when present
            # D(clean) = clean, weighted apart from the adversarial views: with L_p and L_VBPR
            # dominating, D learned one image-independent pattern that moves every item's
            # features, attacked or not (docs/results/denoiser_fidelity.md)
            total = total + lam_id * content_loss(x, out[:x.shape[0]])
        self.opt.zero_grad(set_to_none=True)
        if total.requires_grad:  # not when the only trained module (D) is frozen and L_con is off
            total.backward()
        ddp.sync_grads(self.den)
        if self.det is not None:
            ddp.sync_grads(self.det)
        self.opt.step()
        parts["total"] = total
        return {k: float(parts[k].detach()) for k in LOSS_KEYS}

    def _adversarial(self, kind: str, fn: _ItemObjective, x: Tensor, eps255: float) -> Optional[Tensor]:
        """The adversarial view of x for input kind ``kind`` (None for "clean"), made against the
        frozen recommender."""
        with frozen(self.rec):
            if kind == "adaptive":  # the denoiser and detector frozen (eval mode) for the attack only
                with frozen(self.den, self.det):
                    return make_adaptive(fn, x, self.den, self.det, self.dcfg, eps255, self.image_size, self.gen)
            if kind == "clean":
                return None
            return make_adversarial(kind, fn, x, eps255, self.dcfg.train_pgd_steps, self.gen)

    def _clean_view(self, x: Tensor) -> Tensor:
        """x with Gaussian noise on half the items (sigma uniform in [0, clean_noise_sigma]; the
        module docstring says why)."""
        gen, device = self.gen, self.device
        sig = torch.rand(x.shape[0], generator=gen) * self.dcfg.clean_noise_sigma
        sig = torch.where(torch.rand(x.shape[0], generator=gen) < 0.5, sig, torch.zeros_like(sig))
        return (x + sig.view(-1, 1, 1, 1).to(device) * torch.randn(x.shape, generator=gen).to(device)).clamp(0, 1)

    def _losses(self, fn: _ItemObjective, x: Tensor, out: Tensor, n_views: int,
                contrast_views: Optional[tuple[Tensor, Tensor]]) -> dict:
        """Eq. 12's terms for the denoised views ``out`` of the clean x; L_con on
        ``contrast_views`` = (clean view, adversarial view) when the detector trains, else 0."""
        dcfg = self.dcfg
        parts = {"content": content_loss(x.repeat(n_views, 1, 1, 1), out)}
        parts["rec"], parts["perceptual"] = _rec_and_perceptual(self.rec, self.backbone, fn, x, out, n_views,
                                                                self.lam_p > 0)
        if contrast_views is None:
            parts["contrastive"] = out.new_zeros(())
            return parts
        x_c, x_adv = contrast_views
        # on the first n_con items only: the trainable encoder is the costliest part
        n_con = min(int(dcfg.contrastive_items) or x.shape[0], x.shape[0])
        o_c, o_a = out.chunk(2)
        z = self.det_fwd(torch.cat([x_c[:n_con], x_adv[:n_con], o_c[:n_con], o_a[:n_con]])).float().chunk(4)
        parts["contrastive"] = contrastive_loss(*z, dcfg.temperature, share_negatives=dcfg.share_negatives)
        return parts


def train_defense(cat, rec, backbone, dcfg: DefenseConfig, split: dict, *, backbone_cfg: dict, device,
                  seed: int = 0, state_path: Optional[str | Path] = None, amp: bool = False, compile: bool = False,
                  progress: bool = True, log=None, desc: str = "defense",
                  phase1_path: Optional[str | Path] = None,
                  on_epoch_end: Optional[Callable[[int, dict], None]] = None,
                  init_denoiser: Optional[Denoiser] = None) -> tuple[Defense, list[dict]]:
    """Train per Eq. 12 and the schedule above; returns (Defense without threshold, history).

    ``state_path``: the resumable per-epoch checkpoint (resumed when it exists and was made by
    the same configuration; a finished one skips training). ``backbone``: the frozen backbone
    of the recommender, used by the perceptual loss and copied for the detector encoder.
    ``on_epoch_end(epoch, record)`` runs after each epoch's checkpoint (tests kill there).
    ``init_denoiser``: a trained denoiser whose copy is trained instead of a fresh one
    (fine-tuning on another catalogue; the original is left untouched).
    ``phase1_path``: the state after phase 1 (denoiser, its Adam state, RNG, history) is
    written there, and a run whose phase 1 would be identical (same ``phase1_fingerprint``:
    seed, split and every field that acts in phase 1) starts from it instead of retraining
    it. The detector is idle in phase 1 (no forward, no gradient, Adam skips it), so with and
    without a detector phase 1 is the same computation.
    """
    device = torch.device(device)
    image_size = int(cat.images.shape[-1])
    den, det = _initial_models(dcfg, image_size, backbone, backbone_cfg, device, seed, init_denoiser)
    if getattr(dcfg, "fast_frozen", True):
        rec, backbone = _fast_frozen(rec, backbone, cat, split["train"], device)
    t = _Trainer(cat, rec, backbone, dcfg, den, det, device=device, seed=seed, log=log, desc=desc)
    fp = _config_hash(dataclasses.asdict(dcfg), image_size, backbone_cfg, seed, split["train"])
    p1fp = phase1_fingerprint(dcfg, image_size, backbone_cfg, seed, split["train"], str(device.type))
    n_p1, n_epochs = int(dcfg.epochs_phase1), len(t.plan)
    if state_path is not None and Path(state_path).is_file():
        t.resume(state_path, fp)
    if phase1_path is not None and t.start == 0 and 0 < n_p1 < n_epochs and Path(phase1_path).is_file():
        t.reuse_phase1(phase1_path, p1fp)
    t.prepare(amp, compile)
    train_items = list(split["train"])
    for epoch in range(t.start, n_epochs):
        record = t.epoch(epoch, train_items, progress)
        if state_path is not None and ddp.is_main():
            t.save(state_path, fp, epoch + 1)
        if phase1_path is not None and epoch + 1 == n_p1 and n_p1 < n_epochs and ddp.is_main():
            t.save_phase1(phase1_path, p1fp)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    den.requires_grad_(True)
    defense = Defense(den, det, rand_min_frac=dcfg.rand_min_frac, image_size=image_size, backbone=backbone_cfg,
                      extra={"split": split, "history": t.history})
    return defense, t.history
