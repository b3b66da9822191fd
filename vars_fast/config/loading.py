"""Resolving a ``Config``: ``--set a.b.c=v`` overrides, YAML files, presets, ``from_dict`` of a
saved config.yaml. Every value goes through ``set_value``, which type-checks it and applies
``MOVED_KEYS`` (an old key: a one-line warning and the new key, or an error naming it)."""
from __future__ import annotations

import types
import typing
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from vars_fast.config.moved import MOVED_KEYS
from vars_fast.config.presets import PRESETS
from vars_fast.config.schema import Config
from vars_fast.errors import ConfigError, DeprecatedKeyWarning


def _hint(tp: Any) -> Any:
    """Strip Optional[...] and return the core type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    core = _hint(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(core, '__name__', core)})")
    try:
        if core is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if core is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if core is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if core is str:
            return str(value)
        if typing.get_origin(core) is Literal:  # a closed choice: validate() checks the value
            if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(core):
                return "on" if value else "off"  # YAML reads a bare on/off as a bool
            return str(value)
        if core is list or typing.get_origin(core) is list:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [
                    yaml.safe_load(v) for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return list(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}: bad value {value!r} (expected {getattr(core, '__name__', core)})")


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: use {new}", DeprecatedKeyWarning, stacklevel=4)


def set_value(cfg: Config, dotted: str, value: Any,
              on_moved: Optional[Callable[[str, str], None]] = None) -> None:
    """Set ``section.key`` (or ``section.sub.key``; a mapping for a (sub-)section sets its keys)
    on ``cfg`` with type checking; unknown keys raise ConfigError. A key in ``MOVED_KEYS``
    goes to its new name after ``on_moved(old, new)`` (default: a one-line
    ``DeprecatedKeyWarning``), or raises once expired."""
    moved = MOVED_KEYS.get(dotted)
    if moved is not None and not isinstance(value, dict):  # a mapping under a section's old name is the section
        if moved.expired:
            raise ConfigError(f"{dotted} is now {moved.to}")
        (on_moved or _deprecated)(dotted, moved.to)
        dotted = moved.to
    parts = dotted.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts):
        if not is_dataclass(obj):
            raise ConfigError(f"unknown config key {dotted!r}")
        hints = typing.get_type_hints(type(obj))
        names = {f.name for f in fields(obj)}
        if p not in names:
            choices = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {dotted!r} ({'.'.join(parts[:i]) or 'top level'} has: {choices})")
        if i == len(parts) - 1:
            cur = getattr(obj, p)
            if is_dataclass(cur):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: expected a mapping of keys")
                for k, v in value.items():
                    set_value(cfg, f"{dotted}.{k}", v, on_moved)
                return
            setattr(obj, p, _coerce(dotted, value, hints[p]))
        else:
            obj = getattr(obj, p)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any],
                    on_moved: Optional[Callable[[str, str], None]] = None) -> Config:
    for k, v in overrides.items():
        set_value(cfg, k, v, on_moved)
    return cfg


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c.d=[1,2]"]`` -> ``{"a.b": 1, "c.d": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    return data


def make_config(preset: str | None = None, config_file: str | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Resolve preset -> YAML file -> overrides, in that order (later wins)."""
    from vars_fast.config.validation import validate  # cycle: validation imports eval_key, _hint from here

    file_data = load_yaml(config_file) if config_file else {}
    preset = preset or file_data.pop("preset", None) or "default"
    file_data.pop("preset", None)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = Config(preset=preset)
    apply_overrides(cfg, PRESETS[preset])
    apply_overrides(cfg, _flatten(file_data))
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def eval_key(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def from_dict(d: dict[str, Any], check: bool = True) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a run folder's config.yaml). A config
    saved before keys moved loads too, with one warning for all its old keys. ``check=False``
    skips validation: for a config the parent process validated, whose registries may hold
    members this process never imported (a plugin's recommender, a test's toy)."""
    from vars_fast.config.validation import validate  # cycle: validation imports eval_key, _hint from here

    d = dict(d)
    preset = d.pop("preset", "default")
    cfg = Config(preset=preset)
    old: list[tuple[str, str]] = []
    apply_overrides(cfg, _flatten(d), on_moved=lambda a, b: old.append((a, b)))
    if old:
        shown = ", ".join(f"{a} -> {b}" for a, b in old[:3]) + (", ..." if len(old) > 3 else "")
        warnings.warn(f"this config was saved with {len(old)} deprecated keys, read under their new names "
                      f"({shown})", DeprecatedKeyWarning, stacklevel=2)
    if check:
        validate(cfg)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
