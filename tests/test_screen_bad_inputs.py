"""A bad-input corpus, generated here: every case is one status row, never a crash, and no file
outside the catalogue root is ever opened."""
from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vars_fast.screen import screen
from vars_fast.screening import reader
from screen_fixtures import make_checkpoint
from vars_fast.screening.model import Screener

SIZE = 32
os.environ.setdefault("VARS_FAST_PROGRESS", "0")


@pytest.fixture(scope="module")
def screener(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_screen.py: oversubscribed shared CPU
    ck = make_checkpoint(tmp_path_factory.mktemp("ck") / "defense.pt", image_size=SIZE, width=8, n_res_blocks=1,
                         calibrate=8)
    yield Screener.from_checkpoint(ck, "cpu"), str(ck)
    torch.set_num_threads(n)


def _img(mode="RGB", size=(40, 40), fmt="PNG", **kw) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        im = Image.new(mode, size)
        im.putdata([tuple(int(v) for v in rng.integers(0, 255, len(mode))) if len(mode) > 1 else int(rng.integers(255))
                    for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(w=30000, h=30000) -> bytes:
    """A valid PNG header declaring w x h (900 Mpx) with a tiny IDAT: decoding it would need GBs."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("corpus")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    good = _img(fmt="JPEG")
    (outside / "secret.jpg").write_bytes(good)
    files = {
        "good.jpg": good, "zero.jpg": b"", "trunc.jpg": good[: len(good) // 2], "text.png": b"hello, not a PNG\n",
        "bomb.png": _bomb_png(), "anim.gif": _gif(), "deep16.png": _img("I;16"),
        "cmyk.jpg": _img("CMYK", fmt="JPEG"), "rgba.png": _img("RGBA"), "tiny.png": _img(size=(1, 1)),
        "big.png": _img(size=(300, 300)),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.mkfifo(root / "fifo.jpg")  # would block a naive open().read()
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")  # symlink out of the root
    (root / "dangling.png").symlink_to(root / "gone.png")
    (root / "noperm.jpg").write_bytes(good)
    os.chmod(root / "noperm.jpg", 0)
    (root / "dupe").mkdir()
    (root / "dupe" / "x.jpg").write_bytes(good)
    (root / "dupe" / "x.png").write_bytes(_img())  # same id "dupe/x": the later one is a duplicate
    return root


def _rows(out: Path) -> list[dict]:
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


@pytest.fixture
def spy_open(monkeypatch, corpus):
    """Record every path the reader opens (workers=0 keeps reads in this process)."""
    opened = []
    real = os.open

    def spy(path, flags, *a, **kw):
        if not flags & (os.O_WRONLY | os.O_RDWR):  # reads only (output temp files are writes)
            opened.append(os.fsdecode(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(reader.os, "open", spy)
    return opened


def test_folder_corpus(screener, corpus, tmp_path, spy_open):
    s, ck = screener
    summ = screen(str(corpus), ck, str(tmp_path / "out"), batch_size=4, shard_size=5, workers=0, screener=s,
                  max_bytes=100_000)
    rows = {r["source"]: r for r in _rows(tmp_path / "out")}
    want = {"good.jpg": "ok", "zero.jpg": "unreadable", "trunc.jpg": "unreadable", "text.png": "unreadable",
            "bomb.png": "too_large", "anim.gif": "ok", "deep16.png": "ok", "cmyk.jpg": "ok", "rgba.png": "ok",
            "tiny.png": "too_small", "big.png": "too_large", "fifo.jpg": "unreadable", "escape.jpg": "outside_root",
            "dangling.png": "missing", "dupe/x.jpg": "ok", "dupe/x.png": "duplicate_id",
            "noperm.jpg": "ok" if os.geteuid() == 0 else "unreadable"}  # root ignores file modes
    assert {k: r["status"] for k, r in rows.items()} == want
    assert summ["rows"] == len(want)
    for r in rows.values():
        assert (r["status"] == "ok") == (r["feature"] is not None) == (r["distance"] is not None)
        assert (r["status"] == "ok") or r["error"]
    assert "bytes exceeds --max-bytes" in rows["big.png"]["error"]
    root = os.path.realpath(corpus)
    assert spy_open and all(p.startswith(root + os.sep) for p in spy_open)


def test_manifest_corpus(screener, corpus, tmp_path, spy_open):
    s, ck = screener
    entries = [("ok1", "good.jpg"), ("missing", "nope.jpg"), ("up", "../outside/secret.jpg"),
               ("abs", str(corpus.parent / "outside" / "secret.jpg")), ("dir", "dupe"), ("dup", "good.jpg"),
               ("sku/with/../seps", "anim.gif"), ("", "good.jpg"), ("nopath", ""), ("link", "escape.jpg"),
               ("a", "dupe/./../good.jpg"), ("dup", "cmyk.jpg"), ("back\\slash", "rgba.png")]
    man = tmp_path / "m.csv"
    man.write_text("item_id,path\n" + "".join(f"{i},{p}\n" for i, p in entries))
    screen(str(man), ck, str(tmp_path / "out"), root=str(corpus), batch_size=3, shard_size=4, workers=0, screener=s)
    got = [(r["item_id"], r["status"]) for r in _rows(tmp_path / "out")]
    assert got == [("ok1", "ok"), ("missing", "missing"), ("up", "outside_root"), ("abs", "outside_root"),
                   ("dir", "unreadable"), ("dup", "ok"), ("sku/with/../seps", "ok"), ("", "bad_id"),
                   ("nopath", "missing"), ("link", "outside_root"), ("a", "outside_root"),
                   ("dup", "duplicate_id"), ("back\\slash", "ok")]
    root = os.path.realpath(corpus)
    assert all(p.startswith(root + os.sep) for p in spy_open)


def test_tar_corpus(screener, corpus, tmp_path):
    s, ck = screener
    shards = tmp_path / "shards"
    shards.mkdir()
    good = (corpus / "good.jpg").read_bytes()

    def add(tf, name, data=None, kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        info.size = len(data or b"")
        tf.addfile(info, io.BytesIO(data or b""))

    with tarfile.open(shards / "a-000.tar", "w") as tf:
        add(tf, "k1.jpg", good)
        add(tf, "k1.json", b"{}")  # another field of the same sample: not an image
        add(tf, "k2.jpg", good[:100])
        add(tf, "k3.jpg", kind=tarfile.SYMTYPE)
        add(tf, "../../evil.jpg", good)  # never extracted: just an id
        add(tf, "k1.png", _img())  # the same key again
    (shards / "b-001.tar").write_bytes(b"not a tar at all" * 100)
    screen(str(shards), ck, str(tmp_path / "out"), batch_size=2, shard_size=3, workers=2, screener=s)
    got = [(r["item_id"], r["status"]) for r in _rows(tmp_path / "out")]
    assert got == [("k1", "ok"), ("k2", "unreadable"), ("k3", "unreadable"), ("../../evil", "ok"),
                   ("k1", "duplicate_id"), ("b-001.tar", "unreadable")]
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()
