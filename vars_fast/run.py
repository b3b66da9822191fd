"""The run folder: one place that knows its layout and the metrics.json contract.

runs/<name>/
  config.yaml  metrics.json  report.md  log.txt
  figures/*.png  checkpoints/*.pt  attacks/*.npy  cache/

metrics.json = {"meta": {...}, "ranking": [...], "detection": [...], "targeted": [...], "fidelity": [...],
                "robustness": [...]}
Rows are replaced, not duplicated, when a stage is re-run: a row's identity is its
non-metric fields (see ``_KEYS``). Every ranking row names its attack objective
(``"objective": "train" | "eval"``, docs/CONTRACTS.md); a row that does not say is a
catalogue-wide row on every user, i.e. ``"train"``.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from vars_fast.io import atomic_write_json

_KEYS = {
    "ranking": ("model", "defense", "attack", "eps", "variant", "objective", "transfer", "finetune_epochs"),
    "detection": ("detector", "attack", "eps", "variant", "model", "seen", "quality", "transfer", "finetune_epochs"),
    "targeted": ("attack", "eps", "defense", "model", "variant"),
    "fidelity": ("model", "attack", "eps", "images"),
    # robustness against the informed attacker: the attack suite (evaluate/suite.py) and the
    # certificates; "loss" tells the suite's APGD members apart, "variant" the points of a sweep
    # (the bounded model's caps, evaluate/robustness.py)
    "robustness": ("model", "defense", "attack", "eps", "certified", "objective", "loss", "variant"),
}


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        for sub in ("figures", "checkpoints", "attacks", "cache"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # layout
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def checkpoint(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.pt"

    def figure(self, name: str) -> Path:
        return self.path / "figures" / f"{name}.png"

    def attack_file(self, model: str, attack: str, eps: int | float) -> Path:
        return self.path / "attacks" / f"{model}_{attack}_eps{int(eps)}.npy"

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    # metrics
    def load_metrics(self) -> dict[str, Any]:
        if self.metrics_path.is_file():
            return json.loads(self.metrics_path.read_text())
        return {"meta": {}, "ranking": [], "detection": [], "targeted": [], "fidelity": [], "robustness": []}

    def add_rows(self, kind: str, rows: list[dict[str, Any]], table: str) -> None:
        """Add (or replace, by identity) ``rows`` of ``kind``; each row carries ``table``: the
        evaluation section that draws it in report.md (``vars_fast.registry.SECTIONS``)."""
        if kind not in _KEYS:
            raise ValueError(f"unknown metrics section {kind!r}")
        rows = [{**r, "table": r.get("table", table)} for r in rows]
        with self._lock:
            m = self.load_metrics()
            keys = _KEYS[kind]
            if kind == "ranking":
                rows = [r if "objective" in r else {**r, "objective": "train"} for r in rows]
            ident = lambda r: tuple(r.get(k) for k in keys)  # noqa: E731
            new = {ident(r) for r in rows}
            m[kind] = [r for r in m.get(kind, []) if ident(r) not in new] + list(rows)
            atomic_write_json(self.metrics_path, m)

    def update_meta(self, **kv: Any) -> None:
        with self._lock:
            m = self.load_metrics()
            m.setdefault("meta", {}).update(kv)
            atomic_write_json(self.metrics_path, m)

    def rows(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.load_metrics().get(kind, []) if all(r.get(k) == v for k, v in match.items())]
