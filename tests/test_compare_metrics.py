"""benchmarks/compare_metrics.py: rows matched by identity, every numeric field compared."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("compare_metrics", ROOT / "benchmarks" / "compare_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, ranking: list, detection: list) -> Path:
    path.mkdir()
    (path / "metrics.json").write_text(json.dumps({"ranking": ranking, "detection": detection,
                                                   "meta": {"evaluate": {"timings": {"ranking_s": 1.0}}}}))
    return path


def test_identical_runs_pass_and_a_changed_value_fails(tmp_path, capsys):
    cm = _load()
    rank = [{"model": "VBPR", "defense": "none", "attack": "clean", "eps": 0, "HR@10": 0.5},
            {"model": "VBPR", "defense": "denoise", "attack": "pgd", "eps": 8, "HR@10": 0.25}]
    det = [{"detector": "ours", "attack": "fgsm", "eps": 8, "auc": 0.9, "confusion": [[3, 1], [0, 4]]}]
    a = _write(tmp_path / "a", rank, det)
    b = _write(tmp_path / "b", list(reversed(rank)), det)  # row order does not matter
    assert cm.main([str(a), str(b)]) == 0
    assert "identical" in capsys.readouterr().out

    changed = [dict(rank[0]), dict(rank[1], **{"HR@10": 0.2501})]
    c = _write(tmp_path / "c", changed, [dict(det[0], confusion=[[3, 1], [1, 3]])])
    md = tmp_path / "cmp.md"
    assert cm.main([str(a), str(c), "--md", str(md)]) == 1
    out = capsys.readouterr().out
    assert "ranking: 2 rows matched, 0 only in A, 0 only in B, 1 values differ" in out
    assert "detection: 1 rows matched, 0 only in A, 0 only in B, 1 values differ" in out
    assert "| ranking | 2 | 0 | 0 | 1 |" in md.read_text()
    assert cm.main([str(a), str(c), "--tol", "1e-3", "--sections", "ranking"]) == 0

    d = _write(tmp_path / "d", rank[:1], det)
    assert cm.main([str(a / "metrics.json"), str(d)]) == 1
    assert "1 only in A" in capsys.readouterr().out
