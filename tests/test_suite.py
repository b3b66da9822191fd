"""The attack suite (evaluate/suite.py) on a tiny run: every member's rows, the per-item worst
case, APGD's loss curve, and the sanity checks that catch a broken yardstick."""
from __future__ import annotations

import pytest
import torch

from vars_fast.evaluate.suite import sanity, suite_table


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from test_evaluate import build_tiny_run
    from vars_fast.evaluate import Evaluation
    from vars_fast.evaluate.suite import suite

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = build_tiny_run(tmp_path_factory.mktemp("run"), evaluate=False)
        s = ctx.cfg.eval.suite
        s.eps, s.apgd_steps, s.restarts, s.square_queries, s.square_items = [8, 64], 4, 2, 10, 12
        ev = Evaluation(ctx)
        suite(ev)
        yield ctx, ev
    finally:
        torch.set_num_threads(threads)


def test_every_member_writes_its_row(ran):
    ctx, _ = ran
    R = ctx.run.load_metrics()["robustness"]
    assert all(r["table"] == "suite" and r["certified"] is False and r["defense"] == "none" for r in R)
    at8 = {(r["attack"], r.get("loss")) for r in R if r["eps"] == 8}
    assert at8 == {("pgd5", None), ("apgd", "bpr"), ("apgd", "margin"), ("square", "bpr"), ("suite", None),
                   ("noise", None)}
    at64 = {r["attack"] for r in R if r["eps"] == 64}
    assert "pgd5" not in at64 and {"apgd", "suite", "noise"} <= at64  # the attack stage ran eps 8 only
    (sq,) = [r for r in R if r["attack"] == "square" and r["eps"] == 8]
    assert sq["n_items"] == 12 and sq["queries"] == 10 and 0 <= sq["white_box_same_items_HR@10"] <= 1
    (st,) = [r for r in R if r["attack"] == "suite" and r["eps"] == 8]
    assert sum(st["won"].values()) == ctx.catalogue.n_items
    members = [r for r in R if r["eps"] == 8 and r["attack"] not in ("clean", "suite")]
    assert st["HR@10"] == min([r["HR@10"] for r in members] + [st["combined_HR@10"]])  # its worst result
    assert all(0 <= r["HR@10"] <= 1 for r in R)


def test_the_worst_case_keeps_each_items_strongest_image(ran):
    from vars_fast.evaluate.suite import _members, _targets, _worst_case, item_losses

    ctx, ev = ran
    rec = ctx.encoder("VBPR")
    members = _members(ev, rec, 8.0, {})
    worst, _ = _worst_case(ev, rec, members)
    t = _targets(ev, rec, "bpr")
    got = item_losses(ev, rec, worst, t, "bpr")
    for name, (imgs, fields) in members.items():
        loss = item_losses(ev, rec, imgs, t, "bpr")
        if name == "square":
            loss = loss[fields["_items"]]
            assert (got[fields["_items"]] >= loss - 1e-6).all()
        else:
            assert (got >= loss - 1e-6).all(), name
    assert (worst.int() - ctx.catalogue.images.int()).abs().max() <= 8


def test_apgd_loss_curves_are_recorded_and_never_fall(ran):
    ctx, _ = ran
    traces = ctx.run.load_metrics()["meta"]["suite"]["traces"]
    assert set(traces) == {"VBPR/apgd-bpr/8", "VBPR/apgd-margin/8", "VBPR/apgd-bpr/64", "VBPR/apgd-margin/64"}
    for curve in traces.values():
        assert len(curve) == 5  # the start and 4 steps
        assert all(b >= a - 1e-5 for a, b in zip(curve, curve[1:]))  # the best loss so far


def _row(attack, eps, hr, **kw):
    return {"model": "VBPR", "defense": "none", "attack": attack, "eps": eps, "HR@10": hr, **kw}


def test_sanity_checks_flag_a_broken_yardstick():
    good = [_row("clean", 0, 0.40), _row("pgd5", 8, 0.20), _row("apgd", 8, 0.15, loss="bpr"),
            _row("square", 8, 0.30, **{"white_box_same_items_HR@10": 0.25}), _row("transfer", 8, 0.35),
            _row("noise", 8, 0.39), _row("suite", 8, 0.14), _row("suite", 64, 0.05)]
    lines = sanity(good, "VBPR", popularity=0.10)
    assert lines and all(line.startswith("- ok") for line in lines), lines
    bad = [_row("clean", 0, 0.40), _row("pgd5", 8, 0.10), _row("apgd", 8, 0.15, loss="bpr"),
           _row("square", 8, 0.12, **{"white_box_same_items_HR@10": 0.25}), _row("transfer", 8, 0.05),
           _row("noise", 8, 0.30), _row("suite", 8, 0.14), _row("suite", 64, 0.20)]
    failed = [line for line in sanity(bad, "VBPR", popularity=0.10) if "FAILED" in line]
    text = "\n".join(failed)
    for what in ("falls as eps grows", "at least as strong as PGD-5", "uniform noise", "Square", "transfer",
                 "popularity floor"):
        assert what in text, what
    assert "| 8 | 0.4000 |" in suite_table(good, "VBPR")


def test_a_bounded_model_is_checked_against_its_certificate_not_the_floor():
    rows = [_row("clean", 0, 0.39, defense="bounded"), _row("apgd", 8, 0.31, loss="bpr", defense="bounded"),
            _row("suite", 8, 0.31, defense="bounded"), _row("suite", 64, 0.32, defense="bounded"),
            {**_row("any", None, 0.20, defense="bounded"), "certified": True}]
    lines = sanity(rows, "VBPR", popularity=0.21)
    assert all(line.startswith("- ok") for line in lines), lines
    assert any("stays above the certificate (0.2000)" in line for line in lines)
    broken = sanity(rows[:-1] + [{**rows[-1], "HR@10": 0.315}], "VBPR", popularity=0.21)
    assert any("FAILED" in line and "certificate" in line for line in broken)
