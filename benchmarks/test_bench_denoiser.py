"""End-to-end rows: the denoiser's forward pass and one training step (content loss + Adam).

Providers:
* ``eager``   -- the module as written (fused-epilogue ops dispatch as usual).
* ``compile`` -- ``torch.compile(denoiser, dynamic=False)``, compiled outside the timed rounds
  (the training loop does the same with ``run.compile``: fixed shapes, last batch dropped).

Shape: the ``default`` preset's denoiser at its image size, batch ``VARS_FAST_BENCH_DENOISER_B``
(default 16). ``flops`` is counted once with ``torch.utils.flop_counter`` (convs, matmuls,
attention); ``images_per_s`` is the end-to-end throughput.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.config import make_config  # noqa: E402
from vars_fast.defense.denoiser import Denoiser  # noqa: E402
from vars_fast.defense.losses import content_loss  # noqa: E402

B = int(os.environ.get("VARS_FAST_BENCH_DENOISER_B", "16"))


def _model(device: str) -> tuple[Denoiser, int]:
    cfg = make_config("default")
    d, S = cfg.defense, cfg.data.image_size
    torch.manual_seed(0)
    den = Denoiser(width=d.width, n_res_blocks=d.n_res_blocks, norm=d.norm, patch_size=d.patch_size, heads=d.heads,
                   embed_dim=d.embed_dim, mlp_ratio=d.mlp_ratio, image_size=S).to(device)
    with torch.no_grad():  # leave the identity init: a realistic mid-training denoiser
        den.conv_out.weight.normal_(0, 1e-3)
    return den, S


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


@pytest.mark.parametrize("provider", ["eager", "compile"])
def test_denoiser_forward(bench, provider):
    den, S = _model(bench.device)
    den.eval()
    x = torch.rand(B, 3, S, S, device=bench.device)
    fwd = torch.compile(den, dynamic=False) if provider == "compile" else den

    def call():
        with torch.no_grad():
            return fwd(x)

    call()  # compile / warm up outside the timed rounds
    flops = _flops(lambda: den(x)) if provider == "eager" else 0
    bench.run(call, rounds=5)
    mean = bench.benchmark.stats.stats.mean
    bench.record(op="denoiser_forward", shape=(B, 3, S, S), provider=provider, flops=flops, fn=call,
                 images_per_s=round(B / mean, 1))


@pytest.mark.parametrize("provider", ["eager", "compile"])
def test_denoiser_train_step(bench, provider):
    den, S = _model(bench.device)
    den.train()
    opt = torch.optim.Adam(den.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, S, S, generator=g).to(bench.device)
    x_in = (x + 8 / 255 * torch.randn(x.shape, generator=g).sign().to(bench.device)).clamp(0, 1)
    fwd = torch.compile(den, dynamic=False) if provider == "compile" else den

    def step():
        loss = content_loss(x, fwd(x_in))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()
    flops = _flops(lambda: content_loss(x, den(x_in)).backward()) if provider == "eager" else 0
    bench.run(step, rounds=5)
    mean = bench.benchmark.stats.stats.mean
    bench.record(op="denoiser_train_step", shape=(B, 3, S, S), provider=provider, flops=flops, fn=step,
                 images_per_s=round(B / mean, 1))
