"""ADDITION baseline: flags a large score change, not a tiny one; noise is image dependent."""
import torch
from torch import nn

from vars_fast.defense.addition import Addition, high_freq_energy


class ToyRec(nn.Module):
    """score = p_u . (q_i + E f), f = mean colour of the image (3-d)."""

    def __init__(self, n_users=6, n_items=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.p = torch.rand(n_users, 3, generator=g) + 0.5
        self.q = torch.rand(n_items, 3, generator=g)

    def encode(self, x):
        return x.float().mean(dim=(2, 3))

    def score(self, users, items, visual=None):
        p = self.p[users]
        if items.dim() == 2:
            p = p.unsqueeze(1)
        return (p * (self.q[items] + visual)).sum(-1)


def test_flags_large_change_not_tiny():
    rec = ToyRec()
    x = torch.full((2, 3, 8, 8), 0.5)
    items = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(1)
    # the "denoiser" brightens image 0 strongly and image 1 barely: a stand-in for an
    # input whose scores swing when its perturbation is drowned and removed
    def denoise(z):
        out = z.clone()
        out[0] = 1.0
        out[1] = 0.5 + 1e-3
        return out
    add = Addition(rec, denoise, users=torch.arange(6), sigma=0.05, change=0.2, generator=g)
    change, flagged = add.detect(x, items)
    assert change.shape == (2,)
    assert change[0] > 0.2 > change[1] >= 0
    assert flagged.tolist() == [True, False]


def test_identity_denoiser_small_noise_not_flagged():
    rec = ToyRec()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.4
    add = Addition(rec, lambda z: z, users=torch.arange(6), sigma=0.01, change=0.2,
                   generator=torch.Generator().manual_seed(3))
    _, flagged = add.detect(x, torch.arange(4))
    assert not flagged.any()


def test_noise_sigma_grows_with_high_frequency_energy():
    g = torch.Generator().manual_seed(4)
    smooth = torch.full((1, 3, 16, 16), 0.5)
    busy = (torch.rand(1, 3, 16, 16, generator=g) > 0.5).float()
    add = Addition(ToyRec(), lambda z: z, users=torch.arange(6), sigma=0.05)
    add.calibrate(torch.cat([smooth + 0.01 * torch.rand(1, 3, 16, 16, generator=g), busy * 0.5 + 0.25]))
    s = add.noise_sigma(torch.cat([smooth, busy]))
    assert s[1] > s[0]
    assert torch.all(s >= 0.025 - 1e-6) and torch.all(s <= 0.1 + 1e-6)
    assert high_freq_energy(smooth).item() == 0.0
