"""``validate``: what ``make_config`` and ``from_dict`` check once every value is set.

Names (of models, attacks, sources, ...) are checked against their family's registry
(``vars_fast.registry``), which a member joins where it is defined: this module spells no
member's name. Closed choices are the field's ``Literal[...]`` type. The rest are ranges. A
failure is one ConfigError line naming the key.
"""
from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal

from vars_fast import registry as R
from vars_fast.config.loading import _hint, eval_key
from vars_fast.config.schema import Config
from vars_fast.errors import ConfigError

# config key -> the registry its names come from and the metadata they need there
NAMED_KEYS: dict[str, tuple[R.Registry, dict[str, Any]]] = {
    "data.source": (R.SOURCES, {}),
    "backbone.name": (R.BACKBONES, {}),
    "recommender.models": (R.RECOMMENDERS, {}),
    "attack.models": (R.RECOMMENDERS, {}),
    "eval.models": (R.RECOMMENDERS, {}),
    "eval.curve_models": (R.RECOMMENDERS, {}),
    "eval.oracle_models": (R.RECOMMENDERS, {}),
    "attack.untargeted": (R.ATTACKS, {"ball": "linf"}),  # eps in /255 per pixel
    "attack.objective": (R.OBJECTIVES, {}),
    "attack.loss": (R.ATTACK_LOSSES, {}),
    "eval.suite.losses": (R.ATTACK_LOSSES, {}),
    "eval.suite.yardstick": (R.ATTACK_LOSSES, {}),
    "eval.suite.models": (R.RECOMMENDERS, {}),
    "attack.targets": (R.TARGETED, {}),
    "defense.ablations": (R.DEFENSE_VARIANTS, {}),
    "defense.threshold_rule": (R.THRESHOLD_RULES, {}),
    "run.backend": (R.BACKENDS, {}),
    "run.stages": (R.STAGES, {}),
}


def choices(key: str) -> list[str] | None:
    """The names ``key`` accepts (a registry's, or a ``Literal`` field's), else None."""
    if key in NAMED_KEYS:
        reg, meta = NAMED_KEYS[key]
        return reg.where(**meta) if meta else reg.names()
    *path, name = key.split(".")
    section: Any = eval_key(Config(), ".".join(path)) if path else Config()
    tp = _hint(typing.get_type_hints(type(section)).get(name))
    return [str(a) for a in typing.get_args(tp)] if typing.get_origin(tp) is Literal else None


def _check_literals(obj: Any, prefix: str = "") -> None:
    """Every ``Literal[...]`` field of the dataclass ``obj`` (recursively) holds one of its values."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        v, key, tp = getattr(obj, f.name), f"{prefix}{f.name}", _hint(hints[f.name])
        if is_dataclass(v):
            _check_literals(v, key + ".")
        elif typing.get_origin(tp) is Literal and v not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, typing.get_args(tp)))} (got {v!r})")


def validate(cfg: Config) -> None:
    def check(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg} (got {eval_key(cfg, key)!r})")

    _check_literals(cfg)
    for key, (reg, meta) in NAMED_KEYS.items():
        reg.check(eval_key(cfg, key), key, **meta)
    check(len(cfg.attack.objective) > 0, "attack.objective", "must name at least one objective")
    # cycle: vars_fast.data (its catalogue) imports the config; importing it loads torch too
    from vars_fast.data.synthetic import STYLES

    check(cfg.eval.transfer.style in STYLES, "eval.transfer.style", f"must be one of {', '.join(STYLES)}")
    check(cfg.data.image_size >= 16, "data.image_size", "must be >= 16")
    check(cfg.data.min_interactions >= 2, "data.min_interactions", "must be >= 2 (leave-one-out needs a train item)")
    check(cfg.data.n_negatives >= 1, "data.n_negatives", "must be >= 1")
    rc = cfg.recommender
    check(rc.select.trials >= 1, "recommender.select.trials", "must be >= 1")
    check(rc.dvbpr.backbone_lr_mult > 0, "recommender.dvbpr.backbone_lr_mult", "must be > 0")
    check(rc.dvbpr.train_blocks >= 0, "recommender.dvbpr.train_blocks", "must be >= 0")
    check(all(0 < float(e) <= 255 for e in cfg.attack.eps), "attack.eps", "entries must be in (0, 255] (/255 units)")
    check(cfg.attack.pgd_steps >= 1, "attack.pgd_steps", "must be >= 1")
    ec = cfg.eval
    check(ec.oracle_users >= 0, "eval.oracle_users", "must be >= 0 (0: every user)")
    check(ec.transfer.finetune_epochs >= 0, "eval.transfer.finetune_epochs", "must be >= 0")
    check(ec.transfer.users >= 0 and ec.transfer.items >= 0, "eval.transfer.items",
          "eval.transfer.users/items must be >= 0 (0: as data)")
    check(ec.adaptive.eot >= 1, "eval.adaptive.eot", "must be >= 1")
    check(ec.adaptive.steps >= 0, "eval.adaptive.steps", "must be >= 0 (0: attack.pgd_steps)")
    check(ec.adaptive.items >= 0, "eval.adaptive.items", "must be >= 0 (0: every item)")
    check(ec.adaptive.oracle_users >= -1, "eval.adaptive.oracle_users", "must be >= -1 (0: every oracle user, -1: off)")
    check(ec.adaptive.detect_weight >= 0, "eval.adaptive.detect_weight", "must be >= 0")
    dc = cfg.defense
    check(0.0 < dc.rand_min_frac < 1.0, "defense.rand_min_frac", "must be in (0, 1)")
    check(dc.adaptive_train.steps >= 1, "defense.adaptive_train.steps", "must be >= 1")
    check(dc.adaptive_train.eot >= 1, "defense.adaptive_train.eot", "must be >= 1")
    check(dc.temperature > 0, "defense.temperature", "must be > 0")
