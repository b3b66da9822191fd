"""The "evaluate" stage: the defence against every attack, as rows of metrics.json.

One module per table family, each a function of the shared ``Evaluation`` (``common.py``):

* ``ranking.py``    Tables 2/3, Fig. 6: purified catalogues re-ranked, detect+denoise gating;
* ``detection.py``  Table 4: ours vs ADDITION per FGSM eps, Gaussian-noise rows;
* ``ablation.py``   Table 5: the no-detector / no-perceptual checkpoints under PGD;
* ``targeted.py``   Table 6: prediction shift of the purified targeted images;
* ``adaptive.py``   PGD through the defence (EOT, detector hinge);
* ``embeddings.py`` Fig. 11 material.

``stage.py`` runs them in order and writes the timings and the figure arrays. Every attack
run here goes through ``vars_fast.attacks.untargeted``.
"""
from vars_fast.evaluate.common import ARRAYS, RANK_DEFENSES, Evaluation
from vars_fast.evaluate.stage import SECTIONS, run_all, run_stage

__all__ = ["ARRAYS", "RANK_DEFENSES", "Evaluation", "SECTIONS", "run_all", "run_stage"]
