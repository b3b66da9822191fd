"""Transfer (``eval.transfer.enabled``): the defence trained on this run's catalogue (A) applied to a
second synthetic catalogue B, another seed and rendering style (``data/synthetic.py``
``STYLES``: other shapes, palette and background), with users of the same kind of taste.

On B a VBPR is trained (the recommender code of the run, B's own split and clean features),
and B is attacked by FGSM at eps 16 and PGD at ``eval.table_eps`` through the catalogue
attack. The defence of A is then applied with 0 and with ``eval.transfer.finetune_epochs``
epochs of denoiser fine-tuning on B's defence-train items: ``train_defense`` from A's denoiser
weights, phase-2 kinds (clean / FGSM / PGD), no detector; the detector and its threshold stay
A's. Rows carry ``"transfer": "A->B"`` and ``"finetune_epochs"``: ranking (clean / FGSM /
PGD x none / denoise / denoise+rand on B) and detection (ours at eps 16 on B's held-out items,
A's threshold).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

from vars_fast.attacks.untargeted import attack_catalogue
from vars_fast.data import load_catalogue
from vars_fast.data.synthetic import SyntheticCatalogue
from vars_fast.defense.training import split_items, train_defense
from vars_fast.evaluate import deployments
from vars_fast.evaluate.common import Evaluation, det_json
from vars_fast.evaluate.section import Doc, Section, find, table
from vars_fast.metrics import detection_metrics, ranking_metrics
from vars_fast.recommenders import build_recommender
from vars_fast.recommenders.base import batched_encode
from vars_fast.registry import SECTIONS

NAME = "transfer"  # the section: its registry name and the ``table`` of its rows

TAG = "A->B"
DETECT_EPS = 16


def catalogue_b(ev: Evaluation):
    """Catalogue B: A's data config with B's seed and size, synthetic, images in B's style."""
    ecfg, dcfg = ev.cfg.eval, ev.cfg.data
    cfg_b = dataclasses.replace(dcfg, source="synthetic", seed=int(ecfg.transfer.seed),
                                n_users=int(ecfg.transfer.users or dcfg.n_users),
                                n_items=int(ecfg.transfer.items or dcfg.n_items))
    cat = load_catalogue(cfg_b, ev.run.cache_dir / "transfer", progress=False)
    # the split (users, interactions) depends on the item attributes only; the style changes
    # how the same attributes are drawn
    gen = SyntheticCatalogue(cfg_b.seed, cfg_b.image_size, cfg_b.n_categories, style=ecfg.transfer.style)
    cat.images = torch.from_numpy(gen.render_many([int(i[1:]) for i in cat.item_ids]))  # i<index>
    cat.meta = {**cat.meta, "style": ecfg.transfer.style}
    return cat


def train_vbpr(ev: Evaluation, cat):
    """VBPR on B: the run's recommender config, B's clean backbone features."""
    rc, bb = ev.cfg.recommender, ev.ctx.backbone
    feats = batched_encode(bb.features, cat.images, rc.feature_batch, ev.dev, False, desc="features B",
                           channels_last=ev.cfg.run.channels_last)
    seed = int(torch.randint(0, 2**62, (1,), generator=ev.ctx.generator("transfer:init:VBPR")))
    rec = build_recommender("VBPR", cat.n_users, cat.n_items, rc, backbone=bb, seed=seed,
                            feature_dim=feats.shape[1]).to(ev.dev)
    rec.fit(cat, rc, ev.ctx.generator("transfer:recommender:VBPR"), show_progress=False, log=ev.log, features=feats)
    return rec.eval().requires_grad_(False)


def finetune(ev: Evaluation, cat, rec, split: dict, epochs: int):
    """A's defence with its denoiser fine-tuned ``epochs`` epochs on B (detector, threshold: A's)."""
    src = ev.ctx.defense()
    dcfg = dataclasses.replace(ev.cfg.defense, epochs_phase1=0, epochs_phase2=int(epochs), detector_epochs=0,
                               use_detector=False, lambda_contrastive=0.0)
    bcfg = {k: getattr(ev.cfg.backbone, k) for k in ev.cfg.backbone.__dataclass_fields__}
    seed = int(torch.randint(0, 2**62, (1,), generator=ev.ctx.generator("transfer:finetune")))
    tuned, hist = train_defense(cat, rec, ev.ctx.backbone, dcfg, split, backbone_cfg=bcfg, device=ev.dev,
                                seed=seed, amp=ev.cfg.run.amp, progress=ev.cfg.run.progress, log=ev.log,
                                desc="transfer fine-tune", init_denoiser=src.denoiser)
    out = copy.copy(src)
    out.denoiser = tuned.denoiser.eval().requires_grad_(False)
    return out, hist


