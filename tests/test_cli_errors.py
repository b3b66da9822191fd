"""Bad input ends every command in one line on stderr (``error: <message>``) and exit code 2,
wherever it is found: at parse time or inside a stage. ``--debug`` shows the traceback."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "VARS_FAST_PROGRESS": "0"}
ENV.pop("VARS_FAST_DEBUG", None)


def _run(module: str, *argv: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], env=env or ENV, capture_output=True, text=True,
                          timeout=300)


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]


def _train(tmp_path, *sets: str, debug: bool = False) -> subprocess.CompletedProcess:
    argv = ["--preset", "quick", "--out", str(tmp_path / "run"), "--no-progress", "--set", "data.source=generic"]
    for s in sets:
        argv += ["--set", s]
    return _run("vars_fast.train", *argv, *(["--debug"] if debug else []))


def _write_csv(path, rows: list[tuple[str, str]], header=("user_id", "item_id")) -> str:
    path.write_text(",".join(header) + "\n" + "".join(f"{u},{i}\n" for u, i in rows))
    return str(path)


def test_train_missing_interactions_file(tmp_path):
    r = _train(tmp_path, "data.interactions=/nonexistent.csv")
    _assert_one_line_error(r, "data.interactions", "/nonexistent.csv")


def test_train_csv_without_the_configured_columns(tmp_path):
    csv = _write_csv(tmp_path / "x.csv", [("u1", "i1"), ("u2", "i2")], header=("customer", "product"))
    r = _train(tmp_path, f"data.interactions={csv}")
    _assert_one_line_error(r, "user_id", "data.user_col")


def test_train_no_user_with_enough_interactions(tmp_path):
    rows = [(f"u{u}", f"i{k}") for u in range(6) for k in range(4)]  # 4 each, 5 needed
    csv = _write_csv(tmp_path / "sparse.csv", rows)
    r = _train(tmp_path, f"data.interactions={csv}")
    _assert_one_line_error(r, "no user has >= 5", "data.min_interactions")


def test_debug_flag_and_env_show_the_traceback(tmp_path):
    r = _train(tmp_path, "data.interactions=/nonexistent.csv", debug=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    r = _run("vars_fast.report", str(tmp_path / "nothing"), env={**ENV, "VARS_FAST_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_report_and_screen_missing_paths(tmp_path):
    _assert_one_line_error(_run("vars_fast.report", str(tmp_path / "nothing")), "metrics.json")
    r = _run("vars_fast.screen", "--input", str(tmp_path / "nope"), "--checkpoint", str(tmp_path / "no.pt"),
             "--out", str(tmp_path / "o"), "--no-progress")
    _assert_one_line_error(r, "no.pt")


def test_report_marks_points_not_run(tmp_path):
    """Fig. 6 table: a (model, defence) curve with a point missing at one eps shows "–" there."""
    from vars_fast.evaluate.ranking import curve_table
    from vars_fast.report import write_report

    hr = {k: 0.3 for k in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")}
    rows = [{"model": "VBPR", "defense": d, "attack": "clean", "eps": 0, **hr} for d in ("none", "denoise")]
    rows += [{"model": "VBPR", "defense": "none", "attack": "pgd", "eps": e, **hr} for e in (8, 16, 32)]
    rows += [{"model": "VBPR", "defense": "denoise", "attack": "pgd", "eps": e, **hr} for e in (8, 32)]
    m = {"meta": {}, "ranking": rows, "detection": [], "targeted": []}
    table = curve_table(rows)
    denoise_row = next(line for line in table.splitlines() if "| denoise |" in line)
    assert denoise_row.split("|")[-3].strip() == "–"  # eps 16 column
    assert "NaN" not in table
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    report = write_report(tmp_path, figures=False).read_text()
    assert "NaN" not in report and "–" in report


@pytest.mark.parametrize("text", ["a\nb", "  spaced   out\tmessage  "])
def test_one_line(text):
    from vars_fast.cli import one_line

    assert "\n" not in one_line(ValueError(text)) and one_line(ValueError(text)).split() == text.split()
