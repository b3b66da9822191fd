"""The bounded model's frontier (beyond the paper; #22 part 2): what each cap on the visual
weight keeps clean, certifies against any image change, and keeps under attack.

The rows come from ``tools/bounded_frontier.py RUN --record``: for each cap, one model trained
with it (``recommenders/bounded.py``), and three ``robustness`` rows, all with ``table:
"frontier"``, ``variant: "cap=<c>"``, ``cap`` and ``bound_mean`` (the mean capped ‖w_u‖):
``attack: "clean"``; ``attack: "any", certified: true`` (the certificate, which also bounds the
`eval` oracle); the attack the sweep ran (``attack`` and ``steps`` say which). The section is
drawn only when the run holds such a sweep: a table, the image-blind floor (the best clean
model that ignores the images) and the unconstrained model's clean HR@10 as reference lines,
and a figure of the three curves against the cap.
"""
from __future__ import annotations

from typing import Optional

from vars_fast.evaluate.ranking import image_blind_floor
from vars_fast.evaluate.section import Doc, Section, table
from vars_fast.registry import RECOMMENDERS, SECTIONS

NAME = "frontier"


def _attack_label(r: dict) -> str:
    return f"{r['attack']}-{r['steps']}" if r.get("steps") else r["attack"]


def frontier(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(the attack labels, one point per (model, cap): ``model``, ``cap``, ``bound_mean``, ``clean``,
    ``certified`` and each attack's HR@10), sorted by model then cap."""
    points: dict[tuple, dict] = {}
    attacks: list[str] = []
    for r in rows:
        p = points.setdefault((r["model"], float(r["cap"])), {"model": r["model"], "cap": float(r["cap"])})
        if r.get("bound_mean") is not None:
            p["bound_mean"] = r["bound_mean"]
        if r.get("certified"):
            p["certified"] = r["HR@10"]
        elif r["attack"] == "clean":
            p["clean"] = r["HR@10"]
        else:
            label = f"{_attack_label(r)} eps {r['eps']:g}"
            attacks = attacks if label in attacks else attacks + [label]
            p[label] = r["HR@10"]
    return attacks, [points[k] for k in sorted(points)]


def _reference(ranking: list[dict], model: str) -> Optional[dict]:
    """The clean ranking row of the unconstrained model the bounded one restricts (its nearest
    registered parent class that is not itself a defence: VBPR for VBPR-bounded, AMR for
    AMR-bounded), when the run has it."""
    cls = RECOMMENDERS[model] if model in RECOMMENDERS else None
    plain = next((c.name for c in getattr(cls, "__mro__", ())[1:] if getattr(c, "name", None) in RECOMMENDERS
                  and RECOMMENDERS[c.name] is c and not hasattr(c, "robustness_label")), None)
    return next((r for r in ranking if r["model"] == plain and r.get("attack") == "clean"
                 and r.get("defense") == "none" and r.get("variant") is None
                 and r.get("objective", "train") == "train"), None)


def fig_frontier(points: list[dict], attacks: list[str], floor: Optional[dict], refs: dict, plt):
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.8, 3.9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per model; the metric is the marker and line style
    for n, model in enumerate(dict.fromkeys(p["model"] for p in points)):
        c = colours[n % len(colours)]
        P = [p for p in points if p["model"] == model]
        x = [p["cap"] for p in P]
        for key, style in [("clean", "o-"), ("certified", "s--")] + [(a, "^-.") for a in attacks]:
            y = [p.get(key) for p in P]
            if any(v is not None for v in y):
                ax.plot([a for a, b in zip(x, y) if b is not None], [b for b in y if b is not None], style,
                        color=c, label=f"{model} {key}")
        if refs.get(model) is not None:
            ax.axhline(refs[model]["HR@10"], ls=":", lw=1, color=c, label=f"{refs[model]['model']} clean (unbounded)")
    if floor is not None:
        ax.axhline(floor["HR@10"], ls="--", color="black", label=f"{floor['model']} clean (ignores the images)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cap c on ‖w_u‖")
    ax.set_ylabel("HR@10")
    ax.set_title("Bounded visual influence: the frontier")
    ax.legend(fontsize=6)
    return fig


def report(doc: Doc) -> list[str]:
    rows = doc.rows("robustness", NAME)
    attacks, points = frontier(rows)
    if len(points) < 2:
        return []
    ranking = doc.rows("ranking", "ranking")
    floor = image_blind_floor(ranking)
    refs = {m: _reference(ranking, m) for m in dict.fromkeys(p["model"] for p in points)}
    body = [[p["model"], f"{p['cap']:g}", p.get("bound_mean"), p.get("clean"), p.get("certified")]
            + [p.get(a) for a in attacks] for p in points]
    lines = [f"- {f['model']} clean (unbounded): HR@10 {f['HR@10']:.4f}." for f in refs.values() if f is not None]
    if floor is not None:
        lines.append(f"- Ignore the images: {floor['model']} scores HR@10 {floor['HR@10']:.4f} clean, whatever the "
                     "uploads; a bounded model is worth its images only above it.")
    return ["## Bounded visual influence: the frontier", "",
            "Each cap c trains its own model (`tools/bounded_frontier.py --record`). Certified: HR@10 whatever "
            "every image becomes (the test item at its worst against every candidate at its best, user by user; "
            "it also bounds the `eval` oracle). HR@10, `train` objective.", "",
            table(["model", "cap", "mean ‖w_u‖", "clean", "certified (any image)"] + attacks, body), "",
            *lines, "",
            *doc.figure("fig_bounded_frontier", "Clean, certified and attacked HR@10 against the cap",
                        lambda plt: fig_frontier(points, attacks, floor, refs, plt))]


SECTIONS.register(NAME, Section(order=73, report=report))
