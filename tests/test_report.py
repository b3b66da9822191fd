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
            "versions": {"torch": "2.14.1", "device_name": "Test CPU", "cpus": 2, "threads": 2},
            "evaluate": {"table_eps": 8, "timings": {"ranking_s": 3.0}},
            "suite": {"traces": {"VBPR/apgd-bpr/8": [0.1, 0.5, 0.7, 0.75, 0.76]}}}
    F = [{"model": "VBPR", "attack": "clean", "eps": 0, "images": "denoised", "psnr": 41.25, "ssim": 0.991, "n": 8},
         {"model": "VBPR", "attack": "pgd", "eps": 8, "images": "attacked", "psnr": 33.5, "ssim": 0.9, "n": 8}]
    S = [{"model": "VBPR", "defense": "none", "attack": a, "eps": e, "HR@10": h, "certified": False,
          "strength": "light", **kw}
         for a, e, h, kw in (("clean", 0, 0.40, {}), ("pgd5", 8, 0.05, {}), ("apgd", 8, 0.04, {"loss": "bpr"}),
                             ("suite", 8, 0.03, {}), ("noise", 8, 0.395, {}))]
    return {"meta": meta, "ranking": R, "detection": D, "targeted": T, "fidelity": F, "robustness": S}


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
                  "HR@10 versus eps", "evaluation-aware attacker", "Seen / unseen", "Image fidelity"):
        assert title in text, title
    # the oracle rows have their own table and never leak into Tables 2/3
    assert "| VBPR | none | 40 | 0.4500 | 0.0100 |" in text
    assert "0.4500" not in text.split("## The paper's protocol")[0]
    assert "| VBPR | clean | 0 | D(x) | 41.2500 | 0.9910 | 8 |" in text
    table4 = text.split("## Table 4")[1].split("## Does the detector generalise")[0]
    assert "0.123" not in table4
    assert "| fgsm | 64/255 | unseen | 0.123 |" in text and "| jpeg | quality 50 | unseen |" in text
    assert "_Not available" not in text
    assert "| FGSM | OURS-rand | 0.2500 |" in text
    assert "remove perceptual loss | 0.8500 |" in text
    assert "TAAMR-PGD (OURS-rand)" in text
    assert "| VBPR | OURS-rand | 8 | 0.3950 | 0.2500 | 0.0500 |" in text
    assert "stage_evaluate_s" in text
    assert "## The attack suite (undefended models)" in text and "| 8 | 0.4000 | 0.0500 | 0.0400 |" in text
    assert "- ok: eps 8: the suite (0.0300) is at least as strong as PGD-5 (0.0500)" in text
    assert "| machine | Test CPU (2 CPUs, 2 threads) |" in text and "| torch | 2.14.1 |" in text
    for f in ("fig6_hr_vs_eps", "fig7_denoised_examples", "fig8_distance_hist", "fig9_roc", "fig10_confusion",
              "fig11_tsne", "fig_suite_traces"):
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


