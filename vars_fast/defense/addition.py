"""ADDITION (Wang et al., 2023, "Detecting Adversarial Examples With Image-Dependent Noise
Reduction"), adapted to a recommender as in the paper's Table 4: the detection baseline.

ADDITION has two stages: (1) inject Gaussian noise whose magnitude depends on the image,
strong enough to drown an adversarial perturbation; (2) denoise. An input is adversarial
when the model's output changes too much between the input and its noised-then-denoised
version. The paper turns the classifier criterion into a recommender one: flag an item
image when its recommendation scores change by more than 20% (``addition_change``).

Our choices (the original's two trained networks are not available offline):

* Noise magnitude (stage 1): ``sigma_b = sigma * clamp(h_b / h_ref, 0.5, 2)`` where ``h_b``
  is the image's high-frequency energy (mean |Laplacian|) and ``h_ref`` the median over
  clean calibration images (``calibrate``), else over the batch. Busy images hide
  perturbations better and get more noise, as ADDITION's injection module intends; an
  adversarial perturbation itself raises ``h_b`` and hence the noise it receives.
* Denoiser (stage 2): any ``x -> x'`` callable; the evaluation passes our trained
  denoiser (``Defense.purify`` without random resize-pad), which also removes Gaussian
  noise because it was trained to reconstruct clean images (content loss).
* Score change: for a fixed seeded set of users, ``sum_u |s'_u - s_u| / sum_u |s_u|`` with
  ``s_u`` the user-item scores of the input and ``s'_u`` those of its noised-denoised
  version (a relative L1 change over users; the change of the *mean* score is unstable
  when that mean is near zero).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def high_freq_energy(x: Tensor) -> Tensor:
    """x [B, C, H, W] in [0,1] -> [B]: mean absolute Laplacian (per channel, replicate padding)."""
    c = x.shape[1]
    k = _LAPLACE.to(x).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return lap.abs().flatten(1).mean(1)


class Addition:
    """ADDITION detector for item images.

    Args:
        rec: a Recommender (``encode``, ``score``, ``n_users`` via ``users`` below).
        denoise: ``x [B,3,S,S] -> x'`` in [0,1] (no gradient needed).
        users: LongTensor [U] of the users whose scores are compared.
        sigma: base noise standard deviation (``eval.addition_sigma``).
        change: relative score change above which an input is flagged (0.2 = 20%).
        generator: seeds the injected noise (CPU generator).
    """

    def __init__(self, rec, denoise: Callable[[Tensor], Tensor], users: Tensor, sigma: float = 0.05,
                 change: float = 0.2, generator: Optional[torch.Generator] = None):
        self.rec, self.denoise = rec, denoise
        self.users = users.long()
        self.sigma, self.threshold = float(sigma), float(change)
        self.generator = generator
        self.h_ref: Optional[float] = None

    @torch.no_grad()
    def calibrate(self, clean: Tensor) -> float:
        """Set the reference energy from clean images [B,3,S,S]; returns it."""
        self.h_ref = float(high_freq_energy(clean.float()).median().clamp_min(1e-6))
        return self.h_ref

    def noise_sigma(self, x: Tensor) -> Tensor:
        """Per-image noise std [B] (stage 1, image dependent)."""
        h = high_freq_energy(x.float())
        ref = self.h_ref if self.h_ref is not None else float(h.median().clamp_min(1e-6))
        return self.sigma * (h / ref).clamp(0.5, 2.0)

    @torch.no_grad()
    def scores(self, x: Tensor, items: Tensor) -> Tensor:
        """Scores of the images x [B,3,S,S] as items ``items`` [B] for every user: [B, U]."""
        feats = self.rec.encode(x)  # [B, F]
        users = self.users.to(feats.device)
        it = items.to(feats.device).long().unsqueeze(0).expand(users.shape[0], -1)  # [U, B]
        vis = feats.unsqueeze(0).expand(users.shape[0], -1, -1)  # [U, B, F]
        return self.rec.score(users, it, visual=vis).float().t()

    @torch.no_grad()
    def change(self, x: Tensor, items: Tensor) -> Tensor:
        """Relative score change [B] between x and denoise(x + adaptive noise)."""
        x = x.float()
        sig = self.noise_sigma(x).view(-1, 1, 1, 1)
        gen_dev = self.generator.device if self.generator is not None else torch.device("cpu")
        noise = torch.randn(x.shape, generator=self.generator, device=gen_dev).to(x.device)
        x2 = self.denoise((x + sig * noise).clamp(0.0, 1.0))
        s, s2 = self.scores(x, items), self.scores(x2, items)
        return (s2 - s).abs().sum(1) / s.abs().sum(1).clamp_min(1e-8)

    def detect(self, x: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """(relative change [B], flagged bool [B]); flagged when the change exceeds the threshold."""
        c = self.change(x, items)
        return c, c > self.threshold
