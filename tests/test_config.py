from pathlib import Path

import pytest

from vars_fast.config import ConfigError, PRESETS, from_dict, make_config, parse_set


def test_presets_resolve():
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.preset == name


def test_shipped_config_files_resolve():
    """Every file in configs/ names real keys with valid values, on top of every preset."""
    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        for preset in PRESETS:
            make_config(preset, str(f), [])


def test_override_types_and_roundtrip(tmp_path):
    cfg = make_config("quick", overrides=parse_set(["data.n_users=50", "attack.eps=[4,8]", "run.amp=true"]))
    assert cfg.data.n_users == 50 and cfg.attack.eps == [4, 8] and cfg.run.amp is True
    assert from_dict(cfg.to_dict()) == cfg
    f = tmp_path / "c.yaml"
    f.write_text("preset: quick\ndata:\n  n_items: 77\n")
    assert make_config(config_file=str(f)).data.n_items == 77


@pytest.mark.parametrize("bad, needle", [
    (["data.nope=1"], "data.nope"),
    (["nosection.x=1"], "nosection.x"),
    (["data.n_users=abc"], "data.n_users"),
    (["run.device=tpu"], "run.device"),
    (["attack.eps=[0]"], "attack.eps"),
])
def test_bad_overrides_name_the_key(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        make_config("quick", overrides=parse_set(bad))


def test_missing_config_file_names_path(tmp_path):
    p = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml"):
        make_config(config_file=str(p))


@pytest.mark.parametrize("old", ["defense.eval_eps", "defense.n_detect_items", "defense.adaptive"])
def test_moved_keys_name_the_new_key(old, tmp_path):
    from vars_fast.config import MOVED_KEYS

    new = MOVED_KEYS[old]
    with pytest.raises(ConfigError, match=f"^{old} is now {new}$"):
        make_config("quick", overrides={old: 1})
    section, key = old.split(".")
    f = tmp_path / "old.yaml"
    f.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=f"is now {new}"):
        make_config(config_file=str(f))
    # every moved key names a key that exists
    cfg = make_config("quick")
    for target in MOVED_KEYS.values():
        s, k = target.split(".")
        assert hasattr(getattr(cfg, s), k)


def test_phase1_fingerprint_ignores_fields_read_after_phase1_only():
    import dataclasses

    from vars_fast.config import DefenseConfig
    from vars_fast.defense.training import phase1_fingerprint

    base = DefenseConfig()
    fp = phase1_fingerprint(base, 64)
    assert phase1_fingerprint(dataclasses.replace(base, use_detector=False, lambda_contrastive=0.0,
                                                  detector_eps=[16], threshold_rule="balanced"), 64) == fp
    assert phase1_fingerprint(dataclasses.replace(base, lr=2e-3), 64) != fp
    assert phase1_fingerprint(dataclasses.replace(base, epochs_phase1=1), 64) != fp
    assert phase1_fingerprint(base, 32) != fp
