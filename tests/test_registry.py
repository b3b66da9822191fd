"""Registries: one per extensible family, filled where members are defined, and the only place
config validation learns which names exist."""
from __future__ import annotations

import ast
import contextlib
import inspect
import pytest

from vars_fast import registry as R
from vars_fast.config import ConfigError, make_config

@contextlib.contextmanager
def registered(reg: R.Registry, name: str, obj, **meta):
    """``obj`` registered as ``name`` for the duration (a plugin defined in user code)."""
    assert name not in reg
    reg.register(name, obj, **meta)
    try:
        yield obj
    finally:
        reg.unregister(name)


def test_every_family_holds_what_the_code_defines():
    from vars_fast.attacks import APGD, FGSM, PGD, PGDL2, Square
    from vars_fast.attacks.margin import margin_item_loss
    from vars_fast.attacks.untargeted import item_loss
    from vars_fast.attacks.untargeted import attack_catalogue
    from vars_fast.attacks.oracle import attack_eval_lists
    from vars_fast.defense import Defense
    from vars_fast.defense.addition import Addition
    from vars_fast.ops import _dispatch
    from vars_fast.recommenders import AMR, BPR, DVBPR, VBPR, BoundedAMR, BoundedVBPR, Pop

    assert set(R.SOURCES) == {"synthetic", "generic", "amazon", "dvbpr_npy"}
    assert {n: R.SOURCES.meta(n)["images"] for n in R.SOURCES} == {
        "synthetic": "generated", "generic": "files", "amazon": "files", "dvbpr_npy": "embedded"}
    assert set(R.BACKBONES) == {"resnet50", "resnet18", "efficientnet_lite0"}
    assert dict(R.RECOMMENDERS.items()) == {c.name: c for c in (VBPR, AMR, BoundedVBPR, BoundedAMR, DVBPR, BPR, Pop)}
    assert dict(R.ATTACKS.items()) == {"fgsm": FGSM, "pgd": PGD, "pgd-l2": PGDL2, "apgd": APGD, "square": Square}
    assert set(R.ATTACKS.where(ball="linf")) == {"fgsm", "pgd", "apgd", "square"}
    assert R.ATTACKS.where(gradient_free=True) == ["square"]
    assert {n: m.item_loss for n, m in R.ATTACK_LOSSES.items()} == {"bpr": item_loss, "margin": margin_item_loss}
    assert dict(R.OBJECTIVES.items()) == {"train": attack_catalogue, "eval": attack_eval_lists}
    assert set(R.TARGETED) == {"aip-insa", "aip-expa", "taamr-fgsm", "taamr-pgd"}
    assert {n: (t.optimiser, t.through) for n, t in R.TARGETED.items()} == {
        "aip-insa": ("pgd", "recommender"), "aip-expa": ("pgd", "recommender"),
        "taamr-fgsm": ("fgsm", "backbone"), "taamr-pgd": ("pgd", "backbone")}
    assert dict(R.DEFENSES.items()) == {"ours": Defense, "addition": Addition}
    assert set(R.DEFENSE_VARIANTS) == {"full", "no-detector", "no-perceptual"}
    assert set(R.THRESHOLD_RULES) == {"youden", "fpr@0.05", "balanced"}
    assert set(_dispatch.ORDER) <= set(R.BACKENDS) and {"auto", "cpp", "cuda"} <= set(R.BACKENDS)
    assert all(_dispatch.normalize(n) in (*_dispatch.ORDER, None) for n in R.BACKENDS)
    assert R.STAGES.names() == ["recommender", "attack", "defense", "evaluate"]  # pipeline order
    assert R.STAGES.where(main_only=True) == ["attack", "evaluate"]


def test_family_modules_reexport_their_registry():
    import vars_fast.attacks as attacks
    import vars_fast.backbones as backbones
    import vars_fast.metrics as metrics
    import vars_fast.recommenders as recommenders
    import vars_fast.train as train
    from vars_fast.ops import _dispatch

    assert attacks.ATTACKS is R.ATTACKS and attacks.TARGETED is R.TARGETED and attacks.OBJECTIVES is R.OBJECTIVES
    assert recommenders.RECOMMENDERS is R.RECOMMENDERS and backbones.BACKBONES is R.BACKBONES
    assert metrics.THRESHOLD_RULES is R.THRESHOLD_RULES and _dispatch.BACKENDS is R.BACKENDS
    assert train.STAGES is R.STAGES


def test_unknown_name_fails_in_one_line_naming_key_and_choices():
    with pytest.raises(ConfigError) as e:
        make_config("quick", overrides={"attack.untargeted": ["fgsm", "cw"]})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("attack.untargeted: unknown attack 'cw'")
    assert all(n in msg for n in ("fgsm", "pgd"))
    with pytest.raises(ConfigError, match=r"^recommender\.models: unknown recommender 'NCF' \(choose from .*VBPR"):
        make_config("quick", overrides={"recommender.models": ["VBPR", "NCF"]})
    with pytest.raises(ConfigError, match=r"^attack\.targets: unknown targeted attack 'aip-x' \(choose from .*insa"):
        make_config("quick", overrides={"attack.targets": ["aip-x"]})
    with pytest.raises(ConfigError, match=r"^data\.source: unknown data source 'csv'"):
        make_config("quick", overrides={"data.source": "csv"})
    with pytest.raises(ConfigError, match=r"^run\.stages: unknown stage 'train'"):
        make_config("quick", overrides={"run.stages": ["train"]})
    with pytest.raises(ConfigError, match=r"^defense\.threshold_rule: unknown threshold rule"):
        make_config("quick", overrides={"defense.threshold_rule": "otsu"})
    with pytest.raises(ConfigError, match=r"^eval\.oracle_models: unknown recommender"):
        make_config("quick", overrides={"eval.oracle_models": ["vbpr"]})
    # a registered optimiser that does not fit the key: the choices are the ones that do
    with pytest.raises(ConfigError, match=r"^attack\.untargeted: attack not usable here: 'pgd-l2' \(choose from"):
        make_config("quick", overrides={"attack.untargeted": ["pgd-l2"]})
    # the lookup itself fails the same way (a stage handed a bad name)
    with pytest.raises(ConfigError, match=r"^attack\.targets: unknown targeted attack 'nope'"):
        R.TARGETED["nope"]


