"""The scripts outside the package still start.

Every script in tools/ and benchmarks/ (not the pytest-benchmark files) answers ``--help`` in a
subprocess, with the optional packages (cornac, ray) hidden, so a broken import shows up here
rather than when someone needs the script. (docs/results/ as a results store:
tests/test_structure.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "tools").glob("*.py"),
                  *(p for p in (ROOT / "benchmarks").glob("*.py")
                    if not p.name.startswith("test_") and p.name != "conftest.py")])
OPTIONAL = ("cornac", "ray", "torchattacks")  # extras a script may use, never needed to answer --help


# ------------------------------------------------------------------ --help of every script
@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[Path, subprocess.CompletedProcess]:
    """``python SCRIPT --help`` for every script, run side by side (each is mostly the torch import)."""
    hidden = tmp_path_factory.mktemp("no_optional")
    for name in OPTIONAL:  # an importable package that refuses to import: as if not installed
        (hidden / name).mkdir()
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by the smoke test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(script: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(SCRIPTS, pool.map(run, SCRIPTS)))


def test_scripts_found():
    names = {p.name for p in SCRIPTS}
    assert {"report.py", "crosscheck_cornac.py", "crosscheck_attacks.py", "image_size_cost.py",
            "denoiser_fidelity.py", "addition_baseline.py"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_answers_help(script, help_runs):
    r = help_runs[script]
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{script.relative_to(ROOT)} --help exited {r.returncode}:\n{out[-2000:]}"
    assert "usage" in r.stdout.lower(), f"{script.relative_to(ROOT)} --help printed no usage:\n{out[-2000:]}"
