"""An untrained defence checkpoint for screening tests, benchmarks and throughput runs.

Screening cost does not depend on the weights' values, only on the architecture; an untrained
denoiser, though, is the identity (its output conv is zero-initialised), so every distance
would be 0. ``make_checkpoint`` perturbs that conv and places the threshold at the median
distance of a few synthetic images, so about half of a synthetic catalogue is flagged: the
flagged/not-flagged split then has something to compare between engines and runs. The
backbones use the packaged pretrained EfficientNet-Lite0 weights by default (offline): a
randomly initialised one maps every image to nearly the same embedding (distances ~1e-8).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vars_fast.config import BackboneConfig, DefenseConfig


def make_checkpoint(path: str | Path, image_size: int = 64, width: int | None = None, n_res_blocks: int | None = None,
                    backbone: str = "efficientnet_lite0", weights: str = "pretrained", seed: int = 0,
                    calibrate: int = 32) -> Path:
    """Save an untrained ``Defense`` at ``path``; widths default to ``DefenseConfig`` defaults."""
    from vars_fast.data.synthetic import SyntheticCatalogue
    from vars_fast.defense import Defense, Denoiser, Detector, save_defense

    d = DefenseConfig()
    torch.manual_seed(seed)
    bcfg = {**BackboneConfig().__dict__, "name": backbone, "weights": weights}
    den = Denoiser(width=width or d.width, n_res_blocks=d.n_res_blocks if n_res_blocks is None else n_res_blocks,
                   norm=d.norm, patch_size=d.patch_size, heads=d.heads, mlp_ratio=d.mlp_ratio, image_size=image_size)
    torch.nn.init.normal_(den.conv_out.weight, std=0.3)  # not the identity: distances spread out
    det = Detector(bcfg, proj_hidden=d.proj_hidden, proj_dim=d.proj_dim)
    defense = Defense(den, det, threshold=0.0, rand_min_frac=d.rand_min_frac, image_size=image_size, backbone=bcfg)
    if calibrate:
        gen = SyntheticCatalogue(seed=seed, size=image_size)
        x = torch.from_numpy(gen.render_many(range(calibrate))).float() / 255
        with torch.no_grad():
            defense.threshold = float(defense.distance(x).median())
    save_defense(defense, path)
    return Path(path)
