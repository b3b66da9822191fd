"""How faithful is D(clean)? Trains the full defence on a run folder and measures, after every epoch.

    python tools/denoiser_fidelity.py RUN_DIR OUT_DIR [--set defense.KEY=VALUE ...] [--pgd]
    python tools/denoiser_fidelity.py RUN_DIR --measure

``--measure`` trains nothing: it loads RUN_DIR's trained defence (checkpoints/defense.pt) and
prints the fidelity rows (``vars_fast.metrics.fidelity_rows``) on the held-out test items of
the defence split, for the clean images and every attacked catalogue in RUN_DIR/attacks, with
the patch-grid share of D(clean) - clean.

RUN_DIR is a run folder of ``python -m vars_fast.train`` after its recommender stage (it reads
the VBPR checkpoint and the catalogue cache; its config gives the defence settings, which
``--set`` overrides). The defence is trained exactly as the defense stage trains the full
variant (same split, seed and schedule), its per-epoch state in OUT_DIR. On the validation
items of the split, at initialisation and after every epoch, it prints:

* PSNR / SSIM of D(x) against x (``vars_fast.metrics``);
* the patch-grid share: the share of the residual D(x) - x power (per image and channel, mean
  removed) at the spatial frequencies of the transformer block's patch grid (multiples of
  S / patch in either axis), divided by the share those frequencies hold in white noise; 1 is
  no excess, a periodic pattern with the patch period shows as a large number;
* the mean of D(x) - x over the items (the image-independent part of the residual), as PSNR:
  high means no shared pattern;
* the recommender's mean per-item BPR loss on x and on D(x) (the restoration check's objective);
* with ``--from-state``: the residual's decomposition (``residual_decomposition``);
* with ``--pgd``, after the last epoch: the same loss on PGD-8 images and on D(PGD-8).

Prints a Markdown table; OUT_DIR/fidelity.json holds the numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch


def patch_grid_share(res: torch.Tensor, patch: int) -> float:
    """Power of ``res`` [B,3,S,S] at multiples of S/patch (either axis, DC excluded), over the
    share those bins hold under white noise."""
    S = res.shape[-1]
    r = res.double() - res.double().mean(dim=(-2, -1), keepdim=True)
    p = torch.fft.fft2(r).abs().pow(2)
    k = torch.arange(S)
    on = (k % max(S // patch, 1) == 0) if S % patch == 0 else torch.zeros(S, dtype=torch.bool)
    grid = on[:, None] | on[None, :]
    grid[0, 0] = False
    total = p.sum(dim=(-2, -1)).clamp_min(1e-30)
    share = (p[..., grid].sum(-1) / total).mean()
    return float(share / (grid.sum() / (S * S - 1)))


@torch.no_grad()
def residual_decomposition(net, x: torch.Tensor) -> dict:
    """How much of D(x) - x is one pattern shared by every image, how much of that is a constant
    colour shift (DC), and the share of pixels the output clamp cuts."""
    r = (net(x) - x).double()
    pre = (x + net.residual(x)).double()
    m = r.mean(0)
    dc = m.mean(dim=(1, 2))
    tot, shared = r.pow(2).mean().item(), m.pow(2).mean().item()
    return {"residual_mse": tot, "shared_share": shared / max(tot, 1e-30),
            "dc_share_of_shared": dc.pow(2).mean().item() / max(shared, 1e-30),
            "dc_per_channel_255": [round(v * 255, 2) for v in dc.tolist()],
            "clamped_share": ((pre < 0) | (pre > 1)).double().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--measure", action="store_true", help="measure RUN_DIR's trained defence, train nothing")
    ap.add_argument("--set", action="append", default=[], metavar="defense.KEY=VALUE")
    ap.add_argument("--pgd", action="store_true", help="also the BPR loss on PGD-8 and D(PGD-8) at the end")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--from-state", action="store_true",
                    help="train nothing: measure the last finished epoch of a run in OUT_DIR (it may be running)")
    args = ap.parse_args()

    from vars_fast.config import parse_set
    from vars_fast.defense import Defense
    from vars_fast.defense.stage import _seed
    from vars_fast.defense.training import (_batches, _ItemObjective, build_models, make_adversarial, split_items,
                                            train_defense)
    from vars_fast.attacks.untargeted import sample_item_triples
    from vars_fast.io import load_checkpoint
    from vars_fast.metrics import psnr, ssim_per_image, psnr_per_image
    from vars_fast.pipeline import Context

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        measure_run(Path(args.run_dir))
        return
    run, out = Path(args.run_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu")
    ctx = Context.open(run, {**parse_set(args.set), "run.progress": False}, device=dev,
                       log=logging.getLogger("fidelity"))
    cfg = ctx.cfg
    cat, rec, dcfg = ctx.catalogue, ctx.recommender("VBPR"), cfg.defense
    split = split_items(cat, ctx.generator("defense-split"), dcfg.train_item_frac, dcfg.val_item_frac)
    val = torch.tensor(split["val"])
    x = cat.item_batch(val, dev)
    triples = sample_item_triples(cat, dcfg.triples_per_item, torch.Generator().manual_seed(1))
    bcfg = {k: getattr(cfg.backbone, k) for k in cfg.backbone.__dataclass_fields__}
    den, _ = build_models(dataclasses_replace_no_detector(dcfg), int(cat.images.shape[-1]), ctx.backbone, bcfg, dev)
    state = out / "defense_train.pt"
    rows: list[dict] = []

    @torch.no_grad()
    def bpr(images: torch.Tensor) -> float:
        tot = 0.0
        for idx in _batches(list(range(len(val))), 64):
            tot += float(_ItemObjective(rec, triples, val[idx], dev)(images[idx]).sum())
        return tot / len(val)

    @torch.no_grad()
    def measure(epoch: int, phase: str, net) -> None:
        net.eval()
        y = torch.cat([net(x[s:s + 64]) for s in range(0, len(x), 64)])
        res = y - x
        mean_res = res.mean(0, keepdim=True)
        rows.append({"epoch": epoch, "phase": phase, "psnr": psnr(x, y),
                     "psnr_median": float(psnr_per_image(x, y).median()), "ssim": float(ssim_per_image(x, y).mean()),
                     "grid_share": patch_grid_share(res, dcfg.patch_size),
                     "shared_residual_psnr": float(10 * math.log10(1 / max(float(mean_res.pow(2).mean()), 1e-30))),
                     "bpr_clean": bpr(x), "bpr_denoised_clean": bpr(y)})
        r = rows[-1]
        print(f"epoch {epoch} [{phase}] PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f} grid {r['grid_share']:.2f} "
              f"shared-res PSNR {r['shared_residual_psnr']:.1f} BPR {r['bpr_clean']:.4f} -> "
              f"{r['bpr_denoised_clean']:.4f}", flush=True)

    def on_epoch_end(epoch: int, record: dict) -> None:
        den.load_state_dict(load_checkpoint(state)["denoiser"])
        measure(epoch, record["phase"], den)

    if args.from_state:
        st = load_checkpoint(state)
        den.load_state_dict(st["denoiser"])
        hist = st["history"]
        measure(int(st["epoch"]), hist[-1]["phase"], den)
        rows[-1].update(residual_decomposition(den.eval(), x))
        print("residual:", json.dumps({k: v for k, v in rows[-1].items() if k in (
            "residual_mse", "shared_share", "dc_share_of_shared", "dc_per_channel_255", "clamped_share")}))
        defense = Defense(den)
    else:
        measure(0, "init", den)
        defense, hist = train_defense(cat, rec, ctx.backbone, dcfg, split, backbone_cfg=bcfg, device=dev,
                                      seed=_seed(ctx, "defense-full"), state_path=state, progress=False,
                                      on_epoch_end=on_epoch_end)
    result = {"settings": args.set, "rows": rows, "history": hist}
    if args.pgd:
        adv = []
        g = torch.Generator().manual_seed(2)
        for idx in _batches(list(range(len(val))), 64):
            fn = _ItemObjective(rec, triples, val[idx], dev)
            adv.append(make_adversarial("pgd", fn, x[idx], 8.0, dcfg.train_pgd_steps, g))
        adv = torch.cat(adv)
        with torch.no_grad():
            dadv = torch.cat([defense.purify(adv[s:s + 64]) for s in range(0, len(adv), 64)])
        result["pgd"] = {"bpr_pgd": bpr(adv), "bpr_denoised_pgd": bpr(dadv), "psnr_pgd": psnr(x, adv),
                         "psnr_denoised_pgd": psnr(x, dadv)}
        print("PGD-8:", json.dumps(result["pgd"]))
    name = f"fidelity_epoch{rows[-1]['epoch']}.json" if args.from_state else "fidelity.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print("\n| epoch | phase | PSNR | SSIM | patch-grid share | shared residual PSNR | BPR clean | BPR D(clean) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['epoch']} | {r['phase']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['grid_share']:.2f} | "
              f"{r['shared_residual_psnr']:.1f} | {r['bpr_clean']:.4f} | {r['bpr_denoised_clean']:.4f} |")


@torch.no_grad()
def measure_run(run: Path) -> None:
    import numpy as np

    from vars_fast.defense import load_defense
    from vars_fast.metrics import fidelity_rows
    from vars_fast.pipeline import Context

    ctx = Context.open(run, device="cpu", log=logging.getLogger("fidelity"))
    cat = ctx.catalogue
    defense = load_defense(run / "checkpoints" / "defense.pt")
    items = torch.tensor(defense.split["test"])

    def purify(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([defense.purify(x[s:s + 64]) for s in range(0, len(x), 64)])

    clean = cat.images[items]
    den_c = purify(clean)
    attacked = {}
    for f in sorted((run / "attacks").glob("VBPR_*_eps*.npy")):
        attack, eps = f.stem.split("_")[1], float(f.stem.split("_eps")[1])
        adv = torch.from_numpy(np.load(f))[items]
        attacked[(attack, eps)] = (adv, purify(adv))
    rows = fidelity_rows(clean, den_c, attacked)
    grid = patch_grid_share(den_c - clean.float() / 255, int(defense.denoiser.kwargs()["patch_size"]))
    print(f"{len(items)} test items; patch-grid share of D(clean) - clean: {grid:.2f}\n")
    print("| attack | eps | images | PSNR (dB) | SSIM |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['eps']:g} | {r['images']} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    (run / "fidelity_rows.json").write_text(json.dumps({"patch_grid_share": grid, "rows": rows}, indent=1))


def dataclasses_replace_no_detector(dcfg):
    """The measuring copy of D needs no detector (its weights are loaded from the checkpoint)."""
    import dataclasses

    return dataclasses.replace(dcfg, use_detector=False)


if __name__ == "__main__":
    main()
