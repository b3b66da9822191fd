"""report.md from a handmade metrics.json: every table, figures, and notes for missing sections."""
import json

import numpy as np

from vars_fast.report import main, write_report

M = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")


def _rank(model, defense, attack, eps, hr, **kw):
    return {"model": model, "defense": defense, "attack": attack, "eps": eps,
            **{k: hr * (0.5 if "NDCG" in k else 1.0) for k in M}, **kw}


def _metrics():
    R = []
    for model in ("VBPR", "DVBPR", "AMR"):
        R.append(_rank(model, "none", "clean", 0, 0.40))
        for d in ("denoise", "denoise+rand"):
            R.append(_rank(model, d, "clean", 0, 0.395))
        for a in ("fgsm", "pgd"):
            for e in (4, 8, 16):
                R.append(_rank(model, "none", a, e, 0.05))
                R.append(_rank(model, "denoise", a, e, 0.33))
                R.append(_rank(model, "denoise+rand", a, e, 0.25))
    R.append(_rank("VBPR", "denoise+rand", "pgd", 8, 0.15, variant="no-detector"))
    R.append(_rank("VBPR", "denoise+rand", "pgd", 8, 0.20, variant="no-perceptual"))
    R.append(_rank("VBPR", "denoise", "adaptive-pgd", 8, 0.02, n_adaptive_items=50, eot=1))
    R.append(_rank("VBPR", "denoise+rand", "adaptive-pgd", 8, 0.05, n_adaptive_items=50, eot=4))
    for d in ("none", "denoise", "denoise+rand"):  # the evaluation-aware objective, on 40 users
        R.append(_rank("VBPR", d, "clean", 0, 0.45, objective="eval", n_users=40))
        R.append(_rank("VBPR", d, "pgd", 8, 0.01 if d == "none" else 0.3, objective="eval", n_users=40))
    D = []
    for det in ("ours", "addition"):
        for e in (8, 16, 32, 64):
            D.append({"detector": det, "attack": "fgsm", "eps": e, "accuracy": 0.9 + e / 1000, "auc": 0.95,
                      "tpr": 0.9, "fpr": 0.1, "threshold": 0.3, "n_clean": 100, "n_adv": 100})
        for s in (0.05, 0.1):
            D.append({"detector": det, "attack": "gaussian", "eps": s, "clean_rate": 0.97, "accuracy": 0.97,
                      "fpr": 0.03, "threshold": 0.3})
    for e, seen in ((16, True), (64, False)):  # the seen / unseen table, kept out of Table 4
        D.append({"detector": "ours", "attack": "fgsm", "eps": e, "seen": seen, "side": "adversarial",
                  "accuracy": 0.123, "auc": 0.5, "tpr": 0.2, "fpr": 0.1, "n_clean": 10, "n_adv": 10})
    D.append({"detector": "ours", "attack": "jpeg", "eps": None, "quality": 50, "seen": False, "side": "benign",
              "accuracy": 0.9, "auc": 0.6, "tpr": None, "fpr": 0.1, "flagged": 0.1, "n_clean": 10, "n_adv": 0})
    D.append({"detector": "ours", "attack": "pgd", "eps": 8, "variant": "full", "accuracy": 0.94})
    D.append({"detector": "ours", "attack": "pgd", "eps": 8, "variant": "no-perceptual", "accuracy": 0.85})
    D.append({"detector": "ours", "attack": "adaptive-pgd", "eps": 8, "variant": "denoise+rand", "tpr": 0.3,
              "accuracy": 0.6})
    T = [{"attack": a, "eps": e, "defense": d, "model": "VBPR", "prediction_shift": 1.0 + e, "HR@10": 0.1}
         for a in ("aip-insa", "aip-expa", "taamr-fgsm", "taamr-pgd") for e in (4, 8)
         for d in ("none", "denoise", "denoise+rand")]
    meta = {"data": {"n_users": 10, "n_items": 20}, "timings": {"stage_evaluate_s": 12.5},
            "evaluate": {"table_eps": 8, "timings": {"ranking_s": 3.0}}}
    return {"meta": meta, "ranking": R, "detection": D, "targeted": T}


def _arrays(path):
    g = np.random.default_rng(0)
    img = lambda: g.integers(0, 255, (2, 3, 8, 8), dtype=np.uint8)  # noqa: E731
    a = {"d_clean": g.normal(0.2, 0.05, 60), "threshold": np.array(0.3),
         "d_fgsm_8": g.normal(0.4, 0.1, 60), "d_fgsm_16": g.normal(0.5, 0.1, 60),
         "ex_clean": img(), "ex_clean_denoised": img(), "ex_pgd": img(), "ex_pgd_denoised": img(),
         "ex_pgd_rand": img(), "ex_eps": np.array(8.0)}
    for k in ("clean", "denoised", "fgsm", "pgd"):
        a[f"z_{k}"] = g.normal(size=(12, 16)) + (3 if k in ("fgsm", "pgd") else 0)
    (path / "figures").mkdir()
    np.savez_compressed(path / "figures" / "eval_arrays.npz", **a)


def test_full_report(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    _arrays(tmp_path)
    text = write_report(tmp_path).read_text()
    for title in ("## Targets", "## Table 2: recommendation under attack (VBPR", "## Table 3: recommendation under "
                  "attack (DVBPR", "## Table 4", "Gaussian noise", "## Table 5", "## Table 6", "Adaptive attacker",
                  "HR@10 versus eps", "evaluation-aware attacker", "Seen / unseen"):
        assert title in text, title
    # the oracle rows have their own table and never leak into Tables 2/3
    assert "| VBPR | none | 40 | 0.4500 | 0.0100 |" in text
    assert "0.4500" not in text.split("## The paper's protocol")[0]
    table4 = text.split("## Table 4")[1].split("## Does the detector generalise")[0]
    assert "0.123" not in table4
    assert "| fgsm | 64/255 | unseen | 0.123 |" in text and "| jpeg | quality 50 | unseen |" in text
    assert "_Not available" not in text
    assert "| FGSM | OURS-rand | 0.2500 |" in text
    assert "remove perceptual loss | 0.8500 |" in text
    assert "TAAMR-PGD (OURS-rand)" in text
    assert "| VBPR | OURS-rand | 8 | 0.3950 | 0.2500 | 0.0500 |" in text
    assert "stage_evaluate_s" in text
    for f in ("fig6_hr_vs_eps", "fig7_denoised_examples", "fig8_distance_hist", "fig9_roc", "fig10_confusion",
              "fig11_tsne"):
        assert (tmp_path / "figures" / f"{f}.png").stat().st_size > 1000
        assert f"figures/{f}.png" in text


def test_missing_sections_are_noted(tmp_path):
    m = _metrics()
    m["targeted"] = []
    m["detection"] = []
    m["ranking"] = [r for r in m["ranking"] if r.get("variant") is None and r["attack"] != "adaptive-pgd"]
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    text = write_report(tmp_path, figures=False).read_text()
    assert "## Table 6" in text and "_Not available: no targeted rows._" in text
    assert "_Not available: no detection rows._" in text
    assert "no adaptive-attack rows" in text
    assert "| Clean | VBPR | 0.4000 |" in text


def test_cli_and_empty_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    (tmp_path / "metrics.json").write_text(json.dumps({"meta": {}, "ranking": [], "detection": [], "targeted": []}))
    assert main([str(tmp_path), "--no-figures"]) == 0
    assert "_Not available" in (tmp_path / "report.md").read_text()
