"""vars_fast: securing visually-aware recommender systems against adversarial item images.

Attacks (FGSM, PGD, AIP, TAaMR) on item images, and a defence made of a denoiser and a
contrastive detector trained jointly, with custom C++/CUDA/Triton kernels for the hot ops.
"""
__version__ = "0.1.0"
