import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import yaml

from vars_fast.config import (MOVED_KEYS, PRESETS, ConfigError, DeprecatedKeyWarning, eval_key, from_dict, make_config,
                              parse_set)
from vars_fast.config.moved import FLATTENED

ROOT = Path(__file__).resolve().parents[1]


def test_presets_resolve():
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.preset == name


def test_shipped_config_files_resolve():
    """Every file in configs/ names real keys with valid values, on top of every preset."""
    files = sorted((ROOT / "configs").glob("*.yaml"))
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


@pytest.mark.parametrize("old", ["defense.eval_eps", "defense.n_detect_items", "defense.adaptive",
                                 "defense.adaptive_eot"])
def test_expired_keys_name_the_new_key(old, tmp_path):
    new = MOVED_KEYS[old].to
    assert MOVED_KEYS[old].expired
    with pytest.raises(ConfigError, match=f"^{re.escape(old)} is now {re.escape(new)}$"):
        make_config("quick", overrides={old: 1})
    section, key = old.split(".")
    f = tmp_path / "old.yaml"
    f.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=f"is now {re.escape(new)}"):
        make_config(config_file=str(f))


def test_every_moved_key_names_a_key_that_exists():
    cfg = make_config("quick")
    for old, moved in MOVED_KEYS.items():
        assert not dataclasses.is_dataclass(eval_key(cfg, moved.to)), (old, moved.to)
    assert MOVED_KEYS["defense.adaptive"].to == "eval.adaptive.enabled"  # followed through the later move
    # every field of every sub-section that replaced flat keys keeps its old name working
    for path in FLATTENED:
        for f in dataclasses.fields(eval_key(cfg, path)):
            assert any(m.to == f"{path}.{f.name}" and not m.expired for m in MOVED_KEYS.values()), f"{path}.{f.name}"


@pytest.mark.parametrize("old, new, value", [
    ("recommender.amr_eps", "recommender.amr.eps", 0.3),
    ("recommender.amr_lambda", "recommender.amr.lambda_adv", 2.0),
    ("recommender.select", "recommender.select.mode", "on"),
    ("recommender.select_trials", "recommender.select.trials", 3),
    ("recommender.dvbpr_cnn", "recommender.dvbpr.cnn", "small"),
    ("eval.adaptive", "eval.adaptive.enabled", False),
    ("eval.adaptive_eot", "eval.adaptive.eot", 3),
    ("eval.transfer_style", "eval.transfer.style", "classic"),
    ("eval.addition_users", "defense.addition.users", 8),
    ("defense.adaptive_train", "defense.adaptive_train.enabled", True),
])
def test_renamed_keys_warn_in_one_line_and_set_the_new_key(old, new, value, tmp_path):
    msg = f"^{re.escape(old)} is deprecated: use {re.escape(new)}$"
    with pytest.warns(DeprecatedKeyWarning, match=msg):
        cfg = make_config("quick", overrides=parse_set([f"{old}={value}"]))
    assert eval_key(cfg, new) == value
    section, key = old.split(".")
    f = tmp_path / "old.yaml"
    f.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.warns(DeprecatedKeyWarning, match=msg):
        assert eval_key(make_config("quick", str(f)), new) == value


def test_nested_keys_work_in_set_yaml_and_roundtrip(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names never warn
        cfg = make_config("quick", overrides=parse_set(["recommender.amr.eps=0.3", "eval.adaptive={eot: 3}",
                                                        "defense.addition.train_eps=[4,8]"]))
        assert cfg.recommender.amr.eps == 0.3 and cfg.eval.adaptive.eot == 3
        assert cfg.defense.addition.train_eps == [4, 8]
        assert cfg.eval.adaptive.steps == PRESETS["quick"]["eval.adaptive.steps"]  # a mapping sets only its keys
        f = tmp_path / "new.yaml"
        f.write_text("recommender:\n  select:\n    mode: 'on'\n    k: [8]\n  dvbpr:\n    epochs: 2\n"
                     "defense:\n  addition:\n    users: 16\n")
        cfg = make_config("quick", str(f))
        assert cfg.recommender.select.mode == "on" and cfg.recommender.select.k == [8]
        assert cfg.recommender.dvbpr.epochs == 2 and cfg.defense.addition.users == 16
        assert from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match=r"unknown config key 'recommender\.amr\.nope' \(recommender\.amr has: "):
        make_config("quick", overrides={"recommender.amr.nope": 1})
    with pytest.raises(ConfigError, match=r"^recommender\.select\.mode: must be one of auto, on, off"):
        make_config("quick", overrides={"recommender.select.mode": "sometimes"})


def test_an_old_run_folders_flat_config_still_loads():
    """docs/results/data/default_run/config.yaml was saved before the sub-sections: it loads,
    with one warning for all its old keys, into the same values under the new names."""
    old = yaml.safe_load((ROOT / "docs" / "results" / "data" / "default_run" / "config.yaml").read_text())
    assert "adaptive_eot" in old["eval"] and "amr_eps" in old["recommender"]  # really the flat layout
    with pytest.warns(DeprecatedKeyWarning) as caught:
        cfg = from_dict(old)
    assert len(caught) == 1 and "deprecated keys" in str(caught[0].message)
    assert cfg.eval.adaptive.eot == old["eval"]["adaptive_eot"] and cfg.eval.adaptive.enabled == old["eval"]["adaptive"]
    assert cfg.recommender.amr.lambda_adv == old["recommender"]["amr_lambda"]
    assert cfg.recommender.dvbpr.train_blocks == old["recommender"]["dvbpr_train_blocks"]
    assert cfg.defense.addition.change == old["eval"]["addition_change"]
    assert cfg.defense.adaptive_train.enabled == old["defense"]["adaptive_train"]
    assert cfg.data.n_items == old["data"]["n_items"] and cfg.preset == old["preset"]


def test_cli_prints_a_deprecation_in_one_line(capsys):
    from vars_fast.cli import one_line_warnings

    with warnings.catch_warnings():  # restores Python's showwarning afterwards
        warnings.simplefilter("always")
        one_line_warnings()  # what every command-line entry point installs
        make_config("quick", overrides={"recommender.amr_eps": 0.3})
    err = capsys.readouterr().err
    assert err == "warning: recommender.amr_eps is deprecated: use recommender.amr.eps\n"


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
