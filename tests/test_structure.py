"""The shape of the repository, read from its files (ast and text only, no imports): procedures
short enough to hold in one's head, each helper defined once, in-package imports at the top,
modules of a readable size, and docs/results/ a store of write-ups that names its provenance
once and points nowhere outside the repository."""
from __future__ import annotations

import ast
import collections
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vars_fast"
RESULTS = ROOT / "docs" / "results"
MAX_FUNCTION_LINES = 80
MAX_REPORT_LINES = 250
MAX_CONFIG_MODULE_LINES = 300
ONCE = ("_batches", "_pack", "versions", "_fingerprint")  # helpers that were written twice before
# a function-level in-package import says why it is not at the top, on its line or in the
# comment above it
IMPORT_REASON = re.compile(r"#.*\b(cycle:|deferred|optional)", re.IGNORECASE)


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@lru_cache(maxsize=None)
def _modules() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _body_dump(fn: ast.FunctionDef) -> str:
    """The function's parameter names, defaults and body, without docstring, annotations and
    positions."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    a = fn.args
    params = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [
        f"*{p.arg}" for p in (a.vararg, a.kwarg) if p is not None]
    defaults = [ast.dump(d) for d in (*a.defaults, *(d for d in a.kw_defaults if d is not None))]
    return repr((params, defaults)) + ast.dump(ast.Module(body=body, type_ignores=[]))


# ------------------------------------------------------------------ procedures and helpers
def test_no_function_is_longer_than_a_screen():
    long = sorted((n.end_lineno - n.lineno + 1, f"{_rel(p)}:{n.lineno} {n.name}")
                  for p, tree in _modules().items() for n in _functions(tree)
                  if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES)
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (split them at their seams): "
                      + "; ".join(f"{where} ({n} lines)" for n, where in reversed(long)))


def _top_level_functions() -> dict[str, list[tuple[Path, ast.FunctionDef]]]:
    defs = collections.defaultdict(list)
    for p, tree in _modules().items():
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs[n.name].append((p, n))
    return defs


def test_helpers_that_were_written_twice_exist_once():
    defs = _top_level_functions()
    twice = {name: [_rel(p) for p, _ in defs[name]] for name in ONCE if len(defs.get(name, [])) > 1}
    assert not twice, f"defined in more than one module: {twice}"


def test_no_function_is_defined_twice_with_the_same_body():
    """A function of the same name and the same arguments and body (docstrings aside) in two
    modules is one helper written twice: keep one, in the module both can import."""
    same = []
    for name, locs in _top_level_functions().items():
        by_body = collections.defaultdict(list)
        for p, fn in locs:
            by_body[_body_dump(fn)].append(f"{_rel(p)}:{fn.lineno}")
        same += [f"{name}: {', '.join(where)}" for where in by_body.values() if len(where) > 1]
    assert not same, f"the same helper in several modules: {same}"


def test_in_package_imports_are_at_the_top():
    """Inside a function, an import of the package itself needs its reason (a cycle, a deferral
    for start-up time, an optional part) in a comment on its line or just above it."""
    bare = []
    for p, tree in _modules().items():
        lines = p.read_text().splitlines()
        for fn in _functions(tree):
            for n in ast.walk(fn):
                mods = ([n.module or ""] if isinstance(n, ast.ImportFrom) and n.level == 0
                        else [a.name for a in n.names] if isinstance(n, ast.Import) else [])
                if any(m == "vars_fast" or m.startswith("vars_fast.") for m in mods) \
                        and not _has_reason(lines, n.lineno):
                    bare.append(f"{_rel(p)}:{n.lineno}")
    assert not bare, f"move these imports to the top of their module, or say why not: {bare}"


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A reason on the import's line or in the run of comment, import and blank lines above it."""
    k = lineno - 1
    while k >= 0:
        s = lines[k].strip()
        if IMPORT_REASON.search(lines[k]):
            return True
        if k < lineno - 1 and s and not s.startswith(("#", "import ", "from ")):
            return False
        k -= 1
    return False


