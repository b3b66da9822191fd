"""Peak resident growth per image per pixel of the defence's networks (CPU, fp32), the numbers
behind vars_fast/memory_budget.py. One network per fresh process, so that ru_maxrss is its own:

    python tools/memory_probe.py                 # every row of docs/results/memory.md
    python tools/memory_probe.py resnet50 96 9 grad

A row is (ru_maxrss after an N-image pass - after a 1-image pass) / (N - 1) / S^2: what one more
image adds to the peak of a loop. ``saved`` rows count the bytes autograd saves for backward
(parameters excluded), which fixes how the denoiser's cost scales with width and depth.
"""
import argparse
import resource
import subprocess
import sys

DENOISERS = {"w64b9": dict(width=64, n_res_blocks=9, patch_size=16, heads=8, embed_dim=256),
             "w16b4": dict(width=16, n_res_blocks=4, patch_size=8, heads=4, embed_dim=64)}


def _net(what: str, S: int):
    if what.startswith("denoiser"):
        from vars_fast.defense.denoiser import Denoiser

        return Denoiser(norm="instance", mlp_ratio=2.0, image_size=S, **DENOISERS[what.split("-")[1]]).eval()
    from vars_fast.backbones import build_backbone
    from vars_fast.config import BackboneConfig

    bb = build_backbone(BackboneConfig(name=what, weights="none")).eval()
    return bb.features


def peak_growth(what: str, S: int, N: int, grad: bool) -> float:
    import torch

    torch.set_num_threads(1)
    f = _net(what, S)

    def run(n):
        x = torch.rand(n, 3, S, S, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            y = f(x)
            if grad:
                torch.autograd.grad(y.float().sum(), x)

    run(1)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(N)
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r1 - r0) * 1024 / (N - 1) / S / S


def saved_bytes(what: str, S: int) -> float:
    import torch

    net = _net(what, S)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.rand(1, 3, S, S, requires_grad=True))
    return sum(seen.values()) / S / S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="With no arguments: every row, each network in a fresh process.")
    ap.add_argument("what", nargs="?", help="one row only: denoiser-w64b9 | denoiser-w16b4 | a backbone name")
    ap.add_argument("size", nargs="?", type=int, help="image size S in px")
    ap.add_argument("n", nargs="?", help="N images of the pass, or 'saved' for the bytes autograd saves")
    ap.add_argument("grad", nargs="?", help="any value: with an input gradient")
    args = ap.parse_args()
    if args.what is not None:
        if args.size is None or args.n is None:
            ap.error("one row needs WHAT SIZE N [grad] or WHAT SIZE saved")
        if args.n == "saved":
            print(f"{saved_bytes(args.what, args.size):.0f}")
        else:
            print(f"{peak_growth(args.what, args.size, int(args.n), args.grad is not None):.0f}")
        return
    rows = [("denoiser-w64b9", 96, 9, True), ("denoiser-w64b9", 96, 17, False)]
    for bb in ("resnet50", "efficientnet_lite0", "resnet18"):
        rows += [(bb, 96, 9, True), (bb, 96, 17, False)]
    print("| network | S | N | grad | peak growth B/px/image |\n|---|---|---|---|---|")
    for what, S, N, grad in rows:
        cmd = [sys.executable, __file__, what, str(S), str(N)] + (["grad"] if grad else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        print(f"| {what} | {S} | {N} | {grad} | {out} |", flush=True)
    print("\n| denoiser | S | saved B/px/image |\n|---|---|---|")
    for d in DENOISERS:
        out = subprocess.run([sys.executable, __file__, f"denoiser-{d}", "64", "saved"], capture_output=True,
                             text=True, check=True).stdout.strip()
        print(f"| {d} | 64 | {out} |", flush=True)


if __name__ == "__main__":
    main()
