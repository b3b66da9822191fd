"""The frontier of the bounded model in report.md (evaluate/robustness.py), from the rows that
``tools/bounded_frontier.py --record`` writes: each cap is its own point (rows of different caps
never replace each other), the image-blind floor and the unbounded model are drawn beside it,
and a run without a sweep gets no section."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vars_fast.evaluate.robustness import NAME, frontier
from vars_fast.evaluate.section import load_doc
from vars_fast.report import render
from vars_fast.run import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("bounded_frontier", ROOT / "tools" / "bounded_frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _point(cap, clean, cert, att):
    return {"cap": cap, "bound_mean": min(cap, 7.5), "clean": clean, "certified": cert, "apgd10": att}


@pytest.fixture
def run(tmp_path):
    rf = RunFolder(tmp_path / "run")
    rf.add_rows("ranking", [
        {"model": "BPR", "defense": "none", "attack": "clean", "eps": 0, "HR@10": 0.3267},
        {"model": "VBPR", "defense": "none", "attack": "clean", "eps": 0, "HR@10": 0.3550}], table="ranking")
    return rf


def test_each_cap_is_its_own_point_and_a_rerun_replaces_it(run):
    tool = _tool()
    for p in (_point(0.125, 0.355, 0.205, 0.35), _point(1.0, 0.388, 0.0, 0.33), _point(4.0, 0.365, 0.0, 0.195)):
        run.add_rows("robustness", tool.frontier_rows("VBPR-bounded", p, 8.0, 10), table=NAME)
    assert len(run.rows("robustness")) == 9
    run.add_rows("robustness", tool.frontier_rows("VBPR-bounded", _point(1.0, 0.39, 0.0, 0.31), 8.0, 10), table=NAME)
    assert len(run.rows("robustness")) == 9
    attacks, points = frontier(run.rows("robustness"))
    assert attacks == ["apgd-10 eps 8"]
    assert [p["cap"] for p in points] == [0.125, 1.0, 4.0]
    assert points[1] == {"model": "VBPR-bounded", "cap": 1.0, "bound_mean": 1.0, "clean": 0.39, "certified": 0.0,
                         "apgd-10 eps 8": 0.31}


def test_the_report_draws_the_frontier_beside_the_floor(run):
    tool = _tool()
    for p in (_point(0.125, 0.355, 0.205, 0.35), _point(2.0, 0.403, 0.0, 0.237)):
        run.add_rows("robustness", tool.frontier_rows("VBPR-bounded", p, 8.0, 10), table=NAME)
    pytest.importorskip("matplotlib")
    text = render(load_doc(run.path, figures=True))
    sec = text[text.index("## Bounded visual influence: the frontier"):]
    grid = [ln for ln in sec.splitlines() if ln.startswith("|")]
    assert len({ln.count("|") for ln in grid}) == 1  # no "|" inside a cell (a norm written ||w||)
    assert "| VBPR-bounded | 0.125 | 0.1250 | 0.3550 | 0.2050 | 0.3500 |" in sec
    assert "| VBPR-bounded | 2 | 2.0000 | 0.4030 | 0.0000 | 0.2370 |" in sec
    assert "VBPR clean (unbounded): HR@10 0.3550" in sec and "BPR scores HR@10 0.3267" in sec
    assert "![Clean, certified and attacked HR@10 against the cap](figures/fig_bounded_frontier.png)" in sec
    assert (run.path / "figures" / "fig_bounded_frontier.png").is_file()


def test_no_sweep_no_section(run):
    run.add_rows("robustness", _tool().frontier_rows("VBPR-bounded", _point(1.0, 0.388, 0.0, 0.33), 8.0, 10),
                 table=NAME)
    assert "the frontier" not in render(load_doc(run.path, figures=False))
