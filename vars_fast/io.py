"""Atomic file writes and safe checkpoint loading, shared by every stage."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def _replacing(path: str | Path) -> Iterator[str]:
    """A temp file beside ``path`` for the block to write; fsynced and renamed over ``path``
    when the block ends, removed when it fails: readers see the old file or the new one, never
    a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: never a torn file.

    Keep ``obj`` to tensors, numbers, strings, lists and dicts so that it loads with
    ``weights_only=True``.
    """
    with _replacing(path) as tmp:
        torch.save(obj, tmp)


def pack_module(module) -> dict:
    """A module with a ``kwargs()`` method as ``{"kwargs", "state_dict"}`` (CPU tensors): how
    checkpoints store a network so that it is rebuilt from its constructor, loaded with
    ``weights_only=True``."""
    return {"kwargs": module.kwargs(), "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
