import pytest

from vars_fast.config import ConfigError, PRESETS, from_dict, make_config, parse_set


def test_presets_resolve():
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.preset == name


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
