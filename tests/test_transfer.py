"""Transfer A->B on a tiny run: catalogue B differs from A, its rows carry the transfer fields
and do not replace A's, fine-tuning moves the denoiser and leaves the detector as it was."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from vars_fast.data.synthetic import SyntheticCatalogue, _geometric_mask, _shape_mask  # noqa: E402


def test_style_b_differs_from_a():
    a = SyntheticCatalogue(0, 32, style="classic").render_many(range(16)).astype(np.int16)
    b = SyntheticCatalogue(0, 32, style="geometric").render_many(range(16)).astype(np.int16)
    assert np.abs(a - b).mean() > 20  # same attributes, other shapes, palette and background
    lin = np.linspace(-1, 1, 48)
    u, v = np.meshgrid(lin, lin)
    for c in range(8):  # every category has another silhouette
        assert (_shape_mask(c, u, v)[0] != _geometric_mask(c, u, v)[0]).mean() > 0.05
    # a dark background: B's corner pixels are darker than A's on average
    assert b[:, :, :2, :2].mean() < a[:, :, :2, :2].mean() - 50
    with pytest.raises(ValueError, match="style"):
        SyntheticCatalogue(0, 32, style="nope")


def test_transfer_style_is_validated():
    from vars_fast.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="eval.transfer.style"):
        make_config("quick", overrides={"eval.transfer.style": "nope"})


@pytest.fixture(scope="module")
def transferred(tmp_path_factory):
    from test_evaluate import build_tiny_run

    from vars_fast.evaluate.common import Evaluation
    from vars_fast.evaluate.transfer import transfer
    from vars_fast.report import write_report

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = build_tiny_run(tmp_path_factory.mktemp("run"), evaluate=False)
        ctx.cfg.eval.transfer.enabled = True
        ctx.cfg.eval.transfer.finetune_epochs = 1
        ctx.cfg.defense.batch_size = 8
        ctx.cfg.defense.train_pgd_steps = 1
        ctx.cfg.attack.pgd_steps = 1
        before = {k: v.clone() for k, v in ctx.defense().detector.state_dict().items()}
        den_before = {k: v.clone() for k, v in ctx.defense().denoiser.state_dict().items()}
        a_rows = ctx.run.rows("ranking")
        ev = Evaluation(ctx)
        transfer(ev)
        write_report(ctx.run.path, figures=False)
        yield ctx, ev, before, den_before, a_rows
    finally:
        torch.set_num_threads(threads)


def test_transfer_rows(transferred):
    ctx, ev, _, _, a_rows = transferred
    R = ctx.run.rows("ranking", transfer="A->B")
    for k in (0, 1):
        for a, e in (("clean", 0), ("fgsm", 16), ("pgd", 8)):
            for d in ("denoise", "denoise+rand"):
                rows = [r for r in R if (r["finetune_epochs"], r["attack"], r["eps"], r["defense"]) == (k, a, e, d)]
                assert len(rows) == 1 and 0 <= rows[0]["HR@10"] <= 1
    assert {(r["attack"], r["eps"]) for r in R if r["defense"] == "none"} == {("clean", 0), ("fgsm", 16), ("pgd", 8)}
    # A's rows are still there, unchanged (row identity includes the transfer fields)
    assert [r for r in ctx.run.rows("ranking") if "transfer" not in r] == a_rows
    D = ctx.run.rows("detection", transfer="A->B")
    assert sorted(r["finetune_epochs"] for r in D) == [0, 1]
    assert all(r["detector"] == "ours" and r["eps"] == 16 and 0 <= r["accuracy"] <= 1 for r in D)
    meta = ctx.run.load_metrics()["meta"]["transfer"]
    assert meta["style"] == "geometric" and meta["seed"] == 1
    report = (ctx.run.path / "report.md").read_text()
    assert "Transfer to a new catalogue" in report and "denoise (ft 1)" in report


def test_finetune_moves_denoiser_only(transferred):
    from vars_fast.evaluate.transfer import catalogue_b, finetune, train_vbpr
    from vars_fast.defense.training import split_items

    ctx, ev, det_before, den_before, _ = transferred
    cat = catalogue_b(ev)
    assert not torch.equal(cat.images[:16], ctx.catalogue.images[:16])
    rec = train_vbpr(ev, cat)
    tuned, hist = finetune(ev, cat, rec, split_items(cat, torch.Generator().manual_seed(0)), 1)
    assert len(hist) == 1
    moved = [k for k, v in tuned.denoiser.state_dict().items() if not torch.equal(v, den_before[k])]
    assert moved
    assert tuned.detector is ctx.defense().detector and tuned.threshold == ctx.defense().threshold
    for k, v in ctx.defense().detector.state_dict().items():
        assert torch.equal(v, det_before[k])
    for k, v in ctx.defense().denoiser.state_dict().items():  # A's denoiser itself untouched
        assert torch.equal(v, den_before[k])
