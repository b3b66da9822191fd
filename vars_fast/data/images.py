"""Image decoding that never raises, safe path templates, and an on-disk uint8 image store.

``decode_image`` is shared by the catalogue loader and by screening: any input -- bytes, a
path, a missing file, a truncated JPEG, a text file named ``.jpg``, a decompression bomb, a
16-bit or CMYK or palette image, an animated GIF -- comes back as
``(uint8 [3, S, S] | None, status, error_message)`` with status one of :data:`STATUSES`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageFile

from vars_fast.io import atomic_write_bytes, atomic_write_json

STATUSES = ("ok", "missing", "unreadable", "too_large", "too_small")
MAX_PIXELS = 64_000_000  # ~8000x8000: above this an image is treated as a decompression bomb
MIN_SIDE = 8  # below this there is nothing to recognise
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is "unreadable", never half-grey

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha is composited on white (product photos sit on white)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit data: scale by the 16-bit range; a 32-bit "I"/"F" image holding 8-bit values
        # (as some decoders give) stays as it is
        scale = 257.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 1.0
        a = np.clip(a / scale, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _resize_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to size x size (PIL's resize is antialiased)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                      reducing_gap=3.0)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_text(e: BaseException) -> str:
    """``"Type: message"`` without object addresses (PIL names ``<_io.BytesIO object at 0x..>``),
    so that the same bad file gives the same text in every process: a resumed screening job
    must write rows identical to an uninterrupted one."""
    return f"{type(e).__name__}: {_ADDRESS.sub('', str(e))}"


def decode_image(src: Source, size: int, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
                 ) -> tuple[Optional[np.ndarray], str, str]:
    """Decode ``src`` (bytes or a path) to uint8 [3, size, size]; never raises on bad input.

    Returns ``(array | None, status, error)``; ``array`` is None unless status is ``ok``.
    JPEG/PNG/WebP/GIF (first frame)/BMP/TIFF; grey, palette, alpha, CMYK and 16-bit modes
    become RGB. The pixel count is checked from the header before any pixel is decoded.
    """
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
        else:
            p = Path(src)
            if not p.exists():
                return None, "missing", f"no such file: {p}"
            if not p.is_file():
                return None, "unreadable", f"not a regular file: {p}"
            data = p.read_bytes()
    except OSError as e:  # permission denied, I/O error, name too long...
        return None, "unreadable", error_text(e)
    if len(data) == 0:
        return None, "unreadable", "empty file (0 bytes)"
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        w, h = img.size
        if w * h > max_pixels:
            return None, "too_large", f"{w}x{h} pixels exceeds the limit of {max_pixels}"
        if min(w, h) < min_side:
            return None, "too_small", f"{w}x{h} pixels: smaller than {min_side} px on a side"
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF / WebP: the first frame
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # let libjpeg decode at 1/2..1/8 scale: far faster
        img.load()
        out = _resize_square(_to_rgb(img), size)
        arr = np.asarray(out, dtype=np.uint8)
        if arr.shape != (size, size, 3):
            return None, "unreadable", f"unexpected decoded shape {arr.shape}"
        return np.ascontiguousarray(arr.transpose(2, 0, 1)), "ok", ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # warning: under -W error
        return None, "too_large", _ADDRESS.sub("", str(e))
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a status, never a crash
        return None, "unreadable", error_text(e)


# ---------------------------------------------------------------- path templates

_FIELD = re.compile(r"(?P<esc>\{\{|\}\})|(?P<field>\{item_id(?:\[(?P<a>-?\d*)(?P<colon>:(?P<b>-?\d*))?\])?\})|"
                    r"(?P<other>\{[^}]*\}?|\})")


def render_template(template: str, item_id: str) -> str:
    """``str.format``-like rendering of ``{item_id}``, ``{item_id[:3]}``, ``{item_id[2:5]}``,
    ``{item_id[0]}`` (``{{``/``}}`` escape braces). Anything else in braces is an error:
    no attribute access or arbitrary expressions (templates come from config files).
    """
    def sub(m: re.Match) -> str:
        t = m.group(0)
        if m.group("esc"):
            return t[0]
        if m.group("other") is not None:
            raise ValueError(f"path_template {template!r}: unsupported field {t!r} "
                             "(use {item_id} or a slice such as {item_id[:3]})")
        start, stop = m.group("a"), m.group("b")
        if "[" not in t:
            return item_id
        if not m.group("colon"):  # single index
            if not start:
                raise ValueError(f"path_template {template!r}: empty index in {t!r}")
            k = int(start)
            return item_id[k] if -len(item_id) <= k < len(item_id) else ""
        return item_id[slice(int(start) if start else None, int(stop) if stop else None)]

    return _FIELD.sub(sub, template)


def unsafe_id_reason(item_id: str) -> Optional[str]:
    """Why an item id may not be used to build a path (None when it is safe)."""
    if not item_id:
        return "empty item id"
    if "/" in item_id or "\\" in item_id or "\x00" in item_id:
        return f"item id {item_id!r} contains a path separator or NUL"
    if item_id in (".", "..") or item_id.startswith(".."):
        return f"item id {item_id!r} could climb out of the image folder"
    return None


def resolve_image_path(root: Union[str, Path], template: str, item_id: str) -> tuple[Optional[Path], str]:
    """``root / template(item_id)`` if it stays inside ``root`` (symlinks resolved), else
    ``(None, reason)``. Nothing outside ``root`` is ever returned."""
    reason = unsafe_id_reason(item_id)
    if reason:
        return None, reason
    rel = render_template(template, item_id)
    if os.path.isabs(rel):
        return None, f"path template gives an absolute path {rel!r} for item {item_id!r}"
    base = Path(root).resolve()
    p = (base / rel).resolve()
    if p != base and base not in p.parents:
        return None, f"path {rel!r} for item {item_id!r} escapes the image folder {base}"
    return p, ""


# ---------------------------------------------------------------- image store

def _source_key(src: Source) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "b:" + hashlib.sha1(bytes(src)).hexdigest()
    p = Path(src)
    try:
        st = p.stat()
        return f"p:{p}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"p:{p}:absent"


def decode_catalogue(sources: Sequence[Optional[Source]], size: int, cache_dir: Optional[Union[str, Path]] = None,
                     workers: int = 0, progress: Optional[Callable] = None,
                     errors: Optional[Sequence[str]] = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode every source into uint8 [N, 3, size, size] (zeros where not ok).

    ``sources[i]`` is bytes, a path, or None (no image: status from ``errors[i]`` or
    "missing"; a message starting with "unsafe:" gives status unreadable). The result is
    cached in ``cache_dir`` as ``images-<hash>.npy`` + ``.json`` (statuses), keyed by every
    source (path, size, mtime, or the bytes' hash) and ``size``: a re-run reads it back.
    Returns ``(images, statuses, error_messages)``.
    """
    n = len(sources)
    key = hashlib.sha256(f"v1|{size}|".encode())
    for s, e in zip(sources, errors or [""] * n):
        key.update(("none:" + (e or "") if s is None else _source_key(s)).encode() + b"\n")
    digest = key.hexdigest()[:20]
    npy = json_path = None
    if cache_dir is not None:
        npy = Path(cache_dir) / f"images-{digest}.npy"
        json_path = npy.with_suffix(".json")
        if npy.is_file() and json_path.is_file():
            try:
                info = json.loads(json_path.read_text())
                arr = np.load(npy, mmap_mode=None)
                if arr.shape == (n, 3, size, size) and len(info["status"]) == n:
                    return arr, info["status"], info["error"]
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache is rebuilt below
    images = np.zeros((n, 3, size, size), dtype=np.uint8)
    status, error = ["missing"] * n, [""] * n

    def one(i: int) -> None:
        s = sources[i]
        if s is None:
            msg = (errors[i] if errors else "") or "no image for this item"
            status[i] = "unreadable" if msg.startswith("unsafe:") else "missing"
            error[i] = msg
            return
        arr, st, err = decode_image(s, size)
        if arr is not None:
            images[i] = arr
        status[i], error[i] = st, err

    idx = range(n)
    if workers and workers > 1:
        with ThreadPoolExecutor(workers) as ex:  # PIL releases the GIL while decoding
            it = ex.map(one, idx)
            for _ in (progress(it, total=n) if progress else it):
                pass
    else:
        for i in (progress(idx) if progress else idx):
            one(i)
    if npy is not None:
        buf = io.BytesIO()
        np.save(buf, images)
        atomic_write_bytes(npy, buf.getvalue())
        atomic_write_json(json_path, {"status": status, "error": error, "size": size})
    return images, status, error


def status_counts(status: Sequence[str]) -> dict[str, int]:
    out = {s: 0 for s in STATUSES}
    for s in status:
        out[s] = out.get(s, 0) + 1
    return out
