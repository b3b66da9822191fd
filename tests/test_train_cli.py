"""The train CLI: clear errors for bad input, and the quick preset end to end."""
import json
import os
import subprocess
import sys

import pytest

from vars_fast.train import main

ENV = {**os.environ, "VARS_FAST_PROGRESS": "0"}


@pytest.mark.parametrize("argv, needle", [
    (["--set", "data.bogus=1"], "data.bogus"),
    (["--set", "recommender.epochs=many"], "recommender.epochs"),
    (["--config", "/nonexistent/cfg.yaml"], "/nonexistent/cfg.yaml"),
    (["--preset", "huge"], "huge"),
    (["--stages", "recommender,fly"], "fly"),
])
def test_bad_arguments_give_one_clear_error(argv, needle, capsys, tmp_path):
    rc = main(argv + ["--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.startswith("error:")


def test_missing_earlier_stage_is_reported(tmp_path, capsys):
    rc = main(["--preset", "quick", "--out", str(tmp_path / "r"), "--stages", "evaluate", "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: ")


# not marked slow: the one whole pipeline that `make test` runs (the paper preset is in `make test-all`)
def test_quick_preset_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vars_fast.train", "--preset", "quick", "--out", str(out),
                        "--no-progress"], env=ENV, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    for f in ("config.yaml", "metrics.json", "report.md", "log.txt"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"meta", "ranking", "detection", "targeted"}
    models = {r["model"] for r in m["ranking"] if r["attack"] == "clean" and r["defense"] == "none"}
    assert models == {"VBPR", "AMR", "DVBPR", "BPR", "Pop"}
    attacks = {(r["attack"], r["defense"]) for r in m["ranking"] if r["model"] == "VBPR"}
    for a in ("fgsm", "pgd"):
        for d in ("none", "denoise", "denoise+rand"):
            assert (a, d) in attacks, (a, d)
    assert any(r["detector"] == "ours" for r in m["detection"])
    assert any(r["detector"] == "addition" for r in m["detection"])
    assert {r["attack"] for r in m["targeted"]} >= {"aip-insa", "aip-expa", "taamr-fgsm", "taamr-pgd"}
    for r in m["ranking"]:
        for k in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"):
            assert 0.0 <= r[k] <= 1.0
    report = (out / "report.md").read_text()
    assert "Table 2" in report and "Table 4" in report
    assert list((out / "figures").glob("*.png"))
    # A stage re-runs alone in the same folder, from the saved config.
    r2 = subprocess.run([sys.executable, "-m", "vars_fast.train", "--out", str(out), "--stages", "evaluate",
                         "--no-progress"], env=ENV, capture_output=True, text=True, timeout=1200)
    assert r2.returncode == 0, r2.stderr[-4000:]
    m2 = json.loads((out / "metrics.json").read_text())
    assert len(m2["ranking"]) == len(m["ranking"])  # rows replaced, not duplicated


def test_rerun_stage_timings_replace_the_earlier_runs(tmp_path, monkeypatch):
    """A stage re-run in an existing folder reports its own timings, not the first run's."""
    import vars_fast.train as train_mod
    from vars_fast.config import make_config
    from vars_fast.run import RunFolder

    seconds = iter([111.0, 7.0])

    def fake_stage(ctx):  # what the recommender stage does with its per-model timings
        old = ctx.run.load_metrics().get("meta", {}).get("timings", {})
        ctx.run.update_meta(timings={**old, "train_VBPR_s": next(seconds)})

    real = train_mod.STAGES["recommender"]
    train_mod.STAGES.register("recommender", fake_stage, main_only=False)  # replaces it, in place
    monkeypatch.setattr("vars_fast.report.write_report", lambda *a, **k: None)
    cfg = make_config("quick", overrides={"data.n_users": 20, "data.n_items": 24, "run.stages": ["recommender"],
                                          "run.progress": False})
    out = tmp_path / "run"
    try:
        for expected in (111.0, 7.0):
            assert train_mod.run(cfg, str(out)) == 0
            timings = RunFolder(out).load_metrics()["meta"]["timings"]
            assert timings["train_VBPR_s"] == expected and "stage_recommender_s" in timings
    finally:
        train_mod.STAGES.register("recommender", real, main_only=False)


def test_versions_name_the_machine():
    """Run metadata names the CPU (platform.processor() is empty on most Linux systems)."""
    from vars_fast.utils import versions

    v = versions()
    assert v["device_name"] and v["cpus"] >= 1 and v["threads"] >= 1
