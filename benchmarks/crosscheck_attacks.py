"""Cross-check vars_fast's APGD and Square attacks against torchattacks' on the same model and data.

    pip install --no-deps torchattacks        # or '.[crosscheck-attacks]'; optional, never a runtime dependency
    python benchmarks/crosscheck_attacks.py   # writes benchmarks/results/crosscheck_attacks.md
    python benchmarks/crosscheck_attacks.py --eps 4,8,16 --steps 100 --queries 5000 --n 1000

A small CNN (three convs, ``--size`` px) is trained for a few epochs on a synthetic 10-class
task (each class a smooth random colour pattern, samples = pattern + noise), then both
libraries attack the same held-out samples at the same L-inf eps and budget:

* APGD, cross-entropy, ``--steps`` iterations, ``--restarts`` restarts: ours
  (``vars_fast.attacks.APGD``, maximising the per-sample CE) and ``torchattacks.APGD``
  (``loss='ce'``). Robust accuracy of each one's adversarial images (torchattacks keeps any
  iterate that misclassifies; ours keeps the highest-loss iterate); the mean CE each reaches
  (torchattacks' ``perturb(best_loss=True)``, its highest-loss iterate, so both are the same
  quantity).
* Square, ``--queries`` queries: ours (``vars_fast.attacks.Square`` maximising the margin
  ``max_{j != y} z_j - z_y``) and ``torchattacks.Square`` (``loss='margin'``, p_init 0.8,
  which stops on a sample once it is misclassified). Robust accuracy.
* For reference: our PGD (same steps, Madry's step, best iterate) and uniform noise of the same
  eps.

The agreement column is the difference in robust accuracy with its binomial standard error
(two attacks that find the same adversarial examples differ by noise only). Times are wall
seconds on this machine's CPU threads at the load of the moment (on a shared machine they
compare nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eps", default="8", help="L-inf radii in /255, comma-separated (default 8)")
    p.add_argument("--steps", type=int, default=100, help="APGD / PGD iterations (default 100)")
    p.add_argument("--restarts", type=int, default=1, help="APGD restarts (default 1)")
    p.add_argument("--queries", type=int, default=1000, help="Square queries (default 1000)")
    p.add_argument("--n", type=int, default=256, help="attacked test samples (default 256)")
    p.add_argument("--size", type=int, default=16, help="image side in px (default 16)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of the CNN (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "crosscheck_attacks.md"))
    return p.parse_args(argv)


def synthetic(n: int, size: int, generator, protos=None):
    """n samples of 10 classes: a class's smooth colour pattern (4x4 upsampled) plus noise, in [0,1]."""
    import torch
    import torch.nn.functional as F

    if protos is None:
        protos = F.interpolate(torch.rand(10, 3, 4, 4, generator=generator), size=size, mode="bilinear",
                               align_corners=False)
    y = torch.randint(0, 10, (n,), generator=generator)
    x = (0.6 * protos[y] + 0.2 + 0.25 * torch.randn(n, 3, size, size, generator=generator)).clamp(0, 1)
    return x, y, protos


