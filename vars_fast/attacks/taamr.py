"""TAaMR (Di Noia, Malitesta and Merra, 2020, "TAaMR: Targeted Adversarial Attack against
Multimedia Recommender Systems").

The target item's image is perturbed so that the backbone's ImageNet classifier labels it
as the catalogue's most popular category; the recommender's visual feature (the same
backbone's pooled features) follows. Optimised with FGSM (TAaMR-FGSM) or PGD (TAaMR-PGD):
the loss maximised is the target class's log-probability, i.e. minus the cross entropy.

Our catalogues have no ImageNet labels, so the "most popular category" is computed from the
data (``popular_class``): classify every clean catalogue image, weight each item's predicted
class by its number of training interactions, take the heaviest class.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vars_fast.attacks.base import TargetedAttack
from vars_fast.registry import TARGETED


def taamr_loss(backbone, target_class: int):
    """``x [T,3,S,S] -> log softmax(classify(x))[target_class] [T]``."""
    def loss_fn(x: Tensor) -> Tensor:
        return torch.log_softmax(backbone.classify(x).float(), dim=1)[:, int(target_class)]

    return loss_fn


@torch.no_grad()
def popular_class(backbone, cat, batch_size: int = 128, device: torch.device | str = "cpu") -> tuple[int, Tensor]:
    """(the popularity-weighted most frequent ImageNet class, predicted class per item [N])."""
    device = torch.device(device)
    preds = []
    for s in range(0, cat.n_items, batch_size):
        idx = torch.arange(s, min(s + batch_size, cat.n_items))
        preds.append(backbone.classify(cat.item_batch(idx, device)).argmax(1).cpu())
    pred = torch.cat(preds)
    pop = torch.bincount(cat.train[:, 1].cpu(), minlength=cat.n_items).double()
    weight = torch.bincount(pred, weights=pop)  # popularity mass per predicted class
    return int(weight.argmax()), pred


# TAaMR's two optimisers on the backbone's classifier (the feature extractor, not the recommender)
TARGETED.register("taamr-fgsm", TargetedAttack(lambda b: taamr_loss(b.backbone, b.target_class), optimiser="fgsm",
                                               through="backbone"))
TARGETED.register("taamr-pgd", TargetedAttack(lambda b: taamr_loss(b.backbone, b.target_class), optimiser="pgd",
                                              through="backbone"))
