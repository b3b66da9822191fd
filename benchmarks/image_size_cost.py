"""CPU cost per 1,000 catalogue images of the feature pass, FGSM and one PGD step, by image size.

    PYTHONPATH=. python benchmarks/image_size_cost.py [--sizes 64,224] [--threads 1]

Runs what the pipeline runs: EfficientNet-Lite0 (packaged ImageNet weights) for the clean
feature pass; the attack path is the BN-folded NHWC copy the attack stage uses
(``nn.fuse.fast_copy``) with VBPR's BPR loss on the item's features, FGSM = one forward
+ one input-gradient backward, a PGD step the same plus the fused ``pgd_step`` update.
Reports process CPU seconds (robust on a shared machine, unlike wall time); with ``--threads
1`` this is one core's work, so 2 idle cores take about half of it in wall time.
"""
from __future__ import annotations

import argparse
import time


def cpu_seconds(fn, reps: int) -> float:
    fn()  # warm-up (allocator, one-time tracing)
    t = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t) / reps


def measure(size: int, batch: int, reps: int) -> dict:
    import torch

    from vars_fast.attacks.fgsm import FGSM
    from vars_fast.attacks.pgd import PGD
    from vars_fast.backbones import build_backbone
    from vars_fast.config import BackboneConfig
    from vars_fast.nn.fuse import fast_copy
    from vars_fast.recommenders import VBPR

    bb = build_backbone(BackboneConfig()).eval().requires_grad_(False)
    rec = VBPR(64, 256, bb.feature_dim, backbone=bb).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    rec.fit_feature_norm(bb.features(x).detach())
    fast = fast_copy(rec, x[:4])
    users, items = torch.randint(0, 64, (batch,), generator=g), torch.randint(0, 256, (batch,), generator=g)

    def loss(xa):  # push the item down for its user: one value per image, as the catalogue attack
        return -fast.score(users, items, visual=fast.encode(xa))

    with torch.no_grad():
        feat = cpu_seconds(lambda: bb.features(x), reps)
    fgsm = cpu_seconds(lambda: FGSM(loss, 8 / 255)(x), reps)
    pgd1 = cpu_seconds(lambda: PGD(loss, 8 / 255, steps=1, random_start=False)(x), reps)
    k = 1000 / batch
    return {"size": size, "features": feat * k, "fgsm": fgsm * k, "pgd_step": pgd1 * k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,224", help="comma-separated image sizes in px")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    print(f"| image size | feature pass | FGSM | one PGD step |  (CPU-s per 1k images, {a.threads} thread)")
    print("|---|---|---|---|")
    for s in (int(v) for v in a.sizes.split(",")):
        r = measure(s, a.batch, a.reps)
        print(f"| {s} px | {r['features']:.1f} | {r['fgsm']:.1f} | {r['pgd_step']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
