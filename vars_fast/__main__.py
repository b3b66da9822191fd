"""The one command line: python -m vars_fast {train,evaluate,report,screen} [ARGS]

    python -m vars_fast train --preset quick --out runs/q     # the pipeline into a run folder
    python -m vars_fast evaluate runs/q --section adaptive    # re-run sections of a finished run
    python -m vars_fast report runs/q                         # redraw report.md and the figures
    python -m vars_fast screen --input images.csv --checkpoint runs/q/checkpoints/defense.pt --out s

``python -m vars_fast <command> --help`` shows each command's options. ``python -m
vars_fast.train`` and ``python -m vars_fast.screen`` keep working.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

# command -> the module whose main(argv) runs it (imported on use: --help stays fast)
COMMANDS = {"train": "vars_fast.train", "evaluate": "vars_fast.evaluate.cli", "report": "vars_fast.report",
            "screen": "vars_fast.screen"}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[command]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