def rows_for(ev: Evaluation, defense, cat, rec, attacked: dict, test_items, k: int) -> tuple[list, list]:
    """Ranking and detection rows of ``defense`` on B (``attacked``: {(attack, eps): uint8})."""
    tag = {"transfer": TAG, "finetune_epochs": int(k)}
    rank = lambda imgs: {kk: float(v) for kk, v in ranking_metrics(  # noqa: E731
        rec, cat, visual=ev.encode_all(rec, imgs), topk=ev.topk).items()}
    ranking = []
    for (attack, eps), imgs in [(("clean", 0), cat.images), *attacked.items()]:
        den, rnd = ev.purify_all(imgs, defense=defense, desc=f"transfer purify {attack}",
                                 tag=f"transfer:{attack}:{eps}")
        for dname, x in deployments.views(den, rnd):
            ranking.append({"model": "VBPR", "defense": dname, "attack": attack, "eps": eps, **tag, **rank(x)})
    detection = []
    if defense.detector is not None and math.isfinite(defense.threshold):
        d_clean = ev.distances(cat.images[test_items], defense)
        d_adv = ev.distances(attacked[("fgsm", DETECT_EPS)][test_items], defense)
        detection.append({"detector": "ours", "attack": "fgsm", "eps": DETECT_EPS, "model": "VBPR", **tag,
                          "n_clean": int(d_clean.numel()), "n_adv": int(d_adv.numel()),
                          **det_json(detection_metrics(d_clean, d_adv, float(defense.threshold)))})
    return ranking, detection


def transfer(ev: Evaluation) -> None:
    """The A->B rows at 0 and ``eval.transfer.finetune_epochs`` fine-tuning epochs."""
    ecfg = ev.cfg.eval
    if not ecfg.transfer.enabled:
        return
    clock = [time.process_time()]

    def lap(name: str) -> None:  # CPU seconds per part (the wall clock of a shared machine is noise)
        now = time.process_time()
        ev.timings[f"transfer_{name}_cpu_s"] = round(now - clock[0], 2)
        ev.log.info("evaluate transfer: %s %.1f s cpu", name, now - clock[0])
        clock[0] = now

    cat = catalogue_b(ev)
    lap("data")
    rec = train_vbpr(ev, cat)
    lap("recommender")
    none = {"model": "VBPR", "defense": "none", "transfer": TAG, "finetune_epochs": 0}

    def rank(visual) -> dict:
        return {k: float(v) for k, v in ranking_metrics(rec, cat, visual=visual, topk=ev.topk).items()}

    ranking = [{**none, "attack": "clean", "eps": 0, **rank(None)}]
    attacked = {}
    for attack, eps in (("fgsm", DETECT_EPS), ("pgd", int(ecfg.table_eps))):
        adv = attack_catalogue(rec, cat, attack, eps, ev.cfg.attack, ev.ctx.generator(f"transfer:{attack}:{eps}"),
                               ev.dev, progress=False, batch_size=ev.cfg.attack.batch_size)
        attacked[(attack, eps)] = adv
        ranking.append({**none, "attack": attack, "eps": eps, **rank(ev.encode_all(rec, adv))})
    lap("attack")
    split = split_items(cat, ev.ctx.generator("transfer:split"))
    test_items = torch.as_tensor(split["test"], dtype=torch.long)
    detection = []
    plans = [(0, ev.defense)]
    k = int(ecfg.transfer.finetune_epochs)
    if k > 0:
        tuned, _ = finetune(ev, cat, rec, split, k)
        plans.append((k, ev.fast_defense(tuned)))
        lap("finetune")
    for epochs, defense in plans:
        r, d = rows_for(ev, defense, cat, rec, attacked, test_items, epochs)
        ranking += r
        detection += d
    lap("rows")
    ev.run.add_rows("ranking", ranking, table=NAME)
    ev.run.add_rows("detection", detection, table=NAME)
    ev.run.update_meta(transfer={"seed": int(ecfg.transfer.seed), "style": ecfg.transfer.style,
                                 "n_users": cat.n_users, "n_items": cat.n_items, "finetune_epochs": k,
                                 "n_detect_items": int(test_items.numel())})
    ev.log.info("evaluate transfer: %d ranking, %d detection rows", len(ranking), len(detection))


def transfer_table(ranking: list[dict], detection: list[dict]) -> str:
    """A->B (``eval.transfer``): VBPR HR@10 on B per attack and defence, and our detector on B
    at eps 16, per number of denoiser fine-tuning epochs on B (0: A's defence as is)."""
    epochs = sorted({int(r["finetune_epochs"]) for r in ranking if r["defense"] != "none"})
    attacks = [(r["attack"], r["eps"]) for r in ranking if r["defense"] == "none"]
    defended = deployments.purifying()
    head = ["attack", "eps", "none"] + [f"{d} (ft {k})" for k in epochs for d in defended]
    body = [[a, e, (find(ranking, attack=a, eps=e, defense="none") or {}).get("HR@10")]
            + [(find(ranking, attack=a, eps=e, defense=d, finetune_epochs=k) or {}).get("HR@10")
               for k in epochs for d in defended] for a, e in attacks]
    det = [[r["finetune_epochs"], r["eps"], r.get("accuracy"), r.get("tpr"), r.get("fpr"), r.get("auc")]
           for r in sorted(detection, key=lambda r: r["finetune_epochs"])]
    return (table(head, body) + "\n\nDetector (A's weights and threshold) on B, FGSM:\n\n"
            + table(["finetune epochs", "eps", "accuracy", "TPR", "FPR", "AUC"], det))


def report(doc: Doc) -> list[str]:
    R = doc.rows("ranking", "transfer")
    if not R:  # an optional section (eval.transfer): absent from runs without it
        return []
    return ["## Transfer to a new catalogue (A->B, VBPR HR@10)", "",
            "The defence trained here applied to a second synthetic catalogue (another seed, shape "
            "set and palette; `vars_fast/evaluate/transfer.py`), as is and after denoiser fine-tuning "
            "on B; the detector is never retrained.", "",
            transfer_table(R, doc.rows("detection", "transfer")), ""]


SECTIONS.register(NAME, Section(order=90, run=transfer, report=report))
