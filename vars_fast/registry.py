"""Registries: one per extensible family, filled where each member is defined.

A new attack, defence, recommender, data source or evaluation section is one file: its
definition carries ``@REGISTRY.register("name")``, and every list of allowed names (config
validation, the CLI's choices, ``docs/config.md``, the report's loop) asks the registry. No
list of member names is written down anywhere else.

A family knows the modules that define its built-in members (``home``) and imports them the
first time it is asked for its members, so ``"pgd" in ATTACKS`` is true without the caller
importing ``vars_fast.attacks`` first, and this module imports nothing of the package (the
config imports it at the top without a cycle). A member defined in user code (a test, a
plugin) is registered when that code is imported, exactly like a built-in one.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator, Optional

from vars_fast.errors import ConfigError


class Registry:
    """Named members of one family, with optional metadata per member.

    ``family`` names it in messages ("recommender"); ``key`` is the config key that names
    members ("recommender.models"), so an unknown name fails with one line that names the key
    and every choice; ``home`` lists the modules holding the built-in members."""

    def __init__(self, family: str, key: str, home: tuple[str, ...] = ()):
        self.family, self.key, self.home = family, key, tuple(home)
        self._members: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._loaded = not self.home

    def register(self, name: Optional[str] = None, obj: Any = None, **meta: Any):
        """``@R.register("name", **meta)`` on a class or function, or ``R.register("name", obj)``.
        Without a name, ``obj.name`` (a class attribute) is used. Re-registering a name replaces
        it (a reloaded module, a test's override)."""
        def add(o: Any) -> Any:
            n = name if name is not None else getattr(o, "name", None)
            if not isinstance(n, str) or not n:
                raise ValueError(f"{self.family} registry: a member needs a name (got {n!r} for {o!r})")
            self._members[n] = o
            self._meta[n] = dict(meta)
            return o

        return add(obj) if obj is not None else add

    def unregister(self, name: str) -> None:
        self._members.pop(name, None)
        self._meta.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first, so that a home module asking its own registry does not recurse
            for mod in self.home:
                importlib.import_module(mod)

    def names(self) -> list[str]:
        self._load()
        return list(self._members)

    def meta(self, name: str) -> dict:
        self[name]
        return self._meta[name]

    def items(self) -> Iterator[tuple[str, Any]]:
        self._load()
        return iter(list(self._members.items()))

    def where(self, **meta: Any) -> list[str]:
        """Names whose metadata matches every ``key=value`` given (e.g. ``targeted=True``)."""
        self._load()
        return [n for n, m in self._meta.items() if all(m.get(k) == v for k, v in meta.items())]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._members

    def __getitem__(self, name: str) -> Any:
        self._load()
        if name not in self._members:
            raise ConfigError(f"{self.key}: unknown {self.family} {name!r} (choose from {', '.join(self._members)})")
        return self._members[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def check(self, names: Any, key: Optional[str] = None, **meta: Any) -> None:
        """Raise ConfigError naming ``key`` (default: the family's key) unless every entry of
        ``names`` (a name or a list of names) is registered and, with ``meta``, its metadata
        matches (``ATTACKS.check(names, ball="linf")``: the members usable there)."""
        allowed = self.where(**meta) if meta else self.names()
        for n in ([names] if isinstance(names, str) else list(names)):
            if n not in allowed:
                what = f"unknown {self.family}" if n not in self else f"{self.family} not usable here:"
                raise ConfigError(f"{key or self.key}: {what} {n!r} (choose from {', '.join(allowed)})")

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {self.names()})"



# ---------------------------------------------------------------------------- the families
# One registry per extensible family. The objects live here, in a module that imports nothing
# of the package, so that the config validates names against them without importing torch or
# making a cycle; members register where they are defined (the ``home`` modules, imported on
# first use), and each family re-exports its registry (``vars_fast.attacks.ATTACKS``, ...).

#: ``data.source``: ``read(DataConfig) -> RawData``; meta ``images``: "generated" (drawn by the
#: source), "embedded" (inside the interaction file) or "files" (under ``data.images_root``)
SOURCES = Registry("data source", "data.source", home=("vars_fast.data.interactions",))
#: ``backbone.name``: ``build(weights) -> nn.Module``; meta ``mean``, ``std`` (input normalisation)
BACKBONES = Registry("backbone", "backbone.name", home=("vars_fast.backbones",))
#: ``recommender.models``: ``Recommender`` subclasses (``from_config``; class attributes say
#: what they consume and the order the recommender stage trains them in)
RECOMMENDERS = Registry("recommender", "recommender.models", home=("vars_fast.recommenders",))
#: ``attack.untargeted``: ``Attack`` optimisers (``craft``); meta ``iterative`` (takes steps,
#: a step size and a start), ``ball`` ("linf": eps in /255 per pixel; "l2"), ``gradient_free``
#: (reads only the loss: Square)
ATTACKS = Registry("attack", "attack.untargeted",
                   home=("vars_fast.attacks.fgsm", "vars_fast.attacks.pgd", "vars_fast.attacks.pgd_l2",
                         "vars_fast.attacks.apgd", "vars_fast.attacks.square"))
#: ``attack.loss``: ``attacks.base.CatalogueLoss``, the per-item objective the catalogue attack
#: maximises (its targets and its loss as a function of the item's image)
ATTACK_LOSSES = Registry("attack loss", "attack.loss",
                         home=("vars_fast.attacks.untargeted", "vars_fast.attacks.margin"))
#: ``attack.objective``: who the images are crafted against; the member crafts them
OBJECTIVES = Registry("attack objective", "attack.objective",
                      home=("vars_fast.attacks.untargeted", "vars_fast.attacks.oracle"))
#: ``attack.targets``: ``attacks.base.TargetedAttack`` (a loss and the optimiser that runs it)
TARGETED = Registry("targeted attack", "attack.targets", home=("vars_fast.attacks.aip", "vars_fast.attacks.taamr"))
#: the defences whose detectors the evaluation compares (ours, the ADDITION baseline); meta ``label``
DEFENSES = Registry("defence", "defense", home=("vars_fast.defense.model", "vars_fast.defense.addition"))
#: ``defense.ablations``: ``DefenseConfig -> DefenseConfig`` (Table 5's variants)
DEFENSE_VARIANTS = Registry("defence variant", "defense.ablations", home=("vars_fast.defense.training",))
#: ``defense.threshold_rule``: ``(fpr, tpr) -> index`` of the chosen ROC point
THRESHOLD_RULES = Registry("threshold rule", "defense.threshold_rule", home=("vars_fast.metrics",))
#: ``run.backend``: the custom ops' backends and their aliases; the member is the backend an
#: alias means ("" for automatic)
BACKENDS = Registry("ops backend", "run.backend", home=("vars_fast.ops._dispatch",))
#: ``run.stages``: ``run_stage(ctx)`` in pipeline order; meta ``main_only`` (rank 0 alone runs it)
STAGES = Registry("stage", "run.stages", home=("vars_fast.train",))
#: ``evaluate.deployments.Deployment``: how a platform turns an upload into a feature (none,
#: denoise, denoise+rand, detect+denoise, ...); the ranking section ranks through each
DEPLOYMENTS = Registry("deployed defence", "eval.defenses", home=("vars_fast.evaluate.deployments",))
#: the evaluation sections, ``evaluate.section.Section``: each computes its rows in the evaluate
#: stage and draws its part of report.md; meta-free, ordered by ``Section.order``
SECTIONS = Registry("evaluation section", "evaluate --section",
                    home=("vars_fast.evaluate", "vars_fast.recommenders.stage"))

FAMILIES: tuple[Registry, ...] = (SOURCES, BACKBONES, RECOMMENDERS, ATTACKS, ATTACK_LOSSES, OBJECTIVES, TARGETED,
                                  DEFENSES, DEFENSE_VARIANTS, THRESHOLD_RULES, BACKENDS, STAGES, SECTIONS,
                                  DEPLOYMENTS)
