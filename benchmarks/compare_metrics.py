"""Compare the metrics.json rows of two runs: are the results the same?

    python benchmarks/compare_metrics.py RUN_A RUN_B [--sections ranking,detection] [--tol 0] [--ignore FIELD]
                                         [--md OUT.md]

RUN_A, RUN_B: run folders (or their metrics.json). Rows are matched by their identity (the
non-metric fields, as ``vars_fast.run`` matches them when a stage is re-run); every numeric
field is compared. Prints one line per section (rows matched, rows only in one run, fields
that differ, the largest absolute difference) and the differing rows; ``--md`` also writes that
as a markdown table. Exits 0 when every row and value agrees within ``--tol``, else 1. Timing
fields in ``meta`` are not compared: they measure the machine, not the method.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vars_fast.run import _KEYS


def load(path: str) -> dict:
    p = Path(path)
    return json.loads((p / "metrics.json" if p.is_dir() else p).read_text())


def _ident(kind: str, row: dict) -> tuple:
    return tuple(row.get(k) for k in _KEYS[kind])


def _numbers(v) -> list[float]:
    """A metric value as a flat list of floats (confusion matrices are nested lists)."""
    if isinstance(v, bool):
        return [float(v)]
    if isinstance(v, (int, float)):
        return [float(v)]
    if isinstance(v, (list, tuple)):
        return [x for e in v for x in _numbers(e)]
    return []


def compare_section(kind: str, a: list[dict], b: list[dict], tol: float, ignore: tuple[str, ...] = ()) -> dict:
    ra, rb = {_ident(kind, r): r for r in a}, {_ident(kind, r): r for r in b}
    diffs, worst = [], 0.0
    for key in sorted(set(ra) & set(rb), key=str):
        x, y = ra[key], rb[key]
        for f in sorted(set(x) | set(y)):
            if f in _KEYS[kind] or f in ignore:
                continue
            if (f in x) != (f in y):
                diffs.append((key, f, x.get(f), y.get(f), math.inf))
                continue
            nx, ny = _numbers(x[f]), _numbers(y[f])
            if len(nx) != len(ny) or (not nx and x[f] != y[f]):
                diffs.append((key, f, x[f], y[f], math.inf))
                continue
            d = max((abs(p - q) if not (math.isnan(p) and math.isnan(q)) else 0.0 for p, q in zip(nx, ny)),
                    default=0.0)
            worst = max(worst, d)
            if d > tol:
                diffs.append((key, f, x[f], y[f], d))
    return {"matched": len(set(ra) & set(rb)), "only_a": sorted(set(ra) - set(rb), key=str),
            "only_b": sorted(set(rb) - set(ra), key=str), "diffs": diffs, "max_abs": worst}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--sections", default="ranking,detection")
    ap.add_argument("--tol", type=float, default=0.0, help="largest absolute difference counted as equal")
    ap.add_argument("--md", help="also write the comparison as markdown to this file")
    ap.add_argument("--ignore", action="append", default=[], metavar="FIELD",
                    help="a row field not to compare (repeatable), e.g. --ignore table when one run predates it")
    args = ap.parse_args(argv)
    ma, mb = load(args.a), load(args.b)
    ok, lines = True, []
    lines.append(f"| section | rows matched | only in A | only in B | values differing (> {args.tol:g}) "
                 "| largest abs difference |")
    lines.append("|---|---|---|---|---|---|")
    detail = []
    for kind in [s for s in args.sections.split(",") if s]:
        r = compare_section(kind, ma.get(kind, []), mb.get(kind, []), args.tol, tuple(args.ignore))
        ok &= not (r["only_a"] or r["only_b"] or r["diffs"])
        print(f"{kind}: {r['matched']} rows matched, {len(r['only_a'])} only in A, {len(r['only_b'])} only in B, "
              f"{len(r['diffs'])} values differ, largest abs difference {r['max_abs']:.3g}")
        lines.append(f"| {kind} | {r['matched']} | {len(r['only_a'])} | {len(r['only_b'])} | {len(r['diffs'])} "
                     f"| {r['max_abs']:.3g} |")
        for key in r["only_a"] + r["only_b"]:
            side = "A" if key in r["only_a"] else "B"
            print(f"  only in {side}: {dict(zip(_KEYS[kind], key))}")
            detail.append(f"| {kind} | {dict(zip(_KEYS[kind], key))} | only in {side} | | |")
        for key, f, x, y, d in r["diffs"]:
            print(f"  {dict(zip(_KEYS[kind], key))} {f}: {x} vs {y}")
            detail.append(f"| {kind} | {dict(zip(_KEYS[kind], key))} | {f} | {x} | {y} |")
    print("identical" if ok and args.tol == 0 else ("equal within tolerance" if ok else "DIFFERENT"))
    if args.md:
        text = "\n".join(lines) + "\n"
        if detail:
            text += "\n| section | row | field | A | B |\n|---|---|---|---|---|\n" + "\n".join(detail) + "\n"
        Path(args.md).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
