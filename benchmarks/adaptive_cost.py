"""Cost of the adaptive evaluation (``vars_fast/evaluate/adaptive.py``) at a preset's model
sizes, measured on a few items and extrapolated to the preset's catalogue.

    python benchmarks/adaptive_cost.py [--preset default] [--items 8] [--steps 2] [--eot 4] \
        [--threads 1] [--out docs/results/data/adaptive_cost.json]

The models are the preset's (denoiser, detector, VBPR on the backbone, BN-folded NHWC copies as
the evaluation uses) with random weights: the cost of a step does not depend on the weights.
Times are process CPU seconds (on a shared machine the wall clock measures the neighbours).
One adaptive PGD step on an item costs a denoiser forward+backward and the detector hinge
(``a``) plus one backbone forward+backward per EOT draw (``b``); the script times the
``denoise`` attacker (one draw, no resize-pad) and the ``denoise+rand`` attacker at 1 and
``--eot`` draws, fits ``a`` and ``b``, and prints the section's estimated CPU seconds:

    items x steps x [(a + b) + (a + eot x b)]      (both attackers, train objective)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(preset: str, n_items: int):
    from vars_fast.backbones import build_backbone
    from vars_fast.config import make_config
    from vars_fast.defense import Defense
    from vars_fast.defense.training import build_models
    from vars_fast.nn.fuse import fast_copy, folded_copy
    from vars_fast.recommenders import build_recommender

    cfg = make_config(preset, overrides={"backbone.weights": "none"})
    S = cfg.data.image_size
    bb = build_backbone(cfg.backbone).eval()
    rec = build_recommender("VBPR", 16, n_items, cfg.recommender, backbone=bb).eval()
    probe = torch.rand(4, 3, S, S)
    enc = fast_copy(rec, probe, channels_last=True)
    den, det = build_models(cfg.defense, S, bb, dict(vars(cfg.backbone)), "cpu")
    d = Defense(den.eval().to(memory_format=torch.channels_last), det.eval(), threshold=0.1,
                rand_min_frac=cfg.defense.rand_min_frac, image_size=S)
    fd, n = folded_copy(d.detector, lambda m: m.embed(probe))
    if n:
        d.detector = fd.to(memory_format=torch.channels_last)
    for p in list(enc.parameters()) + list(d.denoiser.parameters()) + list(d.detector.parameters()):
        p.requires_grad_(False)
    return cfg, enc, d


def time_attack(enc, defense, x, steps: int, eot: int, rand: bool) -> float:
    from vars_fast.attacks.adaptive import AdaptivePGD

    loss = lambda t: enc.encode(t).float().pow(2).mean(1)  # noqa: E731 - a per-item loss through the backbone
    atk = AdaptivePGD(loss, defense, 8 / 255, steps=steps, eot=eot, rand=rand, detect_weight=1.0,
                      generator=torch.Generator().manual_seed(0))
    c0 = time.process_time()
    atk(x)
    return time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--eot", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg, enc, d = build(a.preset, 64)
    S = cfg.data.image_size
    x = torch.rand(a.items, 3, S, S).contiguous(memory_format=torch.channels_last)
    time_attack(enc, d, x[:2], 1, 1, True)  # warm-up (allocator, first-call dispatch)
    per = a.items * a.steps
    det = time_attack(enc, d, x, a.steps, 1, False) / per
    r1 = time_attack(enc, d, x, a.steps, 1, True) / per
    rk = time_attack(enc, d, x, a.steps, a.eot, True) / per
    b = max((rk - r1) / max(a.eot - 1, 1), 0.0)
    base = max(r1 - b, 0.0)
    ec = cfg.eval
    steps = int(ec.adaptive.steps or cfg.attack.pgd_steps)
    N = int(ec.adaptive.items) or int(cfg.data.n_items)

    def section(eot: int, steps: int = steps) -> float:
        return N * steps * (det + base + eot * b)

    res = {"preset": a.preset, "image_size": S, "threads": a.threads, "items_timed": a.items,
           "steps_timed": a.steps, "eot_timed": a.eot,
           "cpu_s_per_item_step": {"denoise": det, "denoise+rand eot=1": r1, f"denoise+rand eot={a.eot}": rk},
           "fit": {"a_denoiser_detector": base, "b_per_draw": b},
           "catalogue_items": N, "preset_steps": steps, "preset_eot": int(ec.adaptive.eot),
           "section_cpu_s": {f"eot={k}": section(k) for k in sorted({1, 2, 4, 8, int(ec.adaptive.eot)})}}
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
