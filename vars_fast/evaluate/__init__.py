"""The "evaluate" stage: the defence against every attack, as rows of metrics.json, and the
report's tables and figures drawn from them.

One module per section (``section.py``: a ``Section`` registered in ``registry.SECTIONS``
computes its rows and draws its part of report.md), in report order:

* ``targets.py``        the acceptance targets and the recovery of the damage (report only);
* ``ranking.py``        Tables 2/3, image fidelity, Fig. 6/7: purified catalogues re-ranked;
* ``oracle.py``         the evaluation-aware attacker's lists, purified;
* ``detection.py``      Table 4, Fig. 8-10: ours vs ADDITION per FGSM eps, Gaussian noise;
* ``generalisation.py`` the seen / unseen detection table;
* ``ablation.py``       Table 5: the no-detector / no-perceptual checkpoints under PGD;
* ``targeted.py``       Table 6: prediction shift of the purified targeted images;
* ``adaptive.py``       PGD through the defence (EOT, detector hinge), and the gated platforms'
                        own attacker;
* ``suite.py``          the attack suite against the undefended models, with its sanity checks;
* ``embeddings.py``     Fig. 11 material;
* ``transfer.py``       the defence moved to a second catalogue (optional).

``stage.py`` runs the sections in order and writes the timings and the figure arrays. Every
attack run here goes through ``vars_fast.attacks.untargeted``.
"""
from vars_fast.evaluate import (ablation, adaptive, detection, embeddings, generalisation, oracle, ranking,  # noqa: F401
                                robustness, suite, targeted, targets, transfer)
from vars_fast.evaluate.common import ARRAYS, Evaluation
from vars_fast.evaluate.section import Doc, Section, load_doc
from vars_fast.evaluate.stage import ordered, run_all, run_stage

__all__ = ["ARRAYS", "Doc", "Evaluation", "Section", "load_doc", "ordered", "run_all", "run_stage"]
