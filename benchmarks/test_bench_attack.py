"""End-to-end row: PGD-10 catalogue attack throughput (items/s) on the quick preset's catalogue.

Providers:
* ``eager``   -- the reference loop a first implementation writes: parameters left with
  ``requires_grad`` (so backward also computes every weight gradient), ``loss.backward()``
  and ``x.grad``, the update in plain torch ops (sign, add, min/max projection, clamp).
* ``package-plain`` -- ``vars_fast.attacks.attack_catalogue`` with ``fast=False``: frozen
  models (input gradient only), ``torch.autograd.grad`` w.r.t. the images, the fused
  in-place ``ops.pgd_step``.
* ``package`` -- the default path: the same on a BN-folded channels_last copy of the model
  (``nn/fuse.py``).
* ``package-compile`` -- the default path with the image->loss function under
  ``torch.compile`` (fixed shapes; compilation is warmed up outside the timed round).

Both attack the same items with the same triples (VBPR, EfficientNet-Lite0 at the quick
preset's image size, untrained scorer: the throughput does not depend on the weights).
``VARS_FAST_BENCH_ITEMS`` sets how many catalogue items are attacked (default: 32 on CPU,
the whole catalogue on CUDA). Follows the conventions in ``benchmarks/conftest.py``.
"""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.attacks import attack_catalogue, sample_item_triples  # noqa: E402
from vars_fast.attacks.untargeted import item_loss_fn  # noqa: E402
from vars_fast.attacks.pgd import default_alpha  # noqa: E402
from vars_fast.config import make_config  # noqa: E402

N_ITEMS = int(os.environ.get("VARS_FAST_BENCH_ITEMS", "0"))  # 0: 32 on CPU, the whole catalogue on CUDA
STEPS = 10
EPS255 = 8


@pytest.fixture(scope="module")
def bench_dev():
    d = os.environ.get("VARS_FAST_BENCH_DEVICE")
    return d or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bench_dev):
    from vars_fast.backbones import build_backbone
    from vars_fast.data import load_catalogue
    from vars_fast.recommenders import build_recommender, encode_catalogue

    cfg = make_config("quick")
    cat = load_catalogue(cfg.data, tmp_path_factory.mktemp("cache"), progress=False)
    n = min(N_ITEMS or (32 if bench_dev == "cpu" else cat.n_items), cat.n_items)
    bb = build_backbone(cfg.backbone).eval().to(bench_dev)
    rec = build_recommender("VBPR", cat.n_users, cat.n_items, cfg.recommender, backbone=bb).to(bench_dev)
    feats = encode_catalogue(rec, cat.images, 64, bench_dev, progress=False)
    rec.set_item_visual(feats)
    rec.fit_feature_norm(feats)
    acfg = replace(cfg.attack, pgd_steps=STEPS, random_start=False)
    triples = sample_item_triples(cat, acfg.triples_per_item, torch.Generator().manual_seed(0))
    # a catalogue view with only the first n items attacked (same users / interactions)
    sub = replace(cat, n_items=n, images=cat.images[:n], status=cat.status[:n])
    sub_triples = replace(triples, users=triples.users[:n], others=triples.others[:n], sign=triples.sign[:n])
    return rec, bb, sub, acfg, sub_triples


def eager_reference(rec, cat, acfg, triples, device="cpu") -> torch.Tensor:
    """The naive loop (see the module docstring); returns uint8 like the package."""
    eps = EPS255 / 255
    alpha = default_alpha(eps, acfg.pgd_steps)
    out = torch.empty_like(cat.images)
    rec.requires_grad_(True)
    rec.backbone.requires_grad_(True)
    for s in range(0, cat.n_items, acfg.batch_size):
        idx = torch.arange(s, min(s + acfg.batch_size, cat.n_items))
        fn = item_loss_fn(rec, idx.to(device), triples.users[idx].to(device), triples.others[idx].to(device),
                          triples.sign[idx].to(device))
        x0 = cat.item_batch(idx, device)
        x = x0.clone()
        for _ in range(acfg.pgd_steps):
            x.requires_grad_(True)
            rec.zero_grad(set_to_none=True)
            fn(x).sum().backward()
            with torch.no_grad():
                x = x + alpha * x.grad.sign()
                x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0, 1)
        out[idx] = (x.detach() * 255).round().to(torch.uint8).cpu()
    rec.requires_grad_(False)
    rec.backbone.requires_grad_(False)
    return out


@pytest.mark.parametrize("provider", ["eager", "package-plain", "package", "package-compile"])
def test_pgd10_catalogue_attack(bench, setup, provider):
    rec, bb, cat, acfg, triples = setup
    kw = {"fast": provider != "package-plain", "compile": provider == "package-compile"}
    dev = bench.device

    def run():
        if provider == "eager":
            return eager_reference(rec, cat, acfg, triples, dev)
        return attack_catalogue(rec, cat, "pgd", EPS255, acfg, torch.Generator().manual_seed(0), dev,
                                progress=False, triples=triples, **kw)

    adv = bench.run(run, rounds=1)  # + one warm-up round (compiles the compiled provider)
    mean = bench.benchmark.stats.stats.mean
    S = int(cat.images.shape[-1])
    bench.record(op="pgd10_catalogue_attack", shape=(cat.n_items, 3, S, S), provider=provider,
                 items_per_s=round(cat.n_items / mean, 2), steps=STEPS, threads=torch.get_num_threads())
    assert adv.shape == cat.images.shape and (adv.int() - cat.images.int()).abs().max() <= EPS255
