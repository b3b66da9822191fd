"""CPU cost of one DVBPR training step on EfficientNet-Lite0 at 64 px, per
recommender.dvbpr.train_blocks.

One step runs the trainable suffix forward and backward on the batch's distinct items (about
400 of the default preset's 800 at recommender.dvbpr.batch_size 256); the frozen prefix runs
once per item per fit. Prints CPU seconds (process time, 1 thread). Results: docs/results/dvbpr.md.

    PYTHONPATH=$PWD python benchmarks/dvbpr_step_cost.py
"""
import argparse
import time


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()

    import torch

    from vars_fast.backbones import build_backbone
    from vars_fast.config import BackboneConfig
    from vars_fast.recommenders.dvbpr import BackboneCNN

    torch.set_num_threads(1)
    bb = build_backbone(BackboneConfig())
    x = torch.rand(400, 3, 64, 64)
    for tb in (5, 2, 1, 0):
        c = BackboneCNN(bb.trainable_copy(), 64, tb)
        n_train = sum(p.numel() for p in c.parameters() if p.requires_grad)
        with torch.no_grad():
            t = time.process_time()
            h = c.prefix(x)
            t_prefix = time.process_time() - t
        t = time.process_time()
        for _ in range(2):
            c.suffix(h).sum().backward()
        t_step = (time.process_time() - t) / 2
        print(f"train_blocks={tb} trainable={n_train} prefix map {tuple(h.shape[1:])}: prefix {t_prefix:.2f} s "
              f"per 400 images (once per fit), suffix fwd+bwd {t_step:.2f} s per 400 items (per step)", flush=True)


if __name__ == "__main__":
    main()
