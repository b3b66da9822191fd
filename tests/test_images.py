"""decode_image on good and bad input, path templates, and the cached image store."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from vars_fast.data.images import decode_catalogue, decode_image, render_template, resolve_image_path

S = 16


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w=40, h=30, colour=(200, 30, 60)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_decode_formats(fmt):
    arr, status, err = decode_image(_encode(_rgb(), fmt), S)
    assert status == "ok" and err == "" and arr.shape == (3, S, S) and arr.dtype == np.uint8
    assert abs(int(arr[0].mean()) - 200) < 12 and abs(int(arr[1].mean()) - 30) < 12


def test_modes_become_rgb():
    grey = decode_image(_encode(Image.new("L", (20, 20), 128), "PNG"), S)[0]
    assert (grey == 128).all()
    grey_jpg = decode_image(_encode(Image.new("L", (20, 20), 128), "JPEG"), S)[0]
    assert grey_jpg.shape == (3, S, S) and abs(int(grey_jpg.mean()) - 128) < 3
    # RGBA: fully transparent pixels become white, opaque ones keep their colour
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 10))
    a = decode_image(_encode(rgba, "PNG"), 20)[0]
    assert tuple(a[:, 2, 2]) == (0, 0, 255) and tuple(a[:, 17, 2]) == (255, 255, 255)
    la = decode_image(_encode(Image.new("LA", (20, 20), (0, 0)), "PNG"), S)[0]
    assert (la == 255).all()
    cmyk = decode_image(_encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), S)
    assert cmyk[1] == "ok" and cmyk[0][0].mean() > 200 and cmyk[0][1].mean() < 60  # red
    pal = Image.new("P", (20, 20), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 200, 10] + [0, 0, 0] * 252)
    assert tuple(decode_image(_encode(pal, "PNG"), S)[0][:, 0, 0]) == (10, 200, 10)


def test_16bit_grey_png():
    a16 = np.full((20, 20), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(a16)  # mode I;16
    arr, status, _ = decode_image(_encode(img, "PNG"), S)
    assert status == "ok" and abs(int(arr.mean()) - 127) <= 1
    i32 = Image.fromarray(np.full((20, 20), 60000, dtype=np.int32), mode="I")
    arr, status, _ = decode_image(_encode(i32, "TIFF"), S)
    assert status == "ok" and abs(int(arr.mean()) - 233) <= 1


def test_animated_gif_first_frame():
    frames = [Image.new("P", (20, 20), c) for c in (1, 2)]
    pal = [0, 0, 0, 250, 0, 0, 0, 250, 0] + [0] * (256 * 3 - 9)
    for f in frames:
        f.putpalette(pal)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    arr, status, _ = decode_image(buf.getvalue(), S)
    assert status == "ok" and arr[0].mean() > 240 and arr[1].mean() < 10


def test_bad_inputs_get_statuses(tmp_path):
    jpg = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    cases = {
        "missing": (tmp_path / "nope.jpg", "missing"),
        "zero": (b"", "unreadable"),
        "truncated": (jpg[: len(jpg) // 2], "unreadable"),
        "text": (b"this is not an image at all, just text", "unreadable"),
        "tiny": (_encode(_rgb(1, 1), "PNG"), "too_small"),
        "thin": (_encode(_rgb(200, 4), "PNG"), "too_small"),
        "folder": (tmp_path, "unreadable"),
    }
    for name, (src, want) in cases.items():
        arr, status, err = decode_image(src, S)
        assert status == want and arr is None and err, name
    # decompression bomb: a small PNG claiming huge dimensions is refused from its header
    bomb = _encode(Image.new("L", (5000, 5000), 0), "PNG")
    assert len(bomb) < 100_000
    arr, status, err = decode_image(bomb, S, max_pixels=10_000_000)
    assert status == "too_large" and "5000x5000" in err


def test_resize_centre_crops():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))  # the centre square is white
    arr, status, _ = decode_image(_encode(img, "PNG"), 10)
    assert status == "ok" and arr.min() > 225  # only the bicubic kernel's edge reaches outside


def test_render_template_slices_and_rejects_fields():
    assert render_template("{item_id}.jpg", "B00XYZ") == "B00XYZ.jpg"
    assert render_template("{item_id[:3]}/{item_id}.jpg", "B00XYZ") == "B00/B00XYZ.jpg"
    assert render_template("{item_id[-2:]}/{item_id[1]}_{{x}}", "B00XYZ") == "YZ/0_{x}"
    for bad in ("{item_id.__class__}", "{user}", "{0}", "{item_id", "a}b", "{item_id[]}"):
        with pytest.raises(ValueError, match="path_template"):
            render_template(bad, "a")


def test_ids_never_escape_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_encode(_rgb(), "JPEG"))
    (root / "ok.jpg").write_bytes(_encode(_rgb(), "JPEG"))
    os.symlink(secret, root / "link.jpg")
    assert resolve_image_path(root, "{item_id}.jpg", "ok")[0] == (root / "ok.jpg").resolve()
    for iid in ("../secret", "..", "a/../../secret", "..\\secret", "x\x00y", ""):
        p, why = resolve_image_path(root, "{item_id}.jpg", iid)
        assert p is None and why, iid
    assert resolve_image_path(root, "{item_id[:2]}/../../{item_id}.jpg", "..secret")[0] is None
    assert resolve_image_path(root, "{item_id}.jpg", "link")[0] is None  # symlink out of root
    assert resolve_image_path(root, "/etc/{item_id}", "passwd")[0] is None


def test_decode_catalogue_statuses_and_cache(tmp_path):
    good = tmp_path / "g.png"
    good.write_bytes(_encode(_rgb(), "PNG"))
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff broken")
    sources = [good, bad, tmp_path / "absent.jpg", None, _encode(_rgb(), "JPEG")]
    errors = ["", "", "", "unsafe: item id '../x'", ""]
    imgs, status, err = decode_catalogue(sources, S, tmp_path / "cache", workers=2, errors=errors)
    assert status == ["ok", "unreadable", "missing", "unreadable", "ok"]
    assert imgs.shape == (5, 3, S, S) and imgs[1:4].max() == 0 and imgs[0].max() > 0
    cached = list((tmp_path / "cache").glob("images-*.npy"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    imgs2, status2, _ = decode_catalogue(sources, S, tmp_path / "cache", errors=errors)
    assert status2 == status and np.array_equal(imgs, imgs2) and cached[0].stat().st_mtime_ns == mtime
    # editing a file invalidates the key
    good.write_bytes(_encode(_rgb(colour=(1, 2, 3)), "PNG"))
    imgs3, _, _ = decode_catalogue(sources, S, tmp_path / "cache", errors=errors)
    assert imgs3[0].max() < 10 and len(list((tmp_path / "cache").glob("images-*.npy"))) == 2


def test_error_text_is_the_same_in_every_process(tmp_path):
    """PIL's message names the BytesIO object with its address; a resumed screening job
    must still write the same error text as an uninterrupted one."""
    import subprocess
    import sys

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all\n")
    code = ("import sys; from vars_fast.data.images import decode_image; "
            "print(decode_image(sys.argv[1], 16)[2])")
    runs = {subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)}
    (msg,) = runs
    assert "cannot identify image file" in msg and "0x" not in msg
