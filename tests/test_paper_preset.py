"""The ``paper`` preset end to end at toy scale: ResNet50 at 224 px, the paper's denoiser
(width 64, 9 blocks, 16-px patches, 8 heads), every stage and every metrics section, within
a memory cap.

The scale is cut where shapes do not change: 12 users, 24 items, random backbone weights, one
epoch per phase, one attack eps, one PGD step, one target, two defence training items. The
224-px paths (backbone stages, the global block's token grid, resize-pad, the perceptual and
contrastive terms, every evaluation section) all run.
"""
import json
import os
import resource
import subprocess
import sys
import threading
import time

import pytest

CAP_GB = 8.0
SETS = [
    "data.n_users=12", "data.n_items=24", "data.n_negatives=10", "backbone.weights=none",
    "run.device=cpu", "run.amp=false",
    "recommender.epochs=1", "recommender.amr.epochs=1", "recommender.dvbpr.epochs=1",
    "attack.eps=[8]", "attack.pgd_steps=1", "attack.target_eps=[8]", "attack.n_targets=1",
    "attack.target_steps=1",
    "defense.epochs_phase1=1", "defense.epochs_phase2=1", "defense.detector_epochs=1",
    "defense.train_pgd_steps=1", "defense.batch_size=2", "defense.train_item_frac=0.1",
    "eval.curve_eps=[]", "eval.adaptive.steps=1", "eval.adaptive.items=4", "eval.tsne_points=12",
    "eval.oracle_users=3", "defense.addition.denoiser_epochs=1", "defense.addition.noise_epochs=1",
    "eval.generalisation_fgsm_eps=[8]", "attack.objective=[train,eval]", "eval.oracle_models=[VBPR]", "attack.models=[VBPR,DVBPR]",
    # the adaptive attack holds each item's denoiser graph at once: ~0.9 GiB per item at 224 px
    "eval.batch_size=4",
]


def _tree_rss_sampler(pid: int, peak: list, stop: threading.Event) -> None:
    """Peak of the summed resident size of ``pid`` and its descendants (the defence lanes)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        peak[0] = max(peak[0], total)
        time.sleep(0.2)


@pytest.mark.slow
def test_paper_preset_toy_run_within_memory_cap(tmp_path):
    pytest.importorskip("psutil")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "vars_fast.train", "--preset", "paper", "--out", str(out), "--no-progress"]
    for s in SETS:
        argv += ["--set", s]
    env = {**os.environ, "VARS_FAST_PROGRESS": "0", "VARS_FAST_MEMORY_GB": str(CAP_GB)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_tree_rss_sampler, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    try:
        log, _ = proc.communicate(timeout=3600)
    finally:
        stop.set()
        proc.kill()
    sampler.join()
    assert proc.returncode == 0, log[-6000:]
    # the largest single process, as the kernel counts it, and the summed tree as sampled
    max_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert max_child < CAP_GB * 2**30, max_child
    assert peak[0] < CAP_GB * 2**30, f"peak RSS of the run {peak[0] / 2**30:.1f} GiB"

    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"meta", "ranking", "detection", "targeted"}
    cfg = m["meta"]["config"]
    assert cfg["data"]["image_size"] == 224 and cfg["backbone"]["name"] == "resnet50"
    assert cfg["defense"]["width"] == 64 and cfg["defense"]["n_res_blocks"] == 9
    assert set(m["meta"]["defense"]) == {"full", "no-detector", "no-perceptual"}
    R = m["ranking"]
    models = {r["model"] for r in R if r["attack"] == "clean" and r["defense"] == "none"}
    assert models == {"VBPR", "AMR", "DVBPR", "BPR", "Pop"}
    vbpr = {(r["attack"], r["defense"]) for r in R if r["model"] == "VBPR" and r.get("variant") is None}
    for a in ("fgsm", "pgd"):
        for d in ("none", "denoise", "denoise+rand"):
            assert (a, d) in vbpr, (a, d)
    assert ("adaptive-pgd", "denoise") in vbpr and ("adaptive-pgd", "denoise+rand") in vbpr
    assert {r["variant"] for r in R if r.get("variant")} >= {"no-detector", "no-perceptual"}
    D = m["detection"]
    assert {r["detector"] for r in D if r["attack"] == "fgsm"} == {"ours", "addition"}
    assert any(r["attack"] == "gaussian" for r in D)
    assert {r["attack"] for r in m["targeted"]} >= {"aip-insa", "aip-expa", "taamr-fgsm", "taamr-pgd"}
    for r in R:
        for k in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"):
            assert 0.0 <= r[k] <= 1.0
    report = (out / "report.md").read_text()
    assert "Table 2" in report and "Table 4" in report and "Table 5" in report and "Table 6" in report