# ------------------------------------------------------------------ module sizes
def test_report_module_is_short():
    n = len((PACKAGE / "report.py").read_text().splitlines())
    assert n <= MAX_REPORT_LINES, f"vars_fast/report.py has {n} lines (at most {MAX_REPORT_LINES})"


def test_config_modules_are_short():
    sizes = {_rel(p): len(p.read_text().splitlines()) for p in (PACKAGE / "config").glob("*.py")}
    big = {k: v for k, v in sizes.items() if v > MAX_CONFIG_MODULE_LINES}
    assert not big, f"config modules over {MAX_CONFIG_MODULE_LINES} lines: {big}"


# ------------------------------------------------------------------ the repository's text
TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".yml", ".json", ".toml", ".cfg", ".ini", ".sh", ".cpp", ".cc",
                 ".c", ".h", ".hpp", ".cu", ".cuh"}


def test_nothing_points_outside_the_repository():
    """A clone has no workspace folder beside it: no code, doc or test may send the reader there."""
    needle = "shared" + "/"  # built, so that this file does not match itself
    roots = [PACKAGE, ROOT / "docs", ROOT / "tests", ROOT / "README.md"]
    files = [p for r in roots for p in ([r] if r.is_file() else r.rglob("*"))
             if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    hits = [f"{_rel(p)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if needle in line]
    assert not hits, f"these point outside the repository: {hits}"


# ------------------------------------------------------------------ docs/results as a results store
PAGES = sorted(RESULTS.rglob("*.md"))
# a commit hash as the pages quote one: 7-40 hex digits in backticks (with a letter and a digit, so
# that a number or a word in code format is not one), or any such run after the word "commit"
QUOTED_HASH = re.compile(r"`(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])([0-9a-f]{7,40})`")
AFTER_COMMIT = re.compile(r"\bcommits?\s+`?([0-9a-f]{7,40})\b", re.IGNORECASE)


def _commit_hashes(text: str) -> set[str]:
    return set(QUOTED_HASH.findall(text)) | set(AFTER_COMMIT.findall(text))


def test_hash_pattern_sees_hashes_not_numbers():
    assert _commit_hashes("`12345678` `deadbeef` 0.1234567 `18924645185470582` 382901f2ecff71a9700f") == set()
    assert _commit_hashes("Provenance: commit `8259878`, then `7963a82`; Commit 11b2cf9") == \
        {"8259878", "7963a82", "11b2cf9"}


def _page_param(md: Path):
    return pytest.param(md, id=str(md.relative_to(RESULTS)))


@pytest.mark.parametrize("md", [_page_param(p) for p in PAGES])
def test_page_names_at_most_one_commit(md):
    found = _commit_hashes(md.read_text())
    assert len(found) <= 1, (f"{_rel(md)} names commits {sorted(found)}: keep the one of its provenance "
                             "line; earlier runs live in git history")


@pytest.mark.parametrize("md", [_page_param(p) for p in sorted(RESULTS.glob("*.md"))])
def test_page_has_a_provenance_line(md):
    head = md.read_text().splitlines()[:12]
    assert any(line.startswith("Provenance:") for line in head), \
        f"{_rel(md)}: no 'Provenance:' line (commit, preset, machine) near the top"


def test_no_scripts_under_docs_results():
    scripts = sorted(_rel(p) for p in RESULTS.rglob("*.py"))
    assert not scripts, f"scripts belong in tools/ or benchmarks/: {scripts}"


def test_data_reports_links_resolve():
    """The committed runs' generated reports (docs/results/data/*/report.md) link their figures."""
    link = re.compile(r"\]\(([^)\s#]+)[^)]*\)")
    broken = [f"{_rel(md)}: {target}" for md in (RESULTS / "data").rglob("*.md")
              for target in link.findall(md.read_text())
              if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not (md.parent / target).exists()]
    assert not broken, broken
