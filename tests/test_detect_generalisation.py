"""The single-eps detector configuration and the seen / unseen detection table."""
from pathlib import Path

import pytest
import torch

import vars_fast.defense.training as training
# the tiny VBPR (random-weight EfficientNet-Lite0) of the defence training tests
from test_defense_training import BB, setup  # noqa: F401
from vars_fast.config import DefenseConfig, make_config
from vars_fast.evaluate.generalisation import ROW_KEYS, generalisation_rows, markdown_table, seen_inputs

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ROOT / "configs" / "detector_single_eps.yaml"


def tiny_single_eps_dcfg() -> DefenseConfig:
    # the shipped file over a preset, shrunk to a few CPU-seconds of training
    cfg = make_config("quick", str(SINGLE), {
        "defense.width": 4, "defense.n_res_blocks": 1, "defense.heads": 1, "defense.embed_dim": 8,
        "defense.proj_hidden": 16, "defense.proj_dim": 8, "defense.batch_size": 6, "defense.train_pgd_steps": 1,
        "defense.triples_per_item": 2, "defense.train_item_frac": 0.15, "defense.val_item_frac": 0.1})
    return cfg.defense


def test_single_eps_config_file_over_any_preset():
    for preset in ("default", "quick"):
        d = make_config(preset, str(SINGLE)).defense
        assert d.detector_eps == [16] and d.train_eps == [16]
    assert seen_inputs(make_config("default", str(SINGLE)).defense) == {("fgsm", 16.0), ("pgd", 16.0)}
    # the default keeps its multi-eps detector: everything it trains on at 4..64 counts as seen
    multi = seen_inputs(make_config("default").defense)
    assert ("fgsm", 64.0) in multi and ("pgd", 4.0) in multi and ("pgd", 64.0) not in multi


def test_single_eps_config_trains_and_calibrates_the_detector_on_that_eps_only(setup, monkeypatch):
    cat, rec, bb = setup
    dcfg = tiny_single_eps_dcfg()
    calls = []
    real = training.make_adversarial

    def recording(kind, loss_fn, x, eps255, steps, gen):
        calls.append((kind, float(eps255)))
        return real(kind, loss_fn, x, eps255, steps, gen)

    monkeypatch.setattr(training, "make_adversarial", recording)
    split = training.split_items(cat, torch.Generator().manual_seed(0), dcfg.train_item_frac, dcfg.val_item_frac)
    defense, hist = training.train_defense(cat, rec, bb, dcfg, split, backbone_cfg=BB, device="cpu", seed=1,
                                           progress=False)
    assert [h["phase"] for h in hist][-1] == "detector"
    n_train = len(calls)
    assert n_train > 0 and {e for _, e in calls} == {16.0}
    # the detector phase (its own epochs, the last ones) attacks with FGSM only
    n_det_iters = dcfg.detector_epochs * (len(split["train"]) // min(dcfg.batch_size, len(split["train"])))
    assert {k for k, _ in calls[-n_det_iters:]} == {"fgsm"}

    thr, m = training.calibrate_threshold(defense, rec, cat, split["val"], dcfg, torch.Generator().manual_seed(2),
                                          "cpu", batch_size=8)
    assert len(calls) > n_train and set(calls[n_train:]) == {("fgsm", 16.0)}
    assert m["threshold"] == thr


@pytest.fixture(scope="module")
def untrained_defense(setup):
    """A real (untrained) denoiser + detector: the table only needs their distances and a threshold."""
    from vars_fast.defense import Defense
    from vars_fast.defense.denoiser import Denoiser
    from vars_fast.defense.detector import Detector

    cat, rec, bb = setup
    torch.manual_seed(0)
    den = Denoiser(width=4, n_res_blocks=1, patch_size=8, heads=1, embed_dim=8, image_size=cat.images.shape[-1])
    det = Detector(BB, 16, 8, encoder=bb.trainable_copy())
    d = Defense(den, det, image_size=cat.images.shape[-1], backbone=BB)
    with torch.no_grad():
        d.threshold = float(d.distance(cat.item_batch(torch.arange(8))).median())
    return d


def _rows(setup, defense, seed=0, **kw):
    cat, rec, _ = setup
    args = dict(fgsm_eps=(4, 16), pgd_eps=(8, 16), pgd_steps=2, l2_rms=(8,), l2_steps=2, transfer_eps=(8,),
                transfer_steps=2, noise_sigmas=(0.05, 0.2), jpeg_qualities=(75, 50), triples_per_item=2,
                batch_size=3)
    args.update(kw)
    return generalisation_rows(defense, rec, cat, torch.arange(10, 15), torch.Generator().manual_seed(seed),
                               make_config("quick", str(SINGLE)).defense, **args)


def test_generalisation_rows(setup, untrained_defense):
    rows = _rows(setup, untrained_defense)
    key = [(r["attack"], r["eps"] if r["attack"] != "jpeg" else r["quality"]) for r in rows]
    assert key == [("fgsm", 4), ("fgsm", 16), ("pgd", 8), ("pgd", 16), ("pgd-l2", 8), ("transfer", 8),
                   ("gaussian", 0.05), ("gaussian", 0.2), ("jpeg", 75), ("jpeg", 50)]
    seen = {k: r["seen"] for k, r in zip(key, rows)}
    # single-eps config: FGSM/PGD at 16 are trained on, gaussian noise up to clean_noise_sigma (0.1)
    assert seen == {("fgsm", 4): False, ("fgsm", 16): True, ("pgd", 8): False, ("pgd", 16): True,
                    ("pgd-l2", 8): False, ("transfer", 8): False, ("gaussian", 0.05): True,
                    ("gaussian", 0.2): False, ("jpeg", 75): False, ("jpeg", 50): False}
    for r in rows:
        assert set(ROW_KEYS) <= set(r) and r["detector"] == "ours"
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["auc"] <= 1 and 0 <= r["fpr"] <= 1
        if r["side"] == "adversarial":
            assert r["n_clean"] == r["n_adv"] == 5 and 0 <= r["tpr"] <= 1
            # every adversarial row is judged against the same clean set at the same threshold
            assert r["fpr"] == rows[0]["fpr"]
        else:
            assert r["n_adv"] == 0 and r["tpr"] is None and r["flagged"] == r["fpr"]
            assert r["accuracy"] == pytest.approx(1 - r["flagged"])
    l2 = rows[4]
    assert l2["l2"] == pytest.approx(8 / 255 * (3 * 32 * 32) ** 0.5)
    assert rows[5]["surrogate"] == "resnet18"
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "unseen" in table and "quality 50" in table


def test_generalisation_rows_deterministic_and_checks_inputs(setup, untrained_defense):
    kw = dict(fgsm_eps=(8,), pgd_eps=(8,), l2_rms=(), transfer_eps=(8,), noise_sigmas=(0.1,), jpeg_qualities=())
    assert _rows(setup, untrained_defense, seed=4, **kw) == _rows(setup, untrained_defense, seed=4, **kw)
    from vars_fast.defense import Defense

    no_thr = Defense(untrained_defense.denoiser, untrained_defense.detector)
    with pytest.raises(ValueError, match="threshold"):
        _rows(setup, no_thr, **kw)
