"""The library that CMakeLists.txt builds (``make cmake-build``, in build/cmake) loads and runs.

Run as a script, it is the smoke check of ``make cmake-build``: it loads the given library with
``torch.ops.load_library`` and calls one CPU kernel of every op family against the pure-PyTorch
reference. The test runs the same script in a fresh interpreter (with ``VARS_FAST_NO_EXT=1``:
the setuptools-built ``vars_fast._C`` and the CMake-built library register the same
``vars_fast`` library, and one process can hold only one) and skips when nothing was built.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE_LIB = os.path.join(ROOT, "build", "cmake", "vars_fast", "_C.so")


def smoke(path: str) -> str:
    """Load ``path`` and check one call per op family against its reference; returns a summary line."""
    import torch

    from vars_fast import _ext
    from vars_fast.ops.info_nce import info_nce_reference
    from vars_fast.ops.pgd_step import pgd_step_reference
    from vars_fast.ops.random_resize_pad import random_resize_pad_reference
    from vars_fast.ops.residual_epilogue import residual_epilogue_reference

    assert not _ext.has_ops(), "run with VARS_FAST_NO_EXT=1: vars_fast._C would register the same library"
    torch.ops.load_library(path)
    ops = torch.ops.vars_fast
    g = torch.Generator().manual_seed(0)

    x0 = torch.rand(5, 3, 37, 41, generator=g)
    x = (x0 + 0.05 * torch.randn(x0.shape, generator=g)).clamp(0, 1)
    grad = torch.randn(x0.shape, generator=g)
    got = ops.pgd_step(x, x0, grad, None, None, 2 / 255, 8 / 255)
    torch.testing.assert_close(got, pgd_step_reference(x, x0, grad, 2 / 255, 8 / 255), atol=0, rtol=0)

    img = torch.rand(2, 3, 13, 11, generator=g)
    sizes, offsets = torch.tensor([9, 14]), torch.tensor([[3, 0], [1, 2]])
    got = ops.random_resize_pad(img, sizes, offsets, 16, "bilinear")
    torch.testing.assert_close(got, random_resize_pad_reference(img, sizes, offsets, 16), atol=1e-5, rtol=1e-5)

    y, r = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    got = ops.residual_epilogue(y, w, b, r, None, None, "instance", True, True, 1e-5)[0]
    torch.testing.assert_close(got, residual_epilogue_reference(y, w, b, r), atol=1e-5, rtol=1e-5)

    a, c = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
    pos, ag, cg = torch.randint(0, 11, (7,), generator=g), torch.full((7,), -1), torch.full((11,), -1)
    got = ops.info_nce(a, c, pos, ag, cg, 0.1)[0]
    torch.testing.assert_close(got, info_nce_reference(a, c, pos, ag, cg, 0.1), atol=1e-5, rtol=1e-5)
    return f"{path}: pgd_step, random_resize_pad, residual_epilogue and info_nce match the reference"


def test_cmake_built_library_matches_reference():
    if not os.path.exists(CMAKE_LIB):
        pytest.skip("build/cmake not built (run `make cmake-build`)")
    env = dict(os.environ, VARS_FAST_NO_EXT="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), CMAKE_LIB], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "match the reference" in r.stdout


if __name__ == "__main__":
    print("cmake-build OK:", smoke(sys.argv[1] if len(sys.argv) > 1 else CMAKE_LIB))
