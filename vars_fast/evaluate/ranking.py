"""Tables 2/3 and Fig. 6: clean and attacked catalogues, purified, re-encoded and ranked.

The attacked catalogues are the attack stage's (attacked against the *undefended* model, as
in the paper). ``denoise`` = D(x), ``denoise+rand`` = D(x) then a seeded random resize-pad.
``detect+denoise`` (at ``eval.table_eps``) is what a screening platform deploys: D(x) only
where the detector flags x, x itself elsewhere; its rows carry ``flagged``, the share of the
catalogue that was denoised. ``detect+withhold`` (same eps) is the platform that rejects a
flagged upload: the item keeps its clean feature (``eval.withhold_fallback``), the rest are
ranked on the uploaded images; ``flagged`` is the share withheld.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vars_fast.evaluate.common import RANK_DEFENSES, Evaluation
from vars_fast.metrics import fidelity_rows


def ranking(ev: Evaluation) -> None:
    """Clean/FGSM/PGD x {denoise, denoise+rand} (and detect+denoise) per model of ``eval.models``."""
    den_c, rnd_c = ev.clean_purified()
    table_eps = float(ev.cfg.eval.table_eps)
    items = ev.test_items
    fidelity_sets = {}  # (attack, eps) -> (x_adv, D(x_adv)) of VBPR's test items
    for name in [m for m in ev.models if m in ev.cfg.eval.models]:
        rec = ev.ctx.recommender(name)
        rows = []
        if not ev.run.rows("ranking", model=name, defense="none", attack="clean", objective="train"):
            rows.append({"model": name, "defense": "none", "attack": "clean", "eps": 0,
                         **ev.rank(rec, ev.cat.images)})
        for dname, imgs in zip(RANK_DEFENSES, (den_c, rnd_c)):
            rows.append({"model": name, "defense": dname, "attack": "clean", "eps": 0, **ev.rank(rec, imgs)})
        if ev.has_detector:
            imgs, share = ev.gated_clean()
            rows.append({"model": name, "defense": "detect+denoise", "attack": "clean", "eps": 0,
                         "flagged": share, **ev.rank(rec, imgs)})
            rows.append({"model": name, "defense": "detect+withhold", "attack": "clean", "eps": 0,
                         **ev.rank_withheld(rec, ev.cat.images, den_c)})
        for attack in ev.cfg.attack.untargeted:
            for eps in ev.eps_for(name):
                adv = ev.load_attack(name, attack, eps)
                if adv is None:
                    continue
                den, rnd = ev.purify_all(adv, desc=f"purify {name} {attack} eps={eps}", tag=f"{name}:{attack}:{eps}")
                for dname, imgs in zip(RANK_DEFENSES, (den, rnd)):
                    rows.append({"model": name, "defense": dname, "attack": attack, "eps": eps,
                                 **ev.rank(rec, imgs)})
                if ev.has_detector and float(eps) == table_eps:
                    imgs, share = ev.gate(adv, den)
                    rows.append({"model": name, "defense": "detect+denoise", "attack": attack, "eps": eps,
                                 "flagged": share, **ev.rank(rec, imgs)})
                    rows.append({"model": name, "defense": "detect+withhold", "attack": attack, "eps": eps,
                                 **ev.rank_withheld(rec, adv, den)})
                if name == "VBPR":
                    fidelity_sets[(attack, eps)] = (adv[items], den[items])
                    if float(eps) == table_eps:
                        examples(ev, attack, adv, den, rnd)
        ev.run.add_rows("ranking", rows)
        ev.log.info("evaluate ranking %s: %d rows", name, len(rows))
    # image fidelity on the held-out test items: D(clean), x_adv and D(x_adv) against clean
    ev.run.add_rows("fidelity", fidelity_rows(ev.cat.images[items], den_c[items], fidelity_sets))


def examples(ev: Evaluation, attack: str, adv: Tensor, den: Tensor, rnd: Tensor) -> None:
    """Fig. 7 material: a few test items, clean / D(clean) / adv / D(adv) / D+rand(adv)."""
    idx = ev.test_items[:4]
    den_c, _ = ev.clean_purified()
    u8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    ev.arrays["ex_items"] = idx.numpy()
    ev.arrays["ex_clean"] = ev.cat.images[idx].numpy()
    ev.arrays["ex_clean_denoised"] = u8(den_c[idx])
    ev.arrays[f"ex_{attack}"] = adv[idx].numpy()
    ev.arrays[f"ex_{attack}_denoised"] = u8(den[idx])
    ev.arrays[f"ex_{attack}_rand"] = u8(rnd[idx])
    ev.arrays["ex_eps"] = np.array(float(ev.cfg.eval.table_eps))
