"""An evaluation section: one module that computes its rows, draws its tables and, optionally,
its figures.

A section is a ``Section`` registered in ``vars_fast.registry.SECTIONS``::

    SECTIONS.register("toy", Section(order=95, run=toy_rows, report=toy_tables))

* ``run(ev)`` (optional) computes rows during the evaluate stage (``ev``: the shared
  ``evaluate.common.Evaluation``) and writes them with ``ev.run.add_rows(kind, rows,
  table="toy")``: every row names the section that draws it;
* ``report(doc)`` (optional) returns the section's part of ``report.md`` (heading included) as
  a list of lines, from ``doc`` (the run's rows, arrays and table eps) alone, without models;
* ``order`` places it, in the evaluate stage and in the report alike.

``report.py`` loops over the registered sections; so does the evaluate stage. This module also
holds what every table shares: cell formatting, row lookup and figure saving.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ARRAYS = "eval_arrays.npz"
METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")
NOT_RUN = "–"  # a table cell whose point was not run (its row is absent from metrics.json)
KINDS = ("ranking", "detection", "targeted", "fidelity", "robustness")


@dataclass
class Section:
    order: float
    run: Optional[Callable[[Any], None]] = None
    report: Optional[Callable[["Doc"], list[str]]] = None


# ------------------------------------------------------------------ cells and rows
def fmt(v: Any) -> str:
    if v is None:
        return NOT_RUN
    if isinstance(v, float):
        return "NaN" if v != v else f"{v:.4f}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _eq(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def find(rows: list[dict], **match) -> Optional[dict]:
    """First row matching; ``variant`` absent in ``match`` means the row has no variant."""
    match.setdefault("variant", None)
    for r in rows:
        if all(_eq(r.get(k), v) for k, v in match.items()):
            return r
    return None


def missing(what: str) -> str:
    return f"_Not available: {what}._"


def legacy_table(kind: str, row: dict) -> str:
    """The table of a row written before rows carried ``table`` (old run folders), from the
    marker keys that told the tables apart then."""
    if kind == "fidelity":
        return "ranking"
    if kind == "robustness":
        return "suite"
    if kind == "targeted" or row.get("transfer"):
        return kind if kind == "targeted" else "transfer"
    if row.get("attack") in ("adaptive-pgd", "clean-adaptive-subset"):
        return "adaptive"
    if kind == "detection":
        if "seen" in row:
            return "generalisation"
        return "ablation" if row.get("variant") and row.get("detector") == "ours" else "detection"
    if row.get("variant") is not None:
        return "ablation"
    return "oracle" if row.get("objective") == "eval" else "ranking"


# ------------------------------------------------------------------ what a section reads
@dataclass
class Doc:
    """A run folder as the report's sections read it: rows per kind and table, the figure
    arrays, the table eps; ``figure`` draws into ``run/figures`` when figures are on."""

    run: Path
    metrics: dict
    arrays: dict = field(default_factory=dict)
    figures: bool = True

    def __post_init__(self):
        for kind in KINDS:
            rows = self.metrics.get(kind, [])
            self.metrics[kind] = [r if "table" in r else {**r, "table": legacy_table(kind, r)} for r in rows]

    @property
    def meta(self) -> dict:
        return self.metrics.get("meta", {})

    def rows(self, kind: str, *tables: str, objective: Optional[str] = None) -> list[dict]:
        """Rows of ``kind`` written for any of ``tables`` (all when none given); ``objective``
        keeps the ranking rows of that threat model (rows without one are ``train``)."""
        return [r for r in self.metrics.get(kind, []) if (not tables or r["table"] in tables)
                and (objective is None or r.get("objective", "train") == objective)]

    @property
    def eps(self) -> float:
        """The eps of Tables 2/3/5 and the adaptive rows."""
        ev = self.meta.get("evaluate", {})
        if "table_eps" in ev:
            return float(ev["table_eps"])
        eps = sorted({float(r["eps"]) for r in self.rows("ranking", "ranking") if r.get("attack") != "clean"})
        return 8.0 if 8.0 in eps or not eps else eps[0]

    def figure(self, name: str, title: str, draw: Callable) -> list[str]:
        """Markdown for figure ``name``: ``draw(plt) -> Figure | None`` (None: its data is not in
        this run). A figure that fails says so in one line; it never loses the tables."""
        if not self.figures:
            return []
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = draw(plt)
            if fig is None:
                return [f"- {title}: " + missing("its data is not in this run"), ""]
            out = self.run / "figures"
            out.mkdir(parents=True, exist_ok=True)
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
        except Exception as e:  # noqa: BLE001 - a broken figure must not lose the tables
            return [f"_{title} failed: {type(e).__name__}: {e}_", ""]
        return [f"![{title}](figures/{name}.png)", ""]


def load_doc(run: str | Path, figures: bool = True) -> Doc:
    run = Path(run)
    mp = run / "metrics.json"
    m = json.loads(mp.read_text()) if mp.is_file() else {"meta": {}}
    arrays: dict = {}
    p = run / "figures" / ARRAYS
    if p.is_file():
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files}
    return Doc(run, m, arrays, figures)
