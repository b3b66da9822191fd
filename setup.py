"""Builds the extension vars_fast._C.

* C++ (csrc/vars_fast.cpp + csrc/cpu/*.cpp) always.
* CUDA (csrc/cuda/*.cu) when torch sees a CUDA toolkit and a GPU, or VARS_FAST_CUDA=1
  (then CUDA_HOME must point at nvcc, e.g. /usr/local/cuda; the sources compile and link
  even on machines without a GPU, which is how CI keeps them buildable).
* VARS_FAST_NO_EXT=1 skips the extension: the package then runs on its reference ops.
* CPU ISA for at::vec::Vectorized: AVX2 (+FMA, F16C) when the build machine has it, else the
  portable default; VARS_FAST_CPU_ISA=default|avx2 overrides (use "default" to build a wheel
  for unknown x86 machines). Without it Vectorized<float> is a scalar emulation, ~10x slower.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_isa_flags():
    """Compile flags selecting ATen's AVX2 Vectorized implementation (namespace at::vec::AVX2,
    the same one libtorch's own AVX2 kernels use), or [] for the portable default."""
    isa = os.environ.get("VARS_FAST_CPU_ISA")
    if isa is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            flags = []
        isa = "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "default"
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa != "default":
        raise RuntimeError(f"VARS_FAST_CPU_ISA={isa!r}: expected 'default' or 'avx2'")
    return []


def _wheel_cuda_includes():
    """Header dirs of the nvidia-* wheels that a CUDA torch wheel depends on (cuBLAS, cuSPARSE,
    ...). A minimal toolkit in CUDA_HOME may lack them while ATen/cuda/CUDAContext.h includes
    them; -isystem puts them after the toolkit's own -I, so the toolkit wins where both exist."""
    import site
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extensions():
    if os.environ.get("VARS_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/vars_fast.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = os.environ.get("VARS_FAST_CUDA")
    use_cuda = (want_cuda == "1") or (want_cuda is None and torch.cuda.is_available() and CUDA_HOME is not None)
    cxx = ["-O3", "-std=c++20", "-fopenmp"] + _cpu_isa_flags()
    extra = {"cxx": cxx}
    define_macros = []
    if use_cuda and cuda_sources:
        if CUDA_HOME is None:
            raise RuntimeError("VARS_FAST_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME=/usr/local/cuda")
        # No --use_fast_math: approximate division would move floor(dst * in/out) across integer
        # boundaries and break exact agreement with F.interpolate's source indices.
        extra["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"] + [f"-isystem={d}" for d in _wheel_cuda_includes()]
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
