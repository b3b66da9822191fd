"""CUDA sources: cheap checks that run wherever nvcc exists (the compile itself is CI's
``make cuda-build``, too slow for a unit test). Skipped without nvcc."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
pytestmark = pytest.mark.skipif(not os.path.exists(NVCC), reason="nvcc not found (set CUDA_HOME)")
CU = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _schemas() -> set[str]:
    src = open(os.path.join(ROOT, "csrc", "vars_fast.cpp")).read()
    return set(re.findall(r'm\.def\(\s*"([A-Za-z0-9_]+)\(', src))


def test_cuda_sources_follow_the_op_pattern():
    assert CU, "no csrc/cuda/*.cu"
    schemas = _schemas()
    for path in CU:
        src = open(path).read()
        name = os.path.basename(path)
        assert "TORCH_LIBRARY_IMPL(vars_fast, CUDA, m)" in src, name
        assert "getCurrentCUDAStream" in src, f"{name}: launch on the current stream"
        launches = src.count("<<<")
        assert launches and src.count("C10_CUDA_KERNEL_LAUNCH_CHECK") >= 1, f"{name}: check launches"
        for op in re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', src):
            assert op in schemas, f"{name} implements {op}, which csrc/vars_fast.cpp does not declare"


def test_built_cuda_extension_has_kernels():
    """If ``make cuda-build`` ran, its .so holds device code for sm_80 and sm_90."""
    so = glob.glob(os.path.join(ROOT, "build", "cuda-lib", "vars_fast", "_C*.so"))
    if not so:
        pytest.skip("build/cuda-lib not built (run `make cuda-build`)")
    cuobjdump = os.path.join(os.path.dirname(NVCC), "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("cuobjdump not found")
    out = subprocess.run([cuobjdump, "--list-elf", so[0]], capture_output=True, text=True, timeout=120).stdout
    assert "sm_80" in out and "sm_90" in out, out[-2000:]
