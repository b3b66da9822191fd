"""Shared fixtures: a tiny synthetic catalogue, its config, and a temporary run folder."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VARS_FAST_PROGRESS", "0")


def make_tiny_cfg():
    """~60 users, 80 items, 32 px: every stage runs on it in seconds. 30 negatives (not the
    paper's 100) because 80 items minus a user's positives leaves fewer than 100."""
    from vars_fast.config import DataConfig

    return DataConfig(source="synthetic", seed=0, n_users=60, n_items=80, image_size=32,
                      interactions_per_user=8.0, n_negatives=30)


@pytest.fixture
def tiny_cfg():
    """A fresh DataConfig for the tiny synthetic catalogue (safe to modify)."""
    return make_tiny_cfg()


@pytest.fixture(scope="session")
def tiny_catalogue(tmp_path_factory):
    """The tiny synthetic Catalogue, built once per test session (treat it as read-only)."""
    from vars_fast.data import load_catalogue

    return load_catalogue(make_tiny_cfg(), tmp_path_factory.mktemp("tiny_cache"), progress=False)


@pytest.fixture
def tmp_run(tmp_path):
    """A RunFolder in the test's tmp_path."""
    from vars_fast.run import RunFolder

    return RunFolder(tmp_path / "run")


@pytest.fixture
def run_triton_interpreted():
    """Run a script in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is
    imported: triton.jit picks interpreter vs compiler when a kernel is decorated); the
    script prints OK on success. Skips when triton is not installed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")

    def run(script: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", VARS_FAST_NO_EXT="1")
        env.pop("VARS_FAST_BACKEND", None)
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]

    return run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP waits on a shared 2-core machine (restored
    after the module). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
