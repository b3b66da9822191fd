"""The "evaluate" stage on a tiny run: real recommender stage, a tiny untrained defence and
hand-made attacked catalogues (random sign perturbations), so that only evaluate is tested."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.config import make_config  # noqa: E402
from vars_fast.pipeline import Context  # noqa: E402
from vars_fast.run import RunFolder  # noqa: E402


def _perturb(images: torch.Tensor, eps: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, images.shape, generator=g).to(torch.int16) * 2 - 1
    return (images.to(torch.int16) + sign * eps).clamp(0, 255).to(torch.uint8).numpy()


def build_tiny_run(path, evaluate: bool = True) -> Context:
    """Recommender stage + hand-made attacks + a tiny defence in ``path``; then evaluate."""
    cfg = make_config("quick", overrides={
        "data.n_users": 40, "data.n_items": 48, "data.image_size": 32, "backbone.weights": "none",
        "recommender.models": ["VBPR"], "recommender.epochs": 2, "recommender.k": 8,
        "attack.models": ["VBPR"], "attack.eps": [8], "attack.pgd_steps": 2, "attack.triples_per_item": 2,
        "attack.targets": ["aip-insa"], "attack.target_eps": [8],
        "eval.detect_eps": [8], "eval.noise_sigmas": [0.05], "eval.detect_items": 12,
        "eval.adaptive.eot": 2, "eval.adaptive.steps": 1, "eval.adaptive.items": 10, "eval.batch_size": 64,
        "eval.tsne_points": 24, "defense.addition.users": 16, "run.progress": False})
    run = RunFolder(path)
    c = Context(cfg=cfg, run=run, device=torch.device("cpu"), log=logging.getLogger("test_evaluate"))
    from vars_fast.defense import Defense, Denoiser, Detector, save_defense
    from vars_fast.recommenders.stage import run_stage as rec_stage

    rec_stage(c)
    cat = c.catalogue
    for k, (attack, eps) in enumerate([("fgsm", 8), ("pgd", 8)]):
        np.save(run.attack_file("VBPR", attack, eps), _perturb(cat.images, eps, k))
    targets = [1, 5, 9]
    (run.path / "attacks" / "targets.json").write_text(json.dumps({"model": "VBPR", "targets": targets}))
    np.save(run.attack_file("VBPR", "aip-insa", 8), _perturb(cat.images[targets], 8, 99))

    torch.manual_seed(0)
    den = Denoiser(width=4, n_res_blocks=1, patch_size=8, heads=1, embed_dim=8, image_size=32)
    det = Detector(backbone=dict(vars(cfg.backbone)), proj_hidden=16, proj_dim=8)
    split = {"train": list(range(0, 24)), "val": list(range(24, 32)), "test": list(range(32, 48))}
    d = Defense(den, det, threshold=0.05, rand_min_frac=0.85, image_size=32, extra={"split": split})
    save_defense(d, run.checkpoint("defense"))
    save_defense(Defense(den, None, image_size=32, extra={"split": split}), run.checkpoint("defense_no-detector"))
    save_defense(d, run.checkpoint("defense_no-perceptual"))
    if evaluate:
        from vars_fast.evaluate import run_stage

        run_stage(c)
    return c


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    # NOTE one thread: on a shared 2-core machine two intra-op threads made an EfficientNet
    # forward 6x slower (2.7 s vs 0.4 s for 48 images at 32 px)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield build_tiny_run(tmp_path_factory.mktemp("run"))
    finally:
        torch.set_num_threads(threads)


def test_ranking_rows(ctx):
    R = ctx.run.rows("ranking", model="VBPR")
    for d in ("denoise", "denoise+rand"):
        assert ctx.run.rows("ranking", model="VBPR", defense=d, attack="clean")
        for a in ("fgsm", "pgd"):
            for e in (8,):
                rows = [r for r in R if r["defense"] == d and r["attack"] == a and r["eps"] == e and "variant" not in r]
                assert len(rows) == 1 and 0 <= rows[0]["HR@10"] <= 1
    # D is the identity at init (zero output conv), so OURS on clean equals the undefended model
    clean = ctx.run.rows("ranking", model="VBPR", defense="none", attack="clean")[0]
    ours = ctx.run.rows("ranking", model="VBPR", defense="denoise", attack="clean")[0]
    assert ours["HR@10"] == pytest.approx(clean["HR@10"], abs=1e-6)


def test_gated_rows_denoise_exactly_the_flagged_items(ctx):
    from vars_fast.evaluate import Evaluation

    for a in ("clean", "fgsm", "pgd"):
        for d in ("detect+denoise", "detect+withhold"):
            (row,) = ctx.run.rows("ranking", model="VBPR", defense=d, attack=a)
            assert 0 <= row["flagged"] <= 1 and 0 <= row["HR@10"] <= 1
    ev = Evaluation(ctx)
    x = ctx.catalogue.images[:12]
    den = torch.rand(12, 3, 32, 32)  # a stand-in D(x) far from x: the detector sees the difference
    out, share = ev.gate(x, den)
    with torch.no_grad():
        flag = ev.defense.detector.distance(x.float() / 255, den).float() > ev.defense.threshold
    assert share == pytest.approx(float(flag.float().mean()))
    assert torch.equal(out[flag], den[flag]) and torch.equal(out[~flag], x[~flag].float() / 255)


def test_detection_rows(ctx):
    every = ctx.run.rows("detection")
    # Table 4's rows: not the seen / unseen table's, not ADDITION at its 20% criterion
    D = [x for x in every if "seen" not in x and x.get("variant") is None]
    assert any(x.get("variant") == "criterion" and x["detector"] == "addition" for x in every)
    general = [x for x in every if "seen" in x]
    assert general and {"fgsm", "pgd", "pgd-l2", "transfer", "gaussian", "jpeg"} <= {x["attack"] for x in general}
    for det in ("ours", "addition"):
        for e in (8,):
            r = [x for x in D if x["detector"] == det and x["attack"] == "fgsm" and x["eps"] == e]
            assert len(r) == 1
            assert {"accuracy", "auc", "tpr", "fpr", "threshold"} <= set(r[0])
            assert r[0]["n_clean"] == 12 and r[0]["n_adv"] == 12
        g = [x for x in D if x["detector"] == det and x["attack"] == "gaussian"]
        assert len(g) == 1 and 0 <= g[0]["clean_rate"] <= 1


def test_ablation_targeted_adaptive(ctx):
    R = ctx.run.rows("ranking")
    assert {r.get("variant") for r in R if r.get("variant")} == {"no-detector", "no-perceptual"}
    det_variants = {r.get("variant") for r in ctx.run.rows("detection", attack="pgd") if "seen" not in r}
    assert det_variants == {"full", "no-perceptual"}  # no detector: no detection row
    T = ctx.run.rows("targeted", attack="aip-insa", eps=8)
    assert {r["defense"] for r in T} == {"denoise", "denoise+rand"}
    assert all(np.isfinite(r["prediction_shift"]) for r in T)
    A = [r for r in R if r["attack"] == "adaptive-pgd"]
    assert {r["defense"] for r in A} == {"denoise", "denoise+rand", "detect+denoise", "detect+withhold"}
    assert all(r["n_adaptive_items"] == 10 for r in A)
    adv = np.load(ctx.run.attack_file("VBPR", "adaptive-pgd-rand", 8)).astype(int)
    assert np.abs(adv - ctx.catalogue.images.numpy().astype(int)).max() <= 8
    assert ctx.run.rows("detection", attack="adaptive-pgd")


def test_arrays_and_report(ctx):
    from vars_fast.report import write_report

    a = np.load(ctx.run.path / "figures" / "eval_arrays.npz")
    for k in ("d_clean", "d_fgsm_8", "threshold", "z_clean", "z_denoised", "z_fgsm", "z_pgd",
              "ex_clean", "ex_pgd_rand"):
        assert k in a.files, k
    text = write_report(ctx.run.path, figures=False).read_text()
    assert "## Table 6" in text and "AIP-INSA (OURS)" in text
    assert "evaluate.timings" in text
