"""Small shared helpers: seeding, devices, the machine's name and versions, index batches,
progress bars, logging."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import random
import sys
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from vars_fast import __version__, _ext

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


def versions(*distributions: str) -> dict:
    """What a result was made with, for run metadata and screening summaries: Python, torch,
    numpy, this package and whether its compiled extension loaded, and the machine (seconds and
    floating-point results depend on it: ``device_name`` is the GPU, else the CPU model).
    ``distributions``: further installed packages to name (e.g. "pyarrow", "ray")."""
    cuda = torch.cuda.is_available()
    return {"vars_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "extension": _ext.has_ops(), "cuda": cuda,
            "device_name": torch.cuda.get_device_name(0) if cuda else cpu_model(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            **{name: importlib.metadata.version(name) for name in distributions}}


def index_batches(items: Sequence[int], batch_size: int,
                  generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """LongTensor batches of ``items`` (indices), in their order, or with ``generator`` in the
    order of one ``randperm`` drawn from it (a fresh shuffle per call)."""
    items = torch.as_tensor(list(items), dtype=torch.long)
    if generator is not None:
        items = items[torch.randperm(items.numel(), generator=generator)]
    for s in range(0, items.numel(), batch_size):
        yield items[s:s + batch_size]


def to_float(x: torch.Tensor, device) -> torch.Tensor:
    """Images on ``device`` as floats in [0, 1] (uint8 ones divided by 255)."""
    x = x.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


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
