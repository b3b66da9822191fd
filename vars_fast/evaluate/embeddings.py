"""Fig. 11 material: detector embeddings of clean / denoised / FGSM / PGD test items."""
from __future__ import annotations

import numpy as np

from vars_fast.evaluate.common import Evaluation
from vars_fast.evaluate.section import Doc, Section
from vars_fast.registry import SECTIONS


def embeddings(ev: Evaluation) -> None:
    if ev.defense.detector is None:
        return
    n = max(1, int(ev.cfg.eval.tsne_points) // 4)
    items = ev.test_items[:n]
    eps = ev.cfg.eval.table_eps
    groups = {"clean": ev.cat.images[items], "denoised": ev.clean_purified()[0][items]}
    for attack in ev.cfg.attack.untargeted:
        adv = ev.load_attack("VBPR", attack, eps) if "VBPR" in ev.models else None
        if adv is not None:
            groups[attack] = adv[items]
    for k, imgs in groups.items():
        ev.arrays[f"z_{k}"] = ev.embed(imgs).numpy()


def fig11(a: dict, plt):
    """t-SNE of the detector embeddings, one colour per group."""
    groups = [(k[2:], a[k]) for k in a if k.startswith("z_")]
    if len(groups) < 2:
        return None
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    Z = np.concatenate([z for _, z in groups])
    perp = float(max(2, min(30, (Z.shape[0] - 1) // 3)))
    # one thread: Barnes-Hut's OpenMP loop oversubscribes a small, busy machine, and a few
    # hundred points are seconds of work single-threaded
    with threadpool_limits(1):
        Y = TSNE(n_components=2, perplexity=perp, init="pca", random_state=0, max_iter=500).fit_transform(Z)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    s = 0
    for name, z in groups:
        ax.scatter(Y[s:s + len(z), 0], Y[s:s + len(z), 1], s=8, label=name)
        s += len(z)
    ax.legend()
    ax.set_title("t-SNE of detector embeddings")
    return fig


def report(doc: Doc) -> list[str]:
    return doc.figure("fig11_tsne", "Fig. 11: t-SNE of detector embeddings", lambda plt: fig11(doc.arrays, plt))


SECTIONS.register("embeddings", Section(order=80, run=embeddings, report=report))
