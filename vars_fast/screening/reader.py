"""Safe bytes for one plan row, then ``decode_image``: every failure is a status, never a raise.

Nothing outside the catalogue root is ever opened: a file path is joined to the root, every
symlink is resolved (``realpath``) and the result must still lie under the root's realpath;
the check runs at read time, so a symlink planted after planning is caught too. Tar members
are read at their recorded offset inside the shard (never extracted to disk).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from vars_fast.data.images import decode_image, error_text
from vars_fast.screening.plan import Row

MAX_BYTES = 64 << 20  # a compressed image above 64 MiB is not a product photo: too_large


def read_bytes(row: Row, root: str, max_bytes: int = MAX_BYTES) -> tuple[Optional[bytes], str, str]:
    """``(data | None, status, error)`` for a plan row whose status is still open."""
    if row.kind == "tar":
        if row.size > max_bytes:
            return None, "too_large", f"{row.size} bytes exceeds --max-bytes {max_bytes}"
        try:
            with open(row.path, "rb") as f:
                f.seek(row.offset)
                data = f.read(row.size)
        except OSError as e:
            return None, "unreadable", error_text(e)
        if len(data) != row.size:
            return None, "unreadable", f"tar shard truncated: {len(data)} of {row.size} bytes"
        return data, "ok", ""
    broot = os.fsencode(root)
    full = os.path.realpath(os.path.join(broot, row.path))
    if not full.startswith(broot.rstrip(b"/") + b"/"):
        return None, "outside_root", "path resolves outside the catalogue root (symlink or ..)"
    try:
        fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None, "missing", "no such file"
    except OSError as e:  # permission denied, a loop, ...
        return None, "unreadable", f"{type(e).__name__}: {e.strerror or e}"
    try:
        st = os.fstat(fd)
        import stat

        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or stream forever
            return None, "unreadable", "not a regular file"
        if st.st_size > max_bytes:
            return None, "too_large", f"{st.st_size} bytes exceeds --max-bytes {max_bytes}"
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
        return data, "ok", ""
    except OSError as e:
        return None, "unreadable", f"{type(e).__name__}: {e.strerror or e}"
    finally:
        os.close(fd)


def load_row(row: Row, root: str, size: int, max_bytes: int = MAX_BYTES) -> tuple[Optional[np.ndarray], str, str]:
    """Plan row -> ``(uint8 [3, size, size] | None, status, error)``."""
    if row.status:
        return None, row.status, row.error
    data, status, err = read_bytes(row, root, max_bytes)
    if data is None:
        return None, status, err
    return decode_image(data, size)
