"""The "attack" stage end to end on a tiny synthetic run (recommender stage first)."""
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


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cfg = make_config("quick", overrides={
        "data.n_users": 40, "data.n_items": 48, "data.image_size": 32, "backbone.weights": "none",
        "recommender.models": ["VBPR", "DVBPR"], "recommender.epochs": 2, "recommender.dvbpr.epochs": 1,
        "recommender.k": 8, "recommender.dvbpr.cnn_width": 8,
        "attack.models": ["VBPR", "DVBPR", "AMR"], "attack.eps": [8], "attack.pgd_steps": 2,
        "attack.triples_per_item": 2, "attack.batch_size": 16, "attack.n_targets": 3,
        "attack.target_eps": [4, 16], "attack.insa_users": 0, "attack.random_start": False,
        "attack.objective": ["train", "eval"], "eval.oracle_users": 5, "eval.oracle_models": ["VBPR"],
        "run.progress": False})
    run = RunFolder(tmp_path_factory.mktemp("run"))
    c = Context(cfg=cfg, run=run, device=torch.device("cpu"), log=logging.getLogger("test_attack_stage"))
    from vars_fast.recommenders.stage import run_stage as rec_stage

    rec_stage(c)
    return c


def test_attack_stage_writes_files_rows_and_figure(ctx):
    from vars_fast.attacks.stage import run_stage

    run, cat = ctx.run, ctx.catalogue
    run_stage(ctx)
    for model in ("VBPR", "DVBPR"):
        for method in ("fgsm", "pgd"):
            a = np.load(run.attack_file(model, method, 8))
            assert a.dtype == np.uint8 and a.shape == tuple(cat.images.shape)
            assert np.abs(a.astype(int) - cat.images.numpy().astype(int)).max() <= 8
            (row,) = run.rows("ranking", model=model, attack=method, eps=8, defense="none", objective="train")
            assert 0.0 <= row["HR@10"] <= 1.0 and "NDCG@20" in row
    # the evaluation-aware objective: per-user images of each user's list, its own rows
    users = json.loads((run.path / "attacks" / "oracle_users.json").read_text())["users"]
    assert len(users) == 5
    for method in ("fgsm", "pgd"):
        a = np.load(run.attack_file("VBPR", f"{method}-eval", 8))
        assert a.shape == (5, 1 + cat.negatives.shape[1]) + tuple(cat.images.shape[1:])
        (row,) = run.rows("ranking", model="VBPR", attack=method, eps=8, objective="eval")
        assert row["n_users"] == 5
    assert run.rows("ranking", model="VBPR", attack="clean", objective="eval")
    assert not run.rows("ranking", model="DVBPR", objective="eval")
    assert all(r["objective"] in ("train", "eval") for r in run.load_metrics()["ranking"])
    assert not run.attack_file("AMR", "fgsm", 8).exists()  # not trained: skipped with a warning
    info = json.loads((run.path / "attacks" / "targets.json").read_text())
    assert len(info["targets"]) == 3 and isinstance(info["hook"], int)
    for name in ctx.cfg.attack.targets:
        for eps in (4, 16):
            t = np.load(run.attack_file("VBPR", name, eps))
            assert t.shape == (3,) + tuple(cat.images.shape[1:])
            (row,) = run.rows("targeted", attack=name, eps=eps, model="VBPR", defense="none")
            assert {"prediction_shift", "HR@5", "HR@10", "HR@20"} <= set(row)
    # INSA is a direct score ascent: the prediction shift is positive and grows with eps
    shift = {e: run.rows("targeted", attack="aip-insa", eps=e)[0]["prediction_shift"] for e in (4, 16)}
    assert 0 < shift[4] < shift[16]
    assert run.figure("attack_examples").is_file()


def test_attack_stage_resumes_from_saved_files(ctx):
    from vars_fast.attacks.stage import run_stage

    path = ctx.run.attack_file("VBPR", "pgd", 8)
    if not path.exists():
        run_stage(ctx)
    before = path.stat().st_mtime_ns
    ctx.cfg.attack.targets = []
    run_stage(ctx)  # everything on disk: nothing is attacked again
    assert path.stat().st_mtime_ns == before


def test_train_objective_unchanged_by_eval_objective(ctx, tmp_path):
    """Adding the ``eval`` objective leaves the ``train`` objective's images and rows as they
    are: every attack draws from its own (run.seed, tag) stream."""
    import dataclasses
    import shutil

    from vars_fast.attacks.stage import run_stage

    if not ctx.run.attack_file("VBPR", "pgd", 8).exists():
        run_stage(ctx)  # train + eval, from the module fixture
    alone = RunFolder(tmp_path / "train-only")
    shutil.copytree(ctx.run.path / "checkpoints", alone.path / "checkpoints", dirs_exist_ok=True)
    cfg = dataclasses.replace(ctx.cfg, attack=dataclasses.replace(ctx.cfg.attack, objective=["train"], targets=[]))
    c = Context(cfg=cfg, run=alone, device=ctx.device, log=ctx.log,
                _cache={"catalogue": ctx.catalogue, "backbone": ctx.backbone})
    run_stage(c)
    assert not (alone.path / "attacks" / "oracle_users.json").exists()
    for model in ("VBPR", "DVBPR"):
        for method in ("fgsm", "pgd"):
            np.testing.assert_array_equal(np.load(alone.attack_file(model, method, 8)),
                                          np.load(ctx.run.attack_file(model, method, 8)))
            (a,) = alone.rows("ranking", model=model, attack=method, eps=8, defense="none", objective="train")
            (b,) = ctx.run.rows("ranking", model=model, attack=method, eps=8, defense="none", objective="train")
            assert a == b
