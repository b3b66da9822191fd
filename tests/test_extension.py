"""Extension by one file: a toy attack, a toy defence, a toy recommender and a toy evaluation
section, defined and registered here, are picked up by the `quick` pipeline and by report.md
with no edit to the package (docs/CONTRIBUTING.md shows the same four recipes)."""
import json

import pytest
import torch
import torch.nn.functional as F

from vars_fast.attacks.base import Attack, as_eps
from vars_fast.evaluate.deployments import Deployment
from vars_fast.evaluate.section import Section, missing, table
from vars_fast.recommenders.base import Recommender
from vars_fast.registry import ATTACKS, DEPLOYMENTS, RECOMMENDERS, SECTIONS


# 1. an attack: gradient-free, two queries of the loss per image, the better corner of the ball
class CornerAttack(Attack):
    @classmethod
    def craft(cls, loss_fn, x, eps, **_):
        return cls(loss_fn, eps)(x)

    def perturb(self, x):
        e = as_eps(self.eps, x)
        up, down = (x + e).clamp(0, 1), (x - e).clamp(0, 1)
        with torch.no_grad():
            better = (self.loss_fn(up) >= self.loss_fn(down)).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(better, up, down)


# 2. a deployed defence: a 3x3 box blur of every upload before the recommender encodes it
def blur_rank(ev, rec, images, den, rnd):
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return ev.rank(rec, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))


# 3. a recommender: item-based co-occurrence, score(u, i) = sum over u's items j of C[j, i]
class CoCount(Recommender):
    name = "CoCount"
    uses_images = False
    train_order = 1

    @classmethod
    def from_config(cls, n_users, n_items, rc=None, backbone=None, feature_dim=None):
        return cls(n_users, n_items)

    def __init__(self, n_users, n_items):
        super().__init__(n_users, n_items)
        self.register_buffer("user_items", torch.zeros(n_users, n_items))
        self.register_buffer("co", torch.zeros(n_items, n_items))

    def fit(self, cat, cfg=None, generator=None, show_progress=True, log=None):
        u, i = cat.train[:, 0].cpu(), cat.train[:, 1].cpu()
        self.user_items.zero_().index_put_((u, i), torch.ones(len(u)), accumulate=False)
        self.co.copy_(self.user_items.T @ self.user_items)
        self.co.fill_diagonal_(0)
        return []

    def _score(self, users, items, visual):  # users and items share a shape ([B] or [B, C])
        return (self.user_items[users] * self.co[:, items].movedim(0, -1)).sum(-1)


# 4. an evaluation section: how far each attacked catalogue moved from the clean one, in /255
def shift_rows(ev):
    rows = []
    for attack in ev.cfg.attack.untargeted:
        for eps in ev.cfg.attack.eps:
            adv = ev.load_attack("VBPR", attack, eps)
            if adv is not None:
                d = (adv.float() - ev.cat.images.float()).abs().amax(dim=(1, 2, 3))
                rows.append({"detector": "toy-shift", "attack": attack, "eps": eps, "max_shift": float(d.max()),
                             "mean_shift": float(d.mean())})
    ev.run.add_rows("detection", rows, table="toy-shift")


def shift_report(doc):
    rows = doc.rows("detection", "toy-shift")
    body = [[r["attack"], r["eps"], r["max_shift"], r["mean_shift"]] for r in rows]
    return ["## Toy: pixel shift of the attacked catalogues", "",
            table(["attack", "eps", "max |δ| (/255)", "mean max |δ|"], body) if body else missing("no rows"), ""]


@pytest.fixture
def toys():
    ATTACKS.register("corner", CornerAttack, iterative=False, ball="linf")
    DEPLOYMENTS.register("blur", Deployment(label="BLUR", order=50, rank=blur_rank))
    RECOMMENDERS.register("CoCount", CoCount)
    SECTIONS.register("toy-shift", Section(order=95, run=shift_rows, report=shift_report))
    yield
    for reg, name in ((ATTACKS, "corner"), (DEPLOYMENTS, "blur"), (RECOMMENDERS, "CoCount"), (SECTIONS, "toy-shift")):
        reg.unregister(name)


def test_toy_recommender_scores_what_it_counts():
    rec = CoCount(3, 4)

    class Cat:
        train = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 2], [2, 3]])

    rec.fit(Cat)
    # user 0 holds {0, 1}: item 2 co-occurs once with item 1 (via user 1), item 3 never
    assert rec.score(torch.tensor([0, 0]), torch.tensor([2, 3])).tolist() == [1.0, 0.0]
    assert rec.score(torch.tensor([0]), torch.tensor([[2, 3]])).tolist() == [[1.0, 0.0]]


def test_quick_pipeline_and_report_pick_up_one_file_extensions(toys, tmp_path, monkeypatch):
    from vars_fast import train
    from vars_fast.config import make_config
    from vars_fast.evaluate.cli import main as evaluate_main

    monkeypatch.setenv("VARS_FAST_PROGRESS", "0")
    quick = make_config("quick")
    models = quick.recommender.models + ["CoCount"]
    out = tmp_path / "run"
    rc = train.main(["--preset", "quick", "--out", str(out), "--no-progress",
                     "--set", f"recommender.models=[{','.join(models)}]",
                     "--set", f"attack.untargeted=[{','.join(quick.attack.untargeted + ['corner'])}]"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert all("table" in r for kind in ("ranking", "detection", "targeted", "fidelity") for r in m[kind])
    got = {(r["model"], r["defense"], r["attack"]) for r in m["ranking"]}
    assert ("CoCount", "none", "clean") in got
    assert ("VBPR", "none", "corner") in got and ("VBPR", "denoise", "corner") in got
    assert ("VBPR", "blur", "clean") in got and ("VBPR", "blur", "pgd") in got
    shift = [r for r in m["detection"] if r["table"] == "toy-shift"]
    assert {r["attack"] for r in shift} == {"fgsm", "pgd", "corner"}
    assert all(r["max_shift"] <= r["eps"] for r in shift)
    report = (out / "report.md").read_text()
    assert "| CoCount | no |" in report
    assert "| CORNER | VBPR |" in report and "| Clean | BLUR |" in report
    assert "## Toy: pixel shift of the attacked catalogues" in report
    # one section re-runs alone on the finished run; every other row stays
    (out / "report.md").unlink()
    assert evaluate_main([str(out), "--section", "toy-shift", "--no-progress"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert len(m2["ranking"]) == len(m["ranking"]) and len(m2["detection"]) == len(m["detection"])
    assert "## Toy: pixel shift" in (out / "report.md").read_text()