def test_targets_table_damage_recovered_and_too_weak(tmp_path):
    from vars_fast.evaluate.targets import targets_summary

    R = [_rank("VBPR", "none", "clean", 0, 0.40), _rank("VBPR", "denoise", "clean", 0, 0.396),
         _rank("VBPR", "none", "fgsm", 8, 0.38),            # 5% damage: too weak to judge
         _rank("VBPR", "denoise", "fgsm", 8, 0.40),
         _rank("VBPR", "none", "pgd", 8, 0.10),             # 75% damage
         _rank("VBPR", "denoise", "pgd", 8, 0.34),          # (0.34 - 0.10) / 0.30 = 0.80: met (>= 0.70)
         _rank("VBPR", "denoise+rand", "pgd", 8, 0.22),     # 0.40: missed by 0.10 (>= 0.50)
         _rank("VBPR", "denoise", "adaptive-pgd", 8, 0.16),  # against plain PGD: 0.20, missed
         _rank("VBPR", "none", "pgd", 16, 0.05),
         _rank("VBPR", "denoise", "pgd", 16, 0.12),         # 0.20, no target away from the table eps
         _rank("VBPR", "detect+denoise", "pgd", 8, 0.40)]   # OURS-gated: reported, no target
    text = targets_summary({"ranking": R, "detection": []}, 8.0)
    assert "| clean HR@10 with OURS (>= 98% of undefended) | 0.9900 | 0.9800 | met |" in text
    assert "| FGSM | 8 | 0.3800 | 0.0500 | OURS | 0.4000 | 1.0000 | 0.7000 | attack too weak to judge |" in text
    assert "| PGD | 8 | 0.1000 | 0.7500 | OURS | 0.3400 | 0.8000 | 0.7000 | met |" in text
    assert "| PGD | 8 | 0.1000 | 0.7500 | OURS-rand | 0.2200 | 0.4000 | 0.5000 | missed by 0.1000 |" in text
    assert "| ADAPTIVE-PGD | 8 | 0.1000 | 0.7500 | OURS | 0.1600 | 0.2000 | 0.7000 | missed by 0.5000 |" in text
    assert "| PGD | 16 | 0.0500 | 0.8750 | OURS | 0.1200 | 0.2000 | — | no target at this eps |" in text
    assert "| PGD | 8 | 0.1000 | 0.7500 | OURS-gated | 0.4000 | 1.0000 | — | no target |" in text
    # objectives are kept apart when the rows carry one
    R2 = [_rank("VBPR", "none", "clean", 0, 0.40)]
    for obj, att, den in (("train", 0.20, 0.36), ("eval", 0.0, 0.10)):
        R2 += [_rank("VBPR", "none", "pgd", 8, att, objective=obj), _rank("VBPR", "denoise", "pgd", 8, den, objective=obj)]
    text = targets_summary({"ranking": R2, "detection": []}, 8.0)
    assert "| PGD (train) | 8 | 0.2000 | 0.5000 | OURS | 0.3600 | 0.8000 | 0.7000 | met |" in text
    assert "| PGD (eval) | 8 | 0.0000 | 1.0000 | OURS | 0.1000 | 0.2500 | 0.7000 | missed by 0.4500 |" in text


def test_fig7_prints_psnr_ssim(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vars_fast.evaluate.ranking import fig7

    g = np.random.default_rng(1)
    clean = g.integers(40, 200, (2, 3, 16, 16), dtype=np.uint8)
    a = {"ex_clean": clean, "ex_clean_denoised": clean + np.uint8(2), "ex_pgd": clean + np.uint8(8),
         "ex_pgd_denoised": clean, "ex_eps": np.array(8.0)}
    m = {"fidelity": [{"model": "VBPR", "attack": "clean", "eps": 0, "images": "denoised", "psnr": 36.5, "ssim": 0.97},
                      {"model": "VBPR", "attack": "pgd", "eps": 8, "images": "denoised", "psnr": 33.0, "ssim": 0.95}]}
    seen = {}
    orig = plt.Figure.savefig

    def spy(fig, path, *args, **kw):
        seen[str(path)] = [t.get_text() for ax in fig.axes for t in (ax.xaxis.label,)] + [fig._suptitle.get_text()]
        return orig(fig, path, *args, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    fig = fig7(m["fidelity"], a, plt)
    fig.savefig(tmp_path / "fig7.png")
    texts = next(v for k, v in seen.items() if "fig7" in k)
    # 2/255 everywhere: 20 log10(255 / 2) = 42.1 dB; identical: inf
    assert any(t.startswith("42.1 dB / ") for t in texts)
    assert any(t.startswith("inf dB / 1.000") for t in texts)
    assert "D(clean) 36.5 dB / 0.970" in texts[-1] and "D(PGD) 33.0 dB / 0.950" in texts[-1]