def test_a_registered_toy_member_is_accepted_by_config_validation():
    from vars_fast.attacks import FGSM
    from vars_fast.metrics import choose_threshold
    from vars_fast.recommenders import Pop, build_recommender

    class Toy(Pop):
        name = "Toy"

    with registered(R.RECOMMENDERS, "Toy", Toy):
        cfg = make_config("quick", overrides={"recommender.models": ["VBPR", "Toy"], "attack.models": ["Toy"]})
        assert cfg.recommender.models == ["VBPR", "Toy"]
        rec = build_recommender("Toy", 5, 7, cfg.recommender)  # built through the registry, no if-chain
        assert type(rec) is Toy and rec.n_items == 7
    with pytest.raises(ConfigError, match="Toy"):
        make_config("quick", overrides={"recommender.models": ["Toy"]})

    with registered(R.ATTACKS, "fgsm2", FGSM, iterative=False, ball="linf"):
        assert make_config("quick", overrides={"attack.untargeted": ["fgsm2"]}).attack.untargeted == ["fgsm2"]
    with registered(R.THRESHOLD_RULES, "strict", lambda fpr, tpr: 0):  # the largest threshold
        make_config("quick", overrides={"defense.threshold_rule": "strict"})
        assert choose_threshold([0.1, 0.2], [0.3, 0.9], rule="strict") == 0.9
    with registered(R.STAGES, "report", lambda ctx: None, main_only=True):
        assert make_config("quick", overrides={"run.stages": ["report"]}).run.stages == ["report"]


def test_toy_attack_runs_through_the_catalogue_attack(tiny_catalogue):
    """A registered optimiser is what ``attack_catalogue`` runs: no if/else picks FGSM or PGD."""
    import torch

    from vars_fast.attacks import FGSM
    from vars_fast.attacks.untargeted import attack_catalogue
    from vars_fast.config import AttackConfig
    from vars_fast.recommenders import build_recommender

    calls = []

    class Counted(FGSM):
        @classmethod
        def craft(cls, loss_fn, x, eps, **kw):
            calls.append(x.shape[0])
            return super().craft(loss_fn, x, eps, **kw)

    class Pixels(torch.nn.Module):  # a differentiable stand-in backbone: the first 8 pixel values
        feature_dim = 8

        def features(self, x):
            return x.flatten(1)[:, :8]

    cat = tiny_catalogue
    rec = build_recommender("VBPR", cat.n_users, cat.n_items, make_config("quick").recommender, backbone=Pixels())
    rec.set_item_visual(torch.randn(cat.n_items, 8))
    acfg = AttackConfig(batch_size=32, triples_per_item=2, fast_encoder=False)
    items = torch.arange(40)
    with registered(R.ATTACKS, "counted", Counted, iterative=False, ball="linf"):
        got = attack_catalogue(rec, cat, "counted", 8, acfg, torch.Generator().manual_seed(0), progress=False,
                               items=items)
    ref = attack_catalogue(rec, cat, "fgsm", 8, acfg, torch.Generator().manual_seed(0), progress=False, items=items)
    assert sum(calls) == 40 and torch.equal(got, ref)


def _string_constants(source: str) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_config_validation_lists_no_member_names():
    """Allowed names come from the registries: the validation code spells none of them."""
    from vars_fast.config import validation

    members = {n for reg in R.FAMILIES for n in reg.names()} - {"auto", "full"}
    found = sorted(members & _string_constants(inspect.getsource(validation)))
    assert not found, f"vars_fast/config/validation.py spells member names {found}: ask the registry"


# where a literal list of member names is not a list of choices: a config default is a value
# the user sets; __all__ names exported classes; the defence's training schedule is the paper's
# method (Eq. 12 trains on clean, FGSM and PGD views), not a menu
NAME_LIST_EXCEPTIONS = ("vars_fast/config/", "vars_fast/defense/training.py")


def test_no_list_of_member_names_outside_the_registries():
    """``grep`` for sequences of two or more attack, model or defence names: none in the package
    outside the registrations themselves and the exceptions above."""
    import pathlib

    fams = {"attack": set(R.ATTACKS.names()) | set(R.TARGETED.names()) | set(R.ATTACK_LOSSES.names()),
            "model": set(R.RECOMMENDERS.names()),
            "defence": set(R.DEPLOYMENTS.names()) | set(R.DEFENSES.names()) | set(R.DEFENSE_VARIANTS.names())}
    root = pathlib.Path(__file__).resolve().parents[1]
    found = []
    for p in sorted((root / "vars_fast").rglob("*.py")):
        rel = str(p.relative_to(root))
        if rel.startswith(NAME_LIST_EXCEPTIONS):
            continue
        tree = ast.parse(p.read_text())
        exported = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)}
        for n in ast.walk(tree):
            if id(n) in exported or not isinstance(n, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                continue
            elts = n.keys if isinstance(n, ast.Dict) else n.elts
            strs = [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for fam, names in fams.items():
                hit = [s for s in strs if s in names]
                if len(hit) >= 2:
                    found.append(f"{rel}:{n.lineno} {fam} names {hit}")
    assert not found, "ask the registry instead of listing names: " + "; ".join(found)
