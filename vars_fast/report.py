"""report.md and the figures of a run folder, from metrics.json (+ figures/eval_arrays.npz).

    python -m vars_fast report RUN_DIR        (or: python -m vars_fast.report RUN_DIR)

Needs no model: it can be re-run at any time. The report is the header below, then every
registered evaluation section's part (``vars_fast.registry.SECTIONS``, in ``Section.order``:
its tables, 4 decimals, and its figures, matplotlib Agg PNGs in RUN_DIR/figures), then the
run's metadata. A section whose rows are missing says so instead of failing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from vars_fast.cli import add_debug_flag, user_errors_exit
from vars_fast.evaluate.section import Doc, load_doc, missing, table
from vars_fast.registry import SECTIONS

# what the default preset leaves to "full", and where a committed run of it is
FULL_PRESET_NOTE = ("The `default` preset is sized for about 25 minutes on 2 CPU cores. `--preset full` adds the "
                    "`eval` objective on 100 users instead of 32, the adaptive attacker at 8 EOT draws instead of 4, "
                    "and the adaptive attacker on the `eval` lists. A committed run of it is "
                    "`docs/results/full_run.md` in the vars_fast source tree.")


def meta_section(meta: dict) -> str:
    if not meta:
        return missing("no meta")
    rows = []
    ver = meta.get("versions", {})
    if ver.get("device_name"):  # seconds and float results depend on the machine: name it
        cpus = f" ({ver['cpus']} CPUs, {ver['threads']} threads)" if "cpus" in ver else ""
        rows.append(["machine", f"{ver['device_name']}{cpus}"])
    if ver.get("torch"):
        rows.append(["torch", ver["torch"]])
    for k, v in meta.items():
        if k in ("config", "versions"):
            continue
        if isinstance(v, dict):
            for k2, v2 in v.items():
                rows.append([f"{k}.{k2}", json.dumps(v2) if isinstance(v2, (dict, list)) else v2])
        else:
            rows.append([k, json.dumps(v) if isinstance(v, list) else v])
    return table(["key", "value"], rows)


def header(doc: Doc) -> list[str]:
    parts = [f"# vars_fast run report: {doc.run.name}", "",
             f"Generated from `metrics.json` (re-run: `python -m vars_fast report {doc.run}`). "
             f"Tables 2/3/5 and the adaptive rows use eps = {doc.eps:g}/255. Every table is the realistic "
             "threat model (`objective: train`: one uploaded image per item, crafted from training "
             "triples) unless its heading says otherwise.", ""]
    if doc.meta.get("config", {}).get("preset") == "default":
        parts += [FULL_PRESET_NOTE, ""]
    return parts


def render(doc: Doc) -> str:
    """report.md's text: the header, each registered section's part, the metadata."""
    parts = header(doc)
    for name, section in sorted(SECTIONS.items(), key=lambda kv: kv[1].order):
        if section.report is not None:
            parts += section.report(doc)
    parts += ["## Data and run", "", meta_section(doc.meta), ""]
    return "\n".join(parts) + "\n"


def write_report(run_folder: str | Path, figures: bool = True) -> Path:
    """Write RUN/report.md (and the figures unless ``figures=False``); returns its path."""
    doc = load_doc(run_folder, figures)
    out = doc.run / "report.md"
    out.write_text(render(doc))
    return out


@user_errors_exit()
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vars_fast report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run folder holding metrics.json")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "metrics.json").is_file():
        raise FileNotFoundError(f"{Path(args.run_dir) / 'metrics.json'} not found")
    print(write_report(args.run_dir, figures=not args.no_figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
