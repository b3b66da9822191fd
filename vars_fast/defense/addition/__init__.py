"""ADDITION (Wang et al., 2023, "ADDITION: Detecting Adversarial Examples With Image-Dependent
Noise Reduction", IEEE TDSC), adapted to a visually-aware recommender as in the paper's Table 4:
the detection baseline our detector is compared with.

ADDITION processes an input image in two trained stages and flags it when the model's output
changes too much between the image and its processed version:

1. **Noise injection.** A noise-level network ``N_phi`` reads the image's deep features and
   predicts a per-image Gaussian noise level, bounded to ``[sigma_min, sigma_max]``:
   ``sigma(x) = sigma_min + (sigma_max - sigma_min) * sigmoid(MLP((f(x) - mu) / s))``, with
   ``f`` the recommender's own image encoder (EfficientNet-Lite0 pooled features by default)
   and ``mu``/``s`` fitted on the clean training items. The injected image is
   ``z = clip(x + sigma(x) * n)``, ``n ~ N(0, I)``: noise strong enough to drown an adversarial
   perturbation, as weak as the image allows so that its details survive.
2. **Noise reduction.** A denoiser ``D_theta(z, sigma)`` removes the *total* noise (injected +
   adversarial) and returns an estimate of the benign image: ``A(x) = clip(D(z, sigma(x)))``.
   It is FFDNet-like (the noise level enters as a constant input map, the image is
   pixel-unshuffled 2x so that a few 3x3 conv layers see a wide context, the network predicts
   the residual noise); ``defense.addition.width`` x ``defense.addition.depth`` (48 x 5, 73k
   parameters) is small next to FFDNet/DnCNN-sized denoisers, to fit the 2-core default run.

The recommender criterion (the paper's Sec. 4.5): with ``s_u(x)`` user u's score of the item
when the item's image is x, over a fixed seeded set of users U,

    Delta(x', x) = sum_u |s_u(x') - s_u(x)| / sum_u |s_u(x)|        (relative L1 change)

and x is flagged when ``Delta(A(x), x) > change`` (0.2: "more than 20%"). The continuous
``Delta(A(x), x)`` is also the score of a ROC curve, and ``choose_threshold`` picks a
threshold on validation items by the rule the project uses for its own detector.

The losses below are this project's formulation of the two stages as the VARS paper describes
them; ADDITION's own text was not available to check them against (docs/results/addition.md,
which also holds the measurements behind the ``defense.addition.*`` defaults).

Training (``Addition.fit``), on the training items only, with adversarial training examples
x_adv made by the project's FGSM on the training-triple objective (``attacks.untargeted``) at
``defense.addition.train_eps``; every image view x~ is the clean x or its x_adv:

* stage 1, the denoiser, at noise levels drawn uniformly from the configured range:
  ``L_D = E ||D(clip(x~ + sigma n), sigma) - x||_1 + lambda_s E Delta(D(...), x)``
  (pixel reconstruction of the *clean* image, plus the recommender-guided term: the denoised
  view must score as the clean image does);
* stage 2, the noise-level network, with the noise reparameterised so that the loss is
  differentiable in sigma:
  ``L_N = E Delta(D(clip(x~ + sigma(x~) n), sigma(x~)), x) + lambda_sigma E (sigma(x~) - sigma_min) / (sigma_max - sigma_min)``.
  On a clean x, more noise only loses detail; on an x_adv, more noise drowns the perturbation:
  the network learns an image-dependent trade-off, and the second term prefers the smallest
  noise that is enough. With ``defense.addition.joint`` the denoiser keeps training in this
  stage on ``L_D`` at the predicted levels (``L_N`` plus the pixel term, over both networks):
  stage 1 asks D to remove an adversarial perturbation at *every* level, including the small
  ones that clean images end up with, which makes it smooth clean images too; at the
  predicted levels it can leave small-sigma (clean) inputs alone.

The package: ``networks`` (the two modules and Delta), ``baseline`` (``Addition``: the pipeline,
detection, checkpoint; ``check_config``, ``build_addition``), ``fit`` (the training above and
``fgsm_examples``), ``in_run`` (``fit_in_run``: Table 4's baseline in a run folder; its command
line is ``tools/addition_baseline.py``).
"""
from vars_fast.defense.addition.baseline import FORMAT, Addition, build_addition, check_config
from vars_fast.defense.addition.fit import fgsm_examples
from vars_fast.defense.addition.in_run import fit_in_run
from vars_fast.defense.addition.networks import NoiseLevelNet, NoiseReducer, relative_change

__all__ = ["FORMAT", "Addition", "NoiseLevelNet", "NoiseReducer", "build_addition", "check_config", "fgsm_examples",
           "fit_in_run", "relative_change"]
