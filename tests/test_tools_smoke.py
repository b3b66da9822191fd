"""The scripts outside the package still start, and docs/results/ stays a results store.

Every script in tools/ and benchmarks/ (not the pytest-benchmark files) answers ``--help`` in a
subprocess, with the optional packages (cornac, ray) hidden, so a broken import shows up here
rather than when someone needs the script. docs/results/ holds write-ups (one provenance line
and at most one commit hash each) and data/, no scripts; nothing in the package, its docs or
its tests points at files outside the repository."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
SCRIPTS = sorted([*(ROOT / "tools").glob("*.py"),
                  *(p for p in (ROOT / "benchmarks").glob("*.py")
                    if not p.name.startswith("test_") and p.name != "conftest.py")])
OPTIONAL = ("cornac", "ray", "torchattacks")  # extras a script may use, never needed to answer --help
PAGES = sorted(RESULTS.glob("*.md"))


def _page_param(md: Path):
    return pytest.param(md, id=md.name)


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
            "denoiser_fidelity.py"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_answers_help(script, help_runs):
    r = help_runs[script]
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{script.relative_to(ROOT)} --help exited {r.returncode}:\n{out[-2000:]}"
    assert "usage" in r.stdout.lower(), f"{script.relative_to(ROOT)} --help printed no usage:\n{out[-2000:]}"


# ------------------------------------------------------------------ docs/results as a results store
HEX = re.compile(r"\b[0-9a-f]{7,40}\b")
# without git: an abbreviated hash has letters and digits (all-digit hashes slip through)
LIKELY_HASH = re.compile(r"(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,12}")


def _git_available() -> bool:
    return shutil.which("git") is not None and (ROOT / ".git").exists()


def _commit_hashes(text: str) -> set[str]:
    """The distinct tokens of ``text`` that name a commit of this repository (by git where it
    can tell; else by their look)."""
    tokens = sorted(set(HEX.findall(text)))
    if not tokens:
        return set()
    if not _git_available():
        return {t for t in tokens if LIKELY_HASH.fullmatch(t)}
    r = subprocess.run(["git", "-C", str(ROOT), "cat-file", "--batch-check"], capture_output=True, text=True,
                       input="".join(f"{t}^{{commit}}\n" for t in tokens), timeout=60)
    if r.returncode != 0:
        return {t for t in tokens if LIKELY_HASH.fullmatch(t)}
    lines = r.stdout.splitlines()
    return {t for t, line in zip(tokens, lines) if line.split()[1:2] == ["commit"]}  # "<sha> commit <size>"


def test_hash_check_sees_hashes_not_numbers():
    assert _commit_hashes("12345678 deadbeef 0.1234567 18924645185470582 382901f2ecff71a9700f") == set()
    if _git_available():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        if head:  # a shallow or odd checkout may not answer
            assert _commit_hashes(f"run at `{head}`, seed 0") == {head}


@pytest.mark.parametrize("md", [_page_param(p) for p in PAGES])
def test_page_names_at_most_one_commit(md):
    found = _commit_hashes(md.read_text())
    assert len(found) <= 1, (f"{md.relative_to(ROOT)} names commits {sorted(found)}: keep the one of its "
                             "provenance line; earlier runs live in git history")


@pytest.mark.parametrize("md", [_page_param(p) for p in PAGES])
def test_page_has_a_provenance_line(md):
    head = md.read_text().splitlines()[:12]
    assert any(line.startswith("Provenance:") for line in head), \
        f"{md.relative_to(ROOT)}: no 'Provenance:' line (commit, preset, machine) near the top"


def test_no_scripts_under_docs_results():
    scripts = sorted(str(p.relative_to(ROOT)) for p in RESULTS.rglob("*.py"))
    assert not scripts, f"scripts belong in tools/ or benchmarks/: {scripts}"


def test_data_reports_links_resolve():
    """The committed runs' generated reports (docs/results/data/*/report.md) link their figures."""
    link = re.compile(r"\]\(([^)\s#]+)[^)]*\)")
    broken = [f"{md.relative_to(ROOT)}: {target}" for md in (RESULTS / "data").rglob("*.md")
              for target in link.findall(md.read_text())
              if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not (md.parent / target).exists()]
    assert not broken, broken


TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".yml", ".json", ".toml", ".cfg", ".ini", ".sh", ".cpp", ".cc",
                 ".c", ".h", ".hpp", ".cu", ".cuh"}


def test_nothing_points_outside_the_repository():
    """A clone has no workspace folder beside it: no doc or comment may send the reader there."""
    needle = "shared" + "/"
    roots = [ROOT / "vars_fast", ROOT / "docs", ROOT / "tests", ROOT / "README.md"]
    files = [p for r in roots for p in ([r] if r.is_file() else r.rglob("*"))
             if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if needle in line]
    assert not hits, f"these point outside the repository: {hits}"
