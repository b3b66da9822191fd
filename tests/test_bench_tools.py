"""The benchmark tools: report.py's ratio tables, and device_check.sh's flow without a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "report.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(provider: str, median: float) -> dict:
    info = dict(op="pgd_step", shape="8x3x64x64", provider=provider, bytes=4_000_000, flops=0,
                peak_mem_mb=1.0, device="cpu")
    return {"name": f"test_pgd_step[{provider}]", "params": {"provider": provider},
            "stats": {"median": median}, "extra_info": info}


def test_ratios_and_out_dir(tmp_path, capsys):
    data = {"datetime": "2026-11-27T00:00:00",
            "machine_info": {"vars_fast": {"device": "cpu", "device_name": "Test CPU (2 threads)",
                                           "copy_gbps": 10.0, "matmul_gflops": 100.0}},
            "benchmarks": [_bench("eager", 0.004), _bench("compile", 0.002), _bench("cpp", 0.001)]}
    src = tmp_path / "run.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "tables"
    assert _load().main([str(src), "--suffix", "ops", "--out-dir", str(out)]) == 0
    md = (out / "cpu-test-cpu-2-threads-ops.md").read_text()
    rows = json.loads((out / "cpu-test-cpu-2-threads-ops.json").read_text())["rows"]
    cpp = next(r for r in rows if r["provider"] == "cpp")
    assert cpp["speedup"] == pytest.approx({"vs_eager": 4.0, "vs_compile": 2.0})
    assert cpp["gbps"] == pytest.approx(4.0)          # 4 MB in 1 ms
    assert cpp["pct_copy_bw"] == pytest.approx(40.0)  # of the 10 GB/s measured in the run
    assert "| cpp | 1.000 | 4.00x | 2.00x | 4.0 | 40% |" in md
    assert "saved" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    rep = _load()
    assert rep.main([str(tmp_path / "run.json"), "--out-dir"]) == 2
    assert rep.main([str(tmp_path / "missing.json")]) == 1


def _device_check(out: Path, **phases: str) -> subprocess.CompletedProcess:
    off = {k: "0" for k in ("BUILD_S", "TESTS_S", "OPS_S", "E2E_S", "TRAIN_S")}
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, **off, **phases}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_device_check_without_gpu(tmp_path):
    """Every phase off but the machine summary: the script runs, writes log.txt to $OUT, exits 0."""
    r = _device_check(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "log.txt").read_text()
    assert "== machine" in log and "| torch " in log and "== done" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="the quick preset would run on the GPU and pass")
def test_device_check_reports_a_failed_phase(tmp_path):
    r = _device_check(tmp_path, TRAIN_S="30")  # --device cuda without a GPU: the phase fails
    assert r.returncode == 1
    assert "failed: quick preset" in (tmp_path / "log.txt").read_text()
