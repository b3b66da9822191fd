"""Attacks on item images: FGSM, PGD, APGD, Square (untargeted, on the BPR or the ranking-margin
loss), AIP-INSA / AIP-EXPA and TAaMR (targeted), BPDA wrappers for steps without a gradient (``bpda.py``),
plus the catalogue-wide driver and the "attack" stage (``stage.py``).

Every attack maximises a ``loss_fn(x) -> [B]`` in [0,1] pixel space (see ``base.Attack``).
Four registries name them: ``ATTACKS`` (the optimisers; ``attack.untargeted``), ``ATTACK_LOSSES``
(the catalogue attack's per-item objective: ``attack.loss``),
``OBJECTIVES`` (whom the images are crafted against: train, eval; ``attack.objective``) and
``TARGETED`` (aip-insa, aip-expa, taamr-fgsm, taamr-pgd; ``attack.targets``).
"""
from vars_fast.attacks.aip import expa_loss, insa_loss
from vars_fast.attacks.base import Attack, CatalogueLoss, frozen, quantize_within
from vars_fast.attacks.untargeted import (ItemTriples, attack_catalogue, bpr_image_loss, item_loss_fn,
                                         sample_item_triples)
from vars_fast.attacks.fgsm import FGSM
from vars_fast.attacks.pgd import PGD, default_alpha
from vars_fast.attacks.apgd import APGD
from vars_fast.attacks.pgd_l2 import PGDL2, l2_radius
from vars_fast.attacks.taamr import popular_class, taamr_loss
from vars_fast.attacks.square import Square
from vars_fast.attacks.surrogate import build_surrogate, feature_shift_loss, transfer_attack
from vars_fast.attacks.margin import margin_item_loss, margin_targets
from vars_fast.registry import ATTACK_LOSSES, ATTACKS, OBJECTIVES, TARGETED

__all__ = ["Attack", "FGSM", "PGD", "frozen", "quantize_within", "default_alpha", "bpr_image_loss",
           "attack_catalogue", "sample_item_triples", "ItemTriples", "item_loss_fn", "insa_loss",
           "expa_loss", "taamr_loss", "popular_class", "PGDL2", "l2_radius", "transfer_attack",
           "feature_shift_loss", "build_surrogate", "APGD", "Square", "CatalogueLoss", "margin_targets",
           "margin_item_loss", "ATTACKS", "ATTACK_LOSSES", "OBJECTIVES", "TARGETED"]
