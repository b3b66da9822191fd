"""Dataclass configuration, presets, YAML files and ``--set a.b=v`` overrides.

One ``Config`` holds everything a run needs; it is saved resolved as ``config.yaml`` in the
run folder so that any stage can be re-run alone. Values the paper leaves blank are ours; each
field documents its choice (``docs/config.md`` is generated from the fields' comments).

Layout: one module per section (``schema``: ``Config`` with data, backbone, run;
``recommender``, ``attack``, ``defense``, ``evaluation``), each holding its sub-sections as
nested dataclasses (``recommender.amr.eps``, ``eval.adaptive.eot``, ``defense.addition.*``);
``presets``; ``loading`` (``--set``, YAML, ``from_dict``); ``moved`` (old keys:
``MOVED_KEYS``); ``validation``, which checks names against the registries of
``vars_fast.registry``. The package imports neither torch nor any family's code, so every
module can import it.
"""
from vars_fast.config.attack import AttackConfig
from vars_fast.config.defense import AdaptiveTrainConfig, AdditionConfig, DefenseConfig
from vars_fast.config.evaluation import AdaptiveConfig, EvalConfig, SuiteConfig, TransferConfig
from vars_fast.config.loading import (apply_overrides, eval_key, from_dict, load_yaml, make_config, parse_set,
                                      save_yaml, set_value)
from vars_fast.config.moved import MOVED_KEYS, Moved
from vars_fast.config.presets import PRESETS
from vars_fast.config.recommender import AMRConfig, BoundedConfig, DVBPRConfig, RecommenderConfig, SelectConfig
from vars_fast.config.schema import BackboneConfig, Config, DataConfig, RunConfig
from vars_fast.config.validation import validate
from vars_fast.errors import ConfigError, DeprecatedKeyWarning

__all__ = ["Config", "DataConfig", "BackboneConfig", "RecommenderConfig", "SelectConfig", "AMRConfig", "BoundedConfig",
           "DVBPRConfig", "AttackConfig", "DefenseConfig", "AdaptiveTrainConfig", "AdditionConfig", "EvalConfig",
           "AdaptiveConfig", "SuiteConfig", "TransferConfig", "RunConfig", "PRESETS", "MOVED_KEYS", "Moved",
           "ConfigError", "DeprecatedKeyWarning", "make_config", "from_dict", "set_value", "apply_overrides", "parse_set",
           "load_yaml", "save_yaml", "eval_key", "validate"]
