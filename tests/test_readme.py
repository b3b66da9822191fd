"""The user documentation stays honest: README.md within its size, no dates, every relative link
and anchor resolves, every config key it names exists, and docs/config.md matches the code."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from vars_fast.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12_500
DOCS = sorted([README, *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "results").glob("*.md")])

INLINE_LINK = re.compile(r"\]\(([^)\s]+)\)")
REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
# ISO dates, and years from 1990 to 2039 standing alone (not inside sizes such as 2048 or 23,204)
DATE = re.compile(r"\b(?:19|20)\d\d-\d\d(?:-\d\d)?\b|(?<![\d,.×x])\b(?:199\d|20[0-3]\d)\b(?![\d×x]|[.,]\d)")
# a quoted key ('data.n_user') is an example of a wrong one
CONFIG_KEY = re.compile(r"(?<!')\b(data|backbone|recommender|attack|defense|eval|run)\.([a-z_]+(?:\.[a-z_]+)*\*?)")


def _links(text: str) -> list[str]:
    return INLINE_LINK.findall(text) + REF_DEF.findall(text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", md.read_text(), re.M)}


def test_readme_size():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (limit {README_MAX_BYTES}): move detail to docs/"


def test_readme_has_no_dates():
    found = DATE.findall(README.read_text())
    assert not found, f"README.md holds dates {found}: results carry their provenance in docs/ or benchmarks/results/"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = []
    for link in _links(md.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (md.parent / path).resolve() if path else md
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(link)
    assert not broken, f"{md.relative_to(ROOT)}: broken links {broken}"


def _exists(section, key: str) -> bool:
    """``key`` (``a.b``, or a family ``lambda_*``) names a field of the dataclass ``section``."""
    head, _, rest = key.partition(".")
    names = {f.name: f for f in dataclasses.fields(section)}
    if not rest:
        return head in names or head.endswith("*") and any(n.startswith(head[:-1]) for n in names)
    sub = names.get(head)
    return sub is not None and dataclasses.is_dataclass(sub.default_factory) and _exists(sub.default_factory, rest)


def test_readme_config_keys_exist():
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)
                if f.default_factory is not dataclasses.MISSING}
    text = README.read_text()
    # `defense.lambda_*` names a family; every other key must be a field of its section (or sub-section)
    missing = sorted({f"{s}.{k}" for s, k in CONFIG_KEY.findall(text) if not _exists(sections[s], k)})
    assert not missing, f"README.md names config keys the config lacks: {missing}"


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "config.md").read_text() == mod.render(), \
        "docs/config.md is stale: run `python docs/config_reference.py`"