def train_cnn(size: int, epochs: int, seed: int):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y, protos = synthetic(4000, size, g)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0], 128):
            i = perm[s:s + 128]
            loss = nn.functional.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False), protos, g


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed: pip install --no-deps torchattacks (or the crosscheck-attacks extra)")
        return 2
    from vars_fast.attacks import APGD, PGD, Square, frozen

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    net, protos, g = train_cnn(args.size, args.epochs, args.seed)
    train_s = time.perf_counter() - t0
    x, y, _ = synthetic(args.n, args.size, g, protos)
    with torch.no_grad():
        clean_acc = float((net(x).argmax(1) == y).float().mean())

    def ce(t):
        return F.cross_entropy(net(t), y, reduction="none")

    def margin(t):  # max_{j != y} z_j - z_y: > 0 where misclassified
        z = net(t)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        return z.scatter(1, y[:, None], -math.inf).max(1).values - z_y

    def acc(t):
        with torch.no_grad():
            return float((net(t).argmax(1) == y).float().mean())

    def mean(f, t):
        with torch.no_grad():
            return float(f(t).mean())

    def timed(fn):
        s = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - s

    rows = []
    n = x.shape[0]
    for eps255 in [float(e) for e in args.eps.split(",")]:
        eps = eps255 / 255
        gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
        with frozen(net):
            ours_apgd, t_oa = timed(lambda: APGD(ce, eps, steps=args.steps, n_restarts=args.restarts,
                                                 generator=gen())(x))
            ta = torchattacks.APGD(net, norm="Linf", eps=eps, steps=args.steps, n_restarts=args.restarts,
                                   seed=args.seed, loss="ce", eot_iter=1, rho=0.75)
            ta_adv, t_ta = timed(lambda: ta(x, y))
            torch.manual_seed(args.seed)
            _, ta_best = ta.perturb(x, y, best_loss=True)
            ours_pgd, t_op = timed(lambda: PGD(ce, eps, steps=args.steps, keep_best=True, generator=gen())(x))
            sq = Square(margin, eps, n_queries=args.queries, p_init=0.8, generator=gen())
            ours_sq, t_os = timed(lambda: sq(x))
            ts = torchattacks.Square(net, norm="Linf", eps=eps, n_queries=args.queries, n_restarts=1, p_init=0.8,
                                     loss="margin", resc_schedule=True, seed=args.seed)
            ts_adv, t_ts = timed(lambda: ts(x, y))
        noise = (x + (2 * torch.rand(x.shape, generator=gen()) - 1) * eps).clamp(0, 1)
        ours_apgd, ta_adv, ta_best, ours_pgd, ours_sq, ts_adv = (
            a.detach() for a in (ours_apgd, ta_adv, ta_best, ours_pgd, ours_sq, ts_adv))
        for adv in (ours_apgd, ta_adv, ta_best, ours_pgd, ours_sq, ts_adv):
            assert float((adv - x).abs().max()) <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        se = lambda a, b: math.sqrt((a * (1 - a) + b * (1 - b)) / n)  # noqa: E731
        a_oa, a_ta, a_os, a_ts = acc(ours_apgd), acc(ta_adv), acc(ours_sq), acc(ts_adv)
        # share of samples whose highest-loss APGD images coincide (to 1e-6 per pixel)
        same = float(((ours_apgd - ta_best).abs().flatten(1).max(1).values <= 1e-6).float().mean())
        rows += [
            (eps255, "APGD-CE", "vars_fast", a_oa, mean(ce, ours_apgd), t_oa,
             f"{a_oa - a_ta:+.4f} ± {se(a_oa, a_ta):.4f}; same image for {same:.0%} of samples"),
            (eps255, "APGD-CE", "torchattacks", a_ta, mean(ce, ta_best), t_ta, ""),
            (eps255, "Square (margin)", "vars_fast", a_os, mean(margin, ours_sq), t_os,
             f"{a_os - a_ts:+.4f} ± {se(a_os, a_ts):.4f}"),
            (eps255, "Square (margin)", "torchattacks", a_ts, float("nan"), t_ts, ""),
            (eps255, "PGD-CE (best iterate)", "vars_fast", acc(ours_pgd), mean(ce, ours_pgd), t_op, ""),
            (eps255, "uniform noise", "-", acc(noise), mean(ce, noise), 0.0, ""),
        ]
        print(f"eps {eps255:g}/255: APGD acc ours {a_oa:.4f} torchattacks {a_ta:.4f}; "
              f"Square acc ours {a_os:.4f} torchattacks {a_ts:.4f}", flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# vars_fast vs torchattacks: APGD and Square on the same model",
        "",
        f"Provenance: `python benchmarks/crosscheck_attacks.py --eps {args.eps} --steps {args.steps} --restarts "
        f"{args.restarts} --queries {args.queries} --n {args.n} --size {args.size} --epochs {args.epochs} --seed "
        f"{args.seed}` (torch {torch.__version__}, torchattacks {torchattacks.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, load average {load:.1f} when written). What each side runs is in "
        "the script's docstring.",
        "",
        f"Model: a three-conv CNN trained {args.epochs} epochs ({train_s:.0f} s) on a synthetic 10-class task at "
        f"{args.size} px; clean accuracy {clean_acc:.4f} on the {n} attacked samples. Same samples, eps, and budget "
        f"for both libraries: APGD {args.steps} steps x {args.restarts} restart(s), Square {args.queries} queries.",
        "",
        "| eps (/255) | attack | library | robust accuracy | mean loss reached | seconds | accuracy ours - theirs |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps255, attack, lib, a, loss, sec, diff in rows:
        loss_s = "-" if math.isnan(loss) else f"{loss:.4f}"
        lines.append(f"| {eps255:g} | {attack} | {lib} | {a:.4f} | {loss_s} | {sec:.1f} | {diff} |")
    lines += [
        "",
        "Loss: the per-sample objective each attack maximises, averaged (APGD and PGD: cross-entropy, for "
        "torchattacks its highest-loss iterate; Square: the margin max_{j≠y} z_j − z_y). torchattacks' Square "
        "stops on a sample once it is misclassified, so its loss is not comparable and not shown. The ± is one "
        "binomial standard error of the difference of the two accuracies. \"Same image\": the share of samples "
        "whose highest-loss APGD images agree to 1e-6 in every pixel although the two runs start from different "
        "random points (both climb to the same vertex of the ball).",
        "",
    ]
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
