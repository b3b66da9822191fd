"""End-to-end row: PGD-10 catalogue attack throughput (items/s) on the quick preset's catalogue.

Providers:
* ``eager``   -- the reference loop a first implementation writes: parameters left with
  ``requires_grad`` (so backward also computes every weight gradient), ``loss.backward()``
  and ``x.grad``, the update in plain torch ops (sign, add, min/max projection, clamp).
* ``package`` -- ``vars_fast.attacks.attack_catalogue``: frozen models (input gradient only),
  ``torch.autograd.grad`` w.r.t. the images, the fused in-place ``ops.pgd_step``.
* ``package-cl`` -- the same with channels_last inputs and backbone.
* ``package-compile`` -- the same with the image->loss function under ``torch.compile``
  (fixed shapes; compilation is warmed up outside the timed round).

Both attack the same items with the same triples (VBPR, EfficientNet-Lite0 at the quick
preset's image size, untrained scorer: the throughput does not depend on the weights).
``VARS_FAST_BENCH_ITEMS`` (default 64) sets how many catalogue items are attacked.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.attacks import attack_catalogue, sample_item_triples  # noqa: E402
from vars_fast.attacks.base import frozen  # noqa: E402
from vars_fast.attacks.catalogue import item_loss_fn  # noqa: E402
from vars_fast.attacks.pgd import default_alpha  # noqa: E402
from vars_fast.config import make_config  # noqa: E402

N_ITEMS = int(os.environ.get("VARS_FAST_BENCH_ITEMS", "64"))
STEPS = 10
EPS255 = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vars_fast.backbones import build_backbone
    from vars_fast.data import load_catalogue
    from vars_fast.recommenders import build_recommender, encode_catalogue

    cfg = make_config("quick")
    cat = load_catalogue(cfg.data, tmp_path_factory.mktemp("cache"), progress=False)
    n = min(N_ITEMS, cat.n_items)
    bb = build_backbone(cfg.backbone).eval()
    rec = build_recommender("VBPR", cat.n_users, cat.n_items, cfg.recommender, backbone=bb)
    feats = encode_catalogue(rec, cat.images, 64, "cpu", progress=False)
    rec.set_item_visual(feats)
    rec.fit_feature_norm(feats)
    acfg = replace(cfg.attack, pgd_steps=STEPS, random_start=False)
    triples = sample_item_triples(cat, acfg.triples_per_item, torch.Generator().manual_seed(0))
    # a catalogue view with only the first n items attacked (same users / interactions)
    sub = replace(cat, n_items=n, images=cat.images[:n], status=cat.status[:n])
    sub_triples = replace(triples, users=triples.users[:n], others=triples.others[:n], sign=triples.sign[:n])
    return rec, bb, sub, acfg, sub_triples


def eager_reference(rec, cat, acfg, triples) -> torch.Tensor:
    """The naive loop (see the module docstring); returns uint8 like the package."""
    eps = EPS255 / 255
    alpha = default_alpha(eps, acfg.pgd_steps)
    out = torch.empty_like(cat.images)
    rec.requires_grad_(True)
    rec.backbone.requires_grad_(True)
    for s in range(0, cat.n_items, acfg.batch_size):
        idx = torch.arange(s, min(s + acfg.batch_size, cat.n_items))
        fn = item_loss_fn(rec, idx, triples.users[idx], triples.others[idx], triples.sign[idx])
        x0 = cat.item_batch(idx)
        x = x0.clone()
        for _ in range(acfg.pgd_steps):
            x.requires_grad_(True)
            rec.zero_grad(set_to_none=True)
            fn(x).sum().backward()
            with torch.no_grad():
                x = x + alpha * x.grad.sign()
                x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0, 1)
        out[idx] = (x.detach() * 255).round().to(torch.uint8)
    rec.requires_grad_(False)
    rec.backbone.requires_grad_(False)
    return out


@pytest.mark.parametrize("provider", ["eager", "package", "package-cl", "package-compile"])
def test_pgd10_catalogue_attack(benchmark, setup, provider):
    rec, bb, cat, acfg, triples = setup
    kw = {}
    if provider == "package-cl":
        bb.to(memory_format=torch.channels_last)
        kw["channels_last"] = True
    if provider == "package-compile":
        kw["compile"] = True

    def run():
        if provider == "eager":
            return eager_reference(rec, cat, acfg, triples)
        return attack_catalogue(rec, cat, "pgd", EPS255, acfg, torch.Generator().manual_seed(0), "cpu",
                                progress=False, triples=triples, **kw)

    if provider == "package-compile":  # compile once, outside the timed round
        t0 = time.perf_counter()
        run()
        benchmark.extra_info["compile_warmup_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    adv = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    dt = time.perf_counter() - t0
    benchmark.extra_info.update(items=cat.n_items, steps=STEPS, items_per_s=round(cat.n_items / dt, 2),
                                image_size=int(cat.images.shape[-1]), threads=torch.get_num_threads())
    bb.to(memory_format=torch.contiguous_format)
    assert adv.shape == cat.images.shape and (adv.int() - cat.images.int()).abs().max() <= EPS255
