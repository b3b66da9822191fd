"""Keys that moved, and what an old key does: one table, ``MOVED_KEYS``.

An old key maps to ``Moved(to, expired)``. Not expired (keys renamed in this release): the
value goes to the new key with a one-line ``DeprecatedKeyWarning`` "<old> is deprecated: use
<new>", wherever keys are read (``--set``, YAML files, presets, ``from_dict`` of a run
folder's saved config.yaml). Expired (keys that moved in an earlier release): a one-line
ConfigError "<old> is now <new>". A key moved here is to become expired in the next release.

The flat keys that the sub-sections replaced (``recommender.amr_eps`` ->
``recommender.amr.eps``, ...) are generated from the sub-sections' fields, so none is missed.
"""
from __future__ import annotations

from dataclasses import fields
from typing import NamedTuple

from vars_fast.config.schema import Config


class Moved(NamedTuple):
    to: str
    expired: bool = False


# sub-section -> the prefix its keys had when they were flat, and the old keys that were not
# that prefix + the field's name (a section's on/off switch had the section's own name)
FLATTENED: dict[str, tuple[str, dict[str, str]]] = {
    "recommender.select": ("recommender.select_", {"mode": "recommender.select"}),
    "recommender.amr": ("recommender.amr_", {"lambda_adv": "recommender.amr_lambda"}),
    "recommender.dvbpr": ("recommender.dvbpr_", {}),
    "eval.adaptive": ("eval.adaptive_", {"enabled": "eval.adaptive"}),
    "eval.transfer": ("eval.transfer_", {"enabled": "eval.transfer"}),
    "defense.adaptive_train": ("defense.adaptive_train_", {"enabled": "defense.adaptive_train"}),
    "defense.addition": ("eval.addition_", {}),  # ADDITION's settings were the evaluation's
}

# moved in an earlier release (the target is where the key went then; later moves are followed)
EXPIRED: dict[str, str] = {
    "defense.addition_change": "eval.addition_change",
    "defense.n_detect_items": "eval.detect_items",
    "defense.eval_eps": "eval.detect_eps",
    "defense.noise_sigmas": "eval.noise_sigmas",
    "defense.adaptive": "eval.adaptive",
    "defense.adaptive_eot": "eval.adaptive_eot",
}


def _build() -> dict[str, Moved]:
    moved: dict[str, Moved] = {}
    for path, (prefix, special) in FLATTENED.items():
        section: object = Config()
        for part in path.split("."):
            section = getattr(section, part)
        for f in fields(section):
            moved[special.get(f.name, prefix + f.name)] = Moved(f"{path}.{f.name}")
    for old, to in EXPIRED.items():
        while to in moved:
            to = moved[to].to
        moved[old] = Moved(to, expired=True)
    return moved


MOVED_KEYS: dict[str, Moved] = _build()
