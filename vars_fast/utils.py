"""Small shared helpers: seeding, devices, the machine's name, progress bars, logging."""
from __future__ import annotations

import logging
import os
import platform
import random
import sys
from typing import Iterable, Optional

import numpy as np
import torch

LOG = logging.getLogger("vars_fast")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same (pass it on)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def get_device(name: str = "cpu") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is available (use run.device=cpu or auto)")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one; ``platform.processor()`` is
    empty on most Linux systems), so that run metadata names the machine its seconds and its
    floating-point results come from."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def progress(iterable: Optional[Iterable] = None, desc: str = "", total: Optional[int] = None,
             enabled: bool = True, unit: str = "it", **kw):
    """tqdm with rates and ETA on stderr; silent when disabled or VARS_FAST_PROGRESS=0."""
    from tqdm.auto import tqdm

    disable = (not enabled) or os.environ.get("VARS_FAST_PROGRESS") == "0"
    return tqdm(iterable, desc=desc, total=total, disable=disable, unit=unit, dynamic_ncols=True,
                leave=False, file=sys.stderr, **kw)


def setup_logging(log_file: Optional[str] = None, level: int = logging.INFO) -> logging.Logger:
    LOG.setLevel(level)
    LOG.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    LOG.addHandler(sh)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        LOG.addHandler(fh)
    return LOG
