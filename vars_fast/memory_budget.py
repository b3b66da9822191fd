"""How much memory the defence and its evaluation need, and how much there is.

The peak of every image loop grows with the images it holds at once: at 224 px one image
through the paper's denoiser (width 64, 9 blocks) with autograd costs about 0.9 GiB, so a
loop of 64 items x 4 EOT draws does not fit a 24 GiB machine. Loops therefore size their
micro-batches from this module:

* ``image_bytes(cfg, grad=...)``: peak bytes one image adds to a loop, from the config (image
  size, denoiser width and depth, backbone), per pixel, as measured (docs/results/memory.md).
* ``available_bytes(device)``: free device memory (CUDA), or on CPU the least of the
  kernel's MemAvailable, the cgroup's headroom and ``VARS_FAST_MEMORY_GB`` (a cap for the
  whole run, e.g. on a shared machine) less this process's resident size.
* ``loop_batch(cfg, device, requested, grad=...)``: images per chunk of a purification,
  encoding or detection loop (no grad) or of an attack loop (grad).
* ``adaptive_chunks(cfg, device, requested, eot)``: items per call and the ``max_images`` bound
  of ``attacks.adaptive.AdaptivePGD`` (items x EOT draws in the graph at once).
* ``defense_lane_bytes(cfg, n_train_items)``: the peak of one defence training process.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from vars_fast.registry import BACKBONES

GiB = 1 << 30

# Peak resident growth per image per pixel (bytes), fp32 on CPU, forward + input gradient
# ("grad") or a no-grad forward ("infer"); docs/results/memory.md has the measurements and the
# command that repeats them.
_DENOISER_REF = {"width": 64, "blocks": 9, "grad": 18898, "infer": 1354}
# the denoiser's saved activations scale as width x (blocks + 2.34): fitted to the saved bytes
# of width 16 x 4 blocks and width 64 x 9 blocks (docs/results/memory.md)
_DENOISER_EXTRA_BLOCKS = 2.34
# each backbone's own figures are its BACKBONES entry's ``bytes_per_px`` (backbones.py); one
# without them is planned as the largest measured (ResNet50)
_BACKBONE_FALLBACK = "resnet50"
# a loop may plan for this share of what is available: the rest covers the allocator's
# fragmentation, the arrays the loop fills and what the measurement does not see
_LOOP_SHARE = 0.5


def _meminfo(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> Optional[int]:
    """limit - usage of this process's cgroup (v2, then v1); None when unlimited or unknown."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def rss_bytes() -> int:
    """This process's resident size now."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # an upper bound


def memory_cap() -> Optional[int]:
    """``VARS_FAST_MEMORY_GB`` in bytes (the most the whole run may hold), or None."""
    v = os.environ.get("VARS_FAST_MEMORY_GB", "").strip()
    if not v:
        return None
    try:
        return int(float(v) * GiB)
    except ValueError:
        raise ValueError(f"VARS_FAST_MEMORY_GB={v!r}: expected a number of GiB") from None


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes this process can still allocate on ``device`` without pushing the machine into swap
    or the OOM killer."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    cands = [c for c in (_meminfo("MemAvailable"), _cgroup_headroom()) if c is not None]
    cap = memory_cap()
    if cap is not None:
        cands.append(max(0, cap - rss_bytes()))
    if not cands:
        cands.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(min(cands))


def _denoiser_per_px(dcfg, kind: str) -> float:
    ref = _DENOISER_REF
    scale = (dcfg.width * (dcfg.n_res_blocks + _DENOISER_EXTRA_BLOCKS)) / (
        ref["width"] * (ref["blocks"] + _DENOISER_EXTRA_BLOCKS))
    return ref[kind] * scale


def _backbone_per_px(name: str, kind: str) -> float:
    meta = BACKBONES.meta(name) if name in BACKBONES else {}
    return (meta.get("bytes_per_px") or BACKBONES.meta(_BACKBONE_FALLBACK)["bytes_per_px"])[kind]


def image_bytes(cfg, *, grad: bool, denoiser: bool = True, backbone: bool = True) -> int:
    """Peak bytes one image at ``data.image_size`` adds to a loop that runs it through the
    denoiser and/or the backbone, with an input gradient (``grad``) or without."""
    kind = "grad" if grad else "infer"
    per_px = ((_denoiser_per_px(cfg.defense, kind) if denoiser else 0.0)
              + (_backbone_per_px(cfg.backbone.name, kind) if backbone else 0.0))
    return int(per_px * cfg.data.image_size ** 2)


def loop_batch(cfg, device, requested: int, *, grad: bool, denoiser: bool = True, backbone: bool = True,
               available: Optional[int] = None) -> int:
    """Images per chunk for a loop: ``requested`` (e.g. ``eval.batch_size``), lowered until
    the chunk's peak fits half of what is available on ``device``; at least 1."""
    avail = available_bytes(device) if available is None else available
    per = max(1, image_bytes(cfg, grad=grad, denoiser=denoiser, backbone=backbone))
    return max(1, min(int(requested), int(_LOOP_SHARE * avail // per)))


def adaptive_chunks(cfg, device, requested: int, eot: int, available: Optional[int] = None) -> tuple[int, int]:
    """(items per ``AdaptivePGD`` call, its ``max_images``) for the adaptive attack: each item
    holds one denoiser graph, each transformed copy one backbone graph; the items come first,
    then as many EOT draws per chunk as the rest of the budget holds."""
    avail = available_bytes(device) if available is None else available
    budget = _LOOP_SHARE * avail
    den = image_bytes(cfg, grad=True, backbone=False)
    bb = max(1, image_bytes(cfg, grad=True, denoiser=False))
    items = max(1, min(int(requested), int(budget // (den + bb))))
    draws = max(1, min(int(eot), int((budget - items * den) // (items * bb))))
    return items, items * draws


def defense_lane_bytes(cfg, n_train_items: int, baseline: Optional[int] = None) -> int:
    """Peak resident bytes of one process training the defence: ``baseline`` (what the process
    holds before training: catalogue, backbone, recommender; default this process's resident
    size) plus the training step's images. The largest step is an adversarial iteration with
    the detector on: the clean and adversarial views (2 per item) through the denoiser and the
    perceptual backbone with autograd, and 4 views of ``defense.contrastive_items`` items
    (0: all) through the trainable detector encoder."""
    d = cfg.defense
    B = max(1, min(int(d.batch_size), int(n_train_items)))
    n_con = min(int(d.contrastive_items) or B, B) if d.use_detector else 0
    S2 = cfg.data.image_size ** 2
    step = S2 * (2 * B * (_denoiser_per_px(d, "grad") + _backbone_per_px(cfg.backbone.name, "grad"))
                 + 4 * n_con * _backbone_per_px(cfg.backbone.name, "grad"))
    return int((rss_bytes() if baseline is None else baseline) + step)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"
