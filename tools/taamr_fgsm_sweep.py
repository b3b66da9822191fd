"""TAaMR-FGSM on a finished run: the single signed step at many eps, and what it does.

    python tools/taamr_fgsm_sweep.py RUN_DIR [--eps 1,2,3,4,6,8,12,16,24,32]

RUN_DIR is a run folder of ``python -m vars_fast.train`` after its attack stage (it reads the
VBPR checkpoint, the catalogue cache and ``attacks/targets.json``). For each eps it takes one
FGSM step of eps/255 along sign(grad log p(target class)) from the clean target images (one
gradient, shared by every eps: FGSM at eps is that step), quantises like the attack stage, and
prints the attack's own objective (mean log p of the target class), the share of targets the
classifier puts in that class, and the VBPR prediction shift (Eq. 13). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--eps", default="1,2,3,4,6,8,12,16,24,32")
    args = ap.parse_args()

    import torch

    from vars_fast.attacks.base import quantize_within
    from vars_fast.attacks.stage import _encode
    from vars_fast.attacks.taamr import taamr_loss
    from vars_fast.attacks.targeted import target_scores, targeted_metrics
    from vars_fast.pipeline import Context

    run = Path(args.run_dir)
    ctx = Context.open(run, {"run.progress": False}, device="cpu", log=logging.getLogger("sweep"))
    cat, rec, bb = ctx.catalogue, ctx.recommender("VBPR"), ctx.backbone
    meta = json.loads((run / "attacks" / "targets.json").read_text())
    targets, tc = torch.tensor(meta["targets"]), int(meta["target_class"])
    with torch.no_grad():
        before = target_scores(rec, targets, rec.item_visual[targets], cat.n_users)
    x = cat.item_batch(targets, "cpu")
    loss = taamr_loss(bb, tc)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(xr).sum(), xr)
    print(f"{len(targets)} targets, ImageNet class {tc}; clean: mean log p {loss(x).mean().item():.2f}, "
          f"in class {(bb.classify(x).argmax(1) == tc).float().mean().item():.2f}\n")
    print("| eps (/255) | mean log p(target class) | share in target class | prediction shift |")
    print("|---|---|---|---|")
    for e in [float(v) for v in args.eps.split(",")]:
        adv = quantize_within((x + e / 255 * g.sign()).clamp(0, 1), cat.images[targets], e)
        xa = adv.float() / 255
        with torch.no_grad():
            obj = loss(xa).mean().item()
            hit = (bb.classify(xa).argmax(1) == tc).float().mean().item()
            after = target_scores(rec, targets, _encode(ctx, rec, adv), cat.n_users)
        shift = targeted_metrics(rec, cat, targets, before, after)["prediction_shift"]
        print(f"| {e:g} | {obj:.2f} | {hit:.2f} | {shift:.3f} |", flush=True)


if __name__ == "__main__":
    main()
