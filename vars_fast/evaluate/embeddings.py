"""Fig. 11 material: detector embeddings of clean / denoised / FGSM / PGD test items."""
from __future__ import annotations

from vars_fast.evaluate.common import Evaluation


def embeddings(ev: Evaluation) -> None:
    if ev.defense.detector is None:
        return
    n = max(1, int(ev.cfg.eval.tsne_points) // 4)
    items = ev.test_items[:n]
    eps = ev.cfg.eval.table_eps
    groups = {"clean": ev.cat.images[items], "denoised": ev.clean_purified()[0][items]}
    for attack in ("fgsm", "pgd"):
        adv = ev.load_attack("VBPR", attack, eps) if "VBPR" in ev.models else None
        if adv is not None:
            groups[attack] = adv[items]
    for k, imgs in groups.items():
        ev.arrays[f"z_{k}"] = ev.embed(imgs).numpy()
