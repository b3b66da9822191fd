"""detect+withhold: a flagged item's upload is withheld and the item keeps its clean feature
(or the catalogue's mean feature); every other item is ranked on its uploaded image."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vars_fast.evaluate.common import Evaluation


class PoolEncoder(nn.Module):
    """A recommender stand-in whose features are a linear map of the 4x4 mean-pooled image."""

    name = "toy"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 16, 5)

    def encode(self, x):
        return self.lin(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def _evaluation(fallback: str = "clean") -> Evaluation:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g)
    ev = Evaluation.__new__(Evaluation)  # only what withhold() reads: catalogue, device, batch, config
    ev.cat = SimpleNamespace(images=images)
    ev.dev, ev.bs, ev._features = torch.device("cpu"), 4, {}
    ev.cfg = SimpleNamespace(eval=SimpleNamespace(withhold_fallback=fallback))
    return ev


@pytest.mark.parametrize("fallback", ["clean", "mean"])
def test_withhold_replaces_exactly_the_flagged_features(fallback):
    ev, enc = _evaluation(fallback), PoolEncoder()
    clean = ev.cat.images
    upload = (clean.int() + 40).clamp(0, 255).to(torch.uint8)  # every upload differs from its clean image
    flagged = torch.zeros(10, dtype=torch.bool)
    flagged[[1, 4, 7]] = True
    with torch.no_grad():
        f_up = enc.encode(upload.float() / 255)
        f_clean = enc.encode(clean.float() / 255)
    out = ev.withhold(enc, upload, flagged)
    keep = f_clean[flagged] if fallback == "clean" else f_clean.mean(0, keepdim=True).expand(3, -1)
    torch.testing.assert_close(out[flagged], keep)
    torch.testing.assert_close(out[~flagged], f_up[~flagged])
    assert not torch.allclose(out[flagged], f_up[flagged])


def test_nothing_flagged_is_the_upload_and_unknown_fallback_is_an_error():
    ev, enc = _evaluation(), PoolEncoder()
    upload = ev.cat.images.flip(-1)
    with torch.no_grad():
        f_up = enc.encode(upload.float() / 255)
    torch.testing.assert_close(ev.withhold(enc, upload, torch.zeros(10, dtype=torch.bool)), f_up)
    with pytest.raises(ValueError, match="eval.withhold_fallback"):
        ev.withhold(enc, upload, torch.ones(10, dtype=torch.bool), fallback="zero")
