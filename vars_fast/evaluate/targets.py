"""The acceptance targets, computed from the rows (a report-only section: it computes nothing).

Defences against an attack are judged by the share of the attack's damage they recover,
(HR_defended_attacked - HR_attacked) / (HR_clean - HR_attacked) (``vars_fast.metrics.
damage_recovered``), not by defended / clean, which is high by construction when the attack
barely hurts. A row whose attack costs less than 10% of clean HR@10 reads "attack too weak to
judge". Adaptive attacks are measured against the undefended plain PGD at their eps (the attack
the defence was meant to undo). Targets (``RECOVERY_NEED``) apply at the table eps; rows at
other eps show the recovery without a target.
"""
from __future__ import annotations

from vars_fast.evaluate import deployments
from vars_fast.evaluate.section import Doc, Section, find, missing, table
from vars_fast.metrics import TOO_WEAK, attack_damage, damage_recovered, recovery_status
from vars_fast.registry import DEPLOYMENTS, SECTIONS



def _clean_targets(R: list[dict], D: list[dict], base: float) -> list[list]:
    rows = []
    for d in deployments.ordered():
        need = DEPLOYMENTS[d].clean_need
        v = (find(R, model="VBPR", defense=d, attack="clean", eps=0) or {}).get("HR@10")
        if need is not None and v is not None and base:
            r = v / base
            rows.append([f"clean HR@10 with {deployments.label(d)} (>= {need:.0%} of undefended)", r, need,
                         "met" if r >= need else f"missed by {need - r:.4f}"])
    for r in sorted((r for r in D if r.get("detector") == "ours" and r.get("attack") == "fgsm"
                     and r.get("variant") is None and float(r["eps"]) >= 16), key=lambda r: float(r["eps"])):
        a = r.get("accuracy")
        rows.append([f"detection accuracy, FGSM eps={r['eps']}", a, 0.9,
                     None if a is None else ("met" if a >= 0.9 else f"missed by {0.9 - a:.4f}")])
    return rows


def _recovery_rows(R: list[dict], base: float, eps: float) -> list[list]:
    rows = []
    attacked = sorted((r for r in R if r.get("model") == "VBPR" and r.get("variant") is None
                       and r.get("attack") not in ("clean", "adaptive-pgd") and r.get("defense") == "none"),
                      key=lambda r: (r["attack"], str(r.get("objective") or ""), float(r["eps"])))
    for a in attacked:
        e, obj = a["eps"], a.get("objective")
        refs = [a["attack"]] + (["adaptive-pgd"] if a["attack"] == "pgd" else [])  # adaptive vs the PGD it adapts
        for attack in refs:
            for d in deployments.ordered(judged=True):
                dr = find(R, model="VBPR", defense=d, attack=attack, eps=e, objective=obj)
                if dr is None:
                    continue
                target = DEPLOYMENTS[d].recovery_need
                need = target if float(e) == float(eps) else None
                dmg = attack_damage(base, a.get("HR@10"))
                rec = damage_recovered(base, a.get("HR@10"), dr.get("HR@10"))
                if need is not None:
                    status = recovery_status(base, a.get("HR@10"), dr.get("HR@10"), need)
                else:
                    status = (TOO_WEAK if dmg is None or dmg < 0.10
                              else "no target at this eps" if target is not None else "no target")
                label = attack.upper() + (f" ({obj})" if obj else "")
                rows.append([label, e, a.get("HR@10"), dmg, deployments.label(d), dr.get("HR@10"), rec,
                             "—" if need is None else need, status])
    return rows


def targets_summary(m: dict, eps: float) -> str:
    """The targets table and the recovery of the damage, from ``m["ranking"]`` and ``m["detection"]``."""
    R, D = m.get("ranking", []), m.get("detection", [])
    base = (find(R, model="VBPR", defense="none", attack="clean", eps=0) or {}).get("HR@10")
    if base is None:
        return missing("no clean undefended VBPR row")
    out = table(["target (VBPR)", "value (share of clean HR@10 / accuracy)", "needed", "status"],
                _clean_targets(R, D, base))
    rows = _recovery_rows(R, base, eps)
    if rows:
        out += ("\n\nRecovery of the damage (HR@10, VBPR; clean undefended "
                f"{base:.4f}). Damage = (clean - attacked) / clean; recovered = (defended - attacked) / "
                "(clean - attacked); an attack with damage under 0.10 is too weak to judge a defence.\n\n"
                + table(["attack", "eps", "HR@10 attacked", "damage", "defence", "HR@10 defended",
                         "share of damage recovered", "needed", "status"], rows))
    return out


def report(doc: Doc) -> list[str]:
    m = {"ranking": doc.rows("ranking", "ranking", "adaptive", objective="train"),
         "detection": doc.rows("detection", "detection")}
    return ["## Targets", "", targets_summary(m, doc.eps), ""]


SECTIONS.register("targets", Section(order=0, report=report))
