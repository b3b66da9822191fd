"""The defence: a denoiser D (``denoiser.py``) and a contrastive detector (``detector.py``),
trained jointly (``training.py``, run by ``stage.py``), packed into a ``Defense``
(``model.py``) that purifies, scores and flags images; ``addition/`` is the ADDITION
baseline."""
from vars_fast.defense.denoiser import Denoiser
from vars_fast.defense.detector import Detector
from vars_fast.defense.model import FORMAT, Defense, build_detector, load_defense, save_defense

__all__ = ["FORMAT", "Defense", "Denoiser", "Detector", "build_detector", "load_defense", "save_defense"]
