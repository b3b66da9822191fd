"""Builds the extension vars_fast._C.

* C++ (csrc/vars_fast.cpp + csrc/cpu/*.cpp) always.
* CUDA (csrc/cuda/*.cu) when torch sees a CUDA toolkit and a GPU, or VARS_FAST_CUDA=1
  (then CUDA_HOME must point at nvcc, e.g. /usr/local/cuda; the sources compile and link
  even on machines without a GPU, which is how CI keeps them buildable).
* VARS_FAST_NO_EXT=1 skips the extension: the package then runs on its reference ops.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("VARS_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/vars_fast.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = os.environ.get("VARS_FAST_CUDA")
    use_cuda = (want_cuda == "1") or (want_cuda is None and torch.cuda.is_available() and CUDA_HOME is not None)
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    extra = {"cxx": cxx}
    define_macros = []
    if use_cuda and cuda_sources:
        if CUDA_HOME is None:
            raise RuntimeError("VARS_FAST_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME=/usr/local/cuda")
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        define_macros.append(("VARS_FAST_WITH_CUDA", None))
        ext = CUDAExtension("vars_fast._C", sources + cuda_sources, extra_compile_args=extra,
                            define_macros=define_macros, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("vars_fast._C", sources, extra_compile_args=extra, define_macros=define_macros,
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="vars_fast",
    version="0.1.0",
    packages=find_packages(include=["vars_fast", "vars_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
