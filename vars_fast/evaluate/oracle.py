"""The defence against the evaluation-aware attacker (``attack.objective: eval``).

The attack stage saved, for each model of ``eval.oracle_models``, every oracle user's own
perturbed candidate images (``attacks/oracle.py``). Here each user's images are purified
(``denoise``, ``denoise+rand``), re-encoded and ranked against that user's list only, beside
the clean lists purified the same way. Rows carry ``"objective": "eval"`` and ``n_users``.
"""
from __future__ import annotations

import torch

from vars_fast.attacks.oracle import eval_lists, list_ranking
from vars_fast.attacks.stage import load_npy, load_oracle_users, oracle_eps
from vars_fast.evaluate.common import Evaluation
from vars_fast.evaluate import deployments
from vars_fast.evaluate.section import Doc, Section, find, missing, table
from vars_fast.registry import SECTIONS

NAME = "oracle"  # the section: its registry name and the ``table`` of its rows


def _list_features(ev: Evaluation, rec, images: torch.Tensor, tag: str, users_per_chunk: int = 8):
    """uint8 [U, L, 3, S, S] -> features [U, L, F] of D(x) and of resize-pad(D(x)), purified a
    few users at a time so that the float copies stay small."""
    enc = ev.ctx.encoder(rec.name)
    U, L = images.shape[:2]
    den_f, rnd_f = [], []
    for s in range(0, U, users_per_chunk):
        flat = images[s:s + users_per_chunk].reshape(-1, *images.shape[2:])
        den, rnd = ev.purify_all(flat, desc=f"purify {tag} users {s}+", tag=f"{tag}:{s}")
        n = flat.shape[0] // L
        den_f.append(ev.encode_all(enc, den).cpu().view(n, L, -1))
        rnd_f.append(ev.encode_all(enc, rnd).cpu().view(n, L, -1))
    return torch.cat(den_f), torch.cat(rnd_f)


def oracle(ev: Evaluation) -> None:
    """Clean / FGSM / PGD lists x {denoise, denoise+rand} for every model the oracle attacked."""
    cfg = ev.cfg
    if "eval" not in cfg.attack.objective:
        return
    users = load_oracle_users(ev.run)
    if users is None:
        ev.log.warning("evaluate: attacks/oracle_users.json missing (attack stage not run with objective eval)")
        return
    lists = eval_lists(ev.cat, users)
    shape = tuple(lists.shape) + tuple(ev.cat.images.shape[1:])
    den_c, rnd_c = ev.clean_purified()
    for name in [m for m in ev.models if m in cfg.eval.oracle_models and m in cfg.eval.models]:
        rec = ev.ctx.recommender(name)
        enc = ev.ctx.encoder(rec.name)
        base = {"model": name, "objective": "eval", "n_users": int(users.numel())}
        rows = []
        for dname, imgs in deployments.views(den_c, rnd_c):
            feats = ev.encode_all(enc, imgs).cpu()[lists]  # a clean item purifies the same for every user
            rows.append({**base, "defense": dname, "attack": "clean", "eps": 0,
                         **list_ranking(rec, ev.cat, users, feats, ev.topk)})
        for attack in cfg.attack.untargeted:
            for eps in oracle_eps(cfg, name):
                adv = load_npy(ev.run.attack_file(name, f"{attack}-eval", eps), shape)
                if adv is None:
                    ev.log.warning("evaluate: no %s-eval images for %s at eps=%s: rows skipped", attack, name, eps)
                    continue
                den, rnd = _list_features(ev, rec, adv, f"{name}:{attack}-eval:{eps}")
                for dname, feats in deployments.views(den, rnd):
                    rows.append({**base, "defense": dname, "attack": attack, "eps": eps,
                                 **list_ranking(rec, ev.cat, users, feats, ev.topk)})
        ev.run.add_rows("ranking", rows, table=NAME)
        ev.log.info("evaluate oracle %s: %d rows on %d users", name, len(rows), users.numel())


def oracle_table(rows: list[dict]) -> str:
    """The evaluation-aware attacker: HR@10 per model, defence and attack on the oracle users."""
    if not rows:
        return missing("the eval objective was not run (attack.objective)")
    keys = sorted({(r["attack"], float(r["eps"])) for r in rows}, key=lambda k: (k[0] != "clean", k[0], k[1]))
    out = []
    for model in sorted({r["model"] for r in rows}, reverse=True):
        for d in deployments.ordered():
            vals = [(find(rows, model=model, defense=d, attack=a, eps=e) or {}).get("HR@10") for a, e in keys]
            if any(v is not None for v in vals):
                out.append([model, d, max(r.get("n_users", 0) for r in rows if r["model"] == model)] + vals)
    head = ["clean" if a == "clean" else f"{a.upper()} eps={e:g}" for a, e in keys]
    return table(["model", "defense", "users"] + head, out)


def report(doc: Doc) -> list[str]:
    return ["## The paper's protocol: evaluation-aware attacker (`objective: eval`, HR@10)", "",
            "Each evaluated user's 101 candidates get their own images, crafted against that user's "
            "evaluation triples (`vars_fast/attacks/oracle.py`). No single uploaded image can do this: "
            "it is an oracle upper bound on the damage, on a seeded subset of users.", "",
            oracle_table(doc.rows("ranking", "oracle")), ""]


SECTIONS.register(NAME, Section(order=20, run=oracle, report=report))
