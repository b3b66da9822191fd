"""The embedded default data set: synthetic product images and visually driven users.

No downloads. Every item has attributes a pretrained CNN can see -- a category drawn as a
distinct silhouette (t-shirt, trousers, dress, shoe, bag, hat, watch, sunglasses), a colour
(hue / saturation / value), a pattern (solid, stripes, dots, checks, gradient), pixel noise
texture, a tinted background and a small position / scale jitter. Attributes come from a
counter-based hash of ``(seed, item, field)``, so they are vectorised over any set of items,
and ``render(i)`` draws item ``i`` alone (1M items can be rendered lazily, in any order).

Users have a latent taste over the visual attributes (a few styles, each a category in a
colour, and a preferred pattern) and a popularity component; interactions are sampled without
replacement with probability ∝ exp(β·affinity) × popularity^w (Gumbel top-k), where item
popularity is long-tailed. Many tail items therefore have few interactions and can only be
ranked well from what they look like: the visual signal VBPR exploits.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from vars_fast.io import atomic_write_bytes

CATEGORY_NAMES = ["t-shirt", "trousers", "dress", "shoe", "bag", "hat", "watch", "sunglasses"]
PATTERN_NAMES = ["solid", "stripes", "dots", "checks", "gradient"]
N_HUE_BINS = 8  # hues are drawn around 8 centres so that "colour taste" is a discrete-ish attribute
GENERATOR_VERSION = 2  # bump when the images or the user model change (invalidates caches)
# Rendering styles. "classic" is the catalogue above. "geometric" draws the same attributes
# with another shape set (disc, square, triangle, ring, cross, diamond, star, crescent), a
# palette whose hue centres sit half a bin away from classic's, and a dark background: a second
# catalogue for transfer checks whose users keep the same kind of (category, colour) taste.
STYLES = ("classic", "geometric")

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, idx: np.ndarray, n_fields: int) -> np.ndarray:
    """Deterministic U[0,1) [M, n_fields] for each (seed, item, field), order independent."""
    f = np.arange(n_fields, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        x = (np.asarray(idx, dtype=np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
             + f * np.uint64(0xD1B54A32D192ED03) + np.uint64((seed * 1_000_003 + 1) & 0xFFFFFFFFFFFFFFFF))
    return (_mix(_mix(x)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def item_attributes(seed: int, idx: np.ndarray, n_categories: int = 8) -> dict[str, np.ndarray]:
    """Attributes of items ``idx`` (int array [M]); each value is an array [M]."""
    r = _uniform(seed, np.asarray(idx, dtype=np.int64), 16)
    u = lambda f: r[:, f]  # noqa: E731
    hue_bin = np.minimum((u(1) * N_HUE_BINS).astype(np.int64), N_HUE_BINS - 1)
    return {
        "category": np.minimum((u(0) * n_categories).astype(np.int64), n_categories - 1),
        "hue_bin": hue_bin,
        "hue": (hue_bin + 0.5 + (u(2) - 0.5) * 0.5) / N_HUE_BINS % 1.0,
        "saturation": 0.55 + 0.45 * u(3),
        "value": 0.45 + 0.5 * u(4),
        "pattern": np.minimum((u(5) * len(PATTERN_NAMES)).astype(np.int64), len(PATTERN_NAMES) - 1),
        "pattern_freq": 3.0 + 5.0 * u(6),
        "pattern_angle": np.pi * u(7),
        "bg_hue": u(8),
        "bg_value": 0.8 + 0.2 * u(9),
        "dx": (u(10) - 0.5) * 0.2,
        "dy": (u(11) - 0.5) * 0.2,
        "scale": 0.85 + 0.25 * u(12),
        "noise": 0.01 + 0.05 * u(13),
        # long-tailed popularity: lognormal via Box-Muller on two uniforms
        "popularity": np.exp(np.sqrt(-2 * np.log1p(-u(14))) * np.cos(2 * np.pi * u(15))),
    }


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs broadcast, output [..., 3] in [0,1]."""
    h = np.asarray(h) * 6.0
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None]) % 6.0
    return np.asarray(v)[..., None] - (np.asarray(v) * np.asarray(s))[..., None] * np.clip(
        np.minimum(k, 4.0 - k), 0.0, 1.0)


def _shape_mask(cat: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Silhouette of a category in object coordinates u (right), v (down), both ~[-1, 1].

    Returns (mask, detail): detail marks a darker secondary part (sole, strap, lenses...).
    """
    c = cat % len(CATEGORY_NAMES)
    if cat >= len(CATEGORY_NAMES):  # more categories than shapes: stretched variants
        u = u * (1.0 + 0.25 * (cat // len(CATEGORY_NAMES)))
    z = np.zeros_like(u, dtype=bool)
    if c == 0:  # t-shirt: body, slanted sleeves, neck cut-out
        body = (np.abs(u) < 0.45) & (v > -0.6) & (v < 0.8)
        sleeves = (v > -0.6) & (v < -0.15 + 0.5 * (np.abs(u) - 0.45)) & (np.abs(u) < 0.85)
        neck = u ** 2 + (v + 0.62) ** 2 < 0.18 ** 2
        return (body | sleeves) & ~neck, z
    if c == 1:  # trousers: waistband + two legs with a gap
        band = (np.abs(u) < 0.45) & (v > -0.85) & (v < -0.65)
        legs = (v >= -0.65) & (v < 0.9) & (np.abs(u) < 0.45 + 0.05 * (v + 0.65)) & (
            np.abs(u) > 0.04 + 0.06 * (v + 0.65))
        return band | legs, band
    if c == 2:  # dress: narrow top, flared skirt, straps
        hw = np.where(v < -0.1, 0.25, 0.25 + 0.45 * (v + 0.1))
        body = (v > -0.55) & (v < 0.85) & (np.abs(u) < hw)
        straps = (v > -0.85) & (v <= -0.55) & (np.abs(np.abs(u) - 0.18) < 0.04)
        return body | straps, (v > -0.2) & (v < -0.1) & body
    if c == 3:  # shoe: sole, foot body, raised heel collar
        sole = (np.abs(u) < 0.85) & (v > 0.35) & (v < 0.5)
        foot = ((u / 0.85) ** 2 + ((v - 0.35) / 0.45) ** 2 < 1) & (v <= 0.35)
        collar = (u < -0.1) & (u > -0.75) & (v > -0.35) & (v <= 0.35)
        return sole | foot | collar, sole
    if c == 4:  # bag: body + handle ring
        body = (np.abs(u) < 0.6) & (v > -0.15) & (v < 0.7)
        r = np.sqrt(u ** 2 + (v + 0.15) ** 2)
        handle = (r > 0.3) & (r < 0.4) & (v < -0.15)
        return body | handle, handle
    if c == 5:  # hat: dome + wide brim
        dome = (u ** 2 + (v - 0.2) ** 2 < 0.5 ** 2) & (v < 0.2)
        brim = (u / 0.9) ** 2 + ((v - 0.22) / 0.1) ** 2 < 1
        band = dome & (v > 0.05)
        return dome | brim, band
    if c == 6:  # watch: round face + vertical strap
        face = u ** 2 + v ** 2 < 0.38 ** 2
        strap = (np.abs(u) < 0.2) & (np.abs(v) < 0.95)
        dial = (u ** 2 + v ** 2 < 0.3 ** 2)
        return face | strap, strap & ~face | ~dial & face
    # sunglasses: two lenses, bridge, arms
    lenses = ((np.abs(u) - 0.42) / 0.32) ** 2 + (v / 0.26) ** 2 < 1
    bridge = (np.abs(u) < 0.12) & (np.abs(v + 0.12) < 0.04)
    arms = (np.abs(u) > 0.7) & (np.abs(u) < 0.95) & (np.abs(v + 0.15) < 0.035)
    return lenses | bridge | arms, lenses


def _geometric_mask(cat: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The "geometric" style's silhouette of a category (same contract as :func:`_shape_mask`)."""
    c = cat % 8
    if cat >= 8:
        u = u * (1.0 + 0.25 * (cat // 8))
    r, a = np.sqrt(u ** 2 + v ** 2), np.arctan2(v, u)
    rim = lambda m, inner: m & ~inner  # noqa: E731
    if c == 0:  # disc with a darker core
        return r < 0.7, r < 0.25
    if c == 1:  # square with a darker frame
        m = (np.abs(u) < 0.65) & (np.abs(v) < 0.65)
        return m, rim(m, (np.abs(u) < 0.5) & (np.abs(v) < 0.5))
    if c == 2:  # upward triangle with a darker base
        m = (v < 0.6) & (v > -0.7) & (np.abs(u) < 0.75 * (v + 0.7) / 1.3)
        return m, m & (v > 0.45)
    if c == 3:  # ring
        return (r > 0.4) & (r < 0.75), (r > 0.4) & (r < 0.5)
    if c == 4:  # cross with a darker centre
        m = ((np.abs(u) < 0.22) & (np.abs(v) < 0.8)) | ((np.abs(v) < 0.22) & (np.abs(u) < 0.8))
        return m, (np.abs(u) < 0.22) & (np.abs(v) < 0.22)
    if c == 5:  # diamond with a darker lower half
        m = np.abs(u) + np.abs(v) < 0.8
        return m, m & (v > 0.2)
    if c == 6:  # five-pointed star
        return r < 0.35 + 0.4 * np.maximum(np.cos(5 * (a + np.pi / 2)), 0) ** 2, r < 0.2
    m = (r < 0.7) & (np.sqrt((u - 0.3) ** 2 + (v + 0.15) ** 2) > 0.55)  # crescent
    return m, m & (u < -0.45)


def _pattern(p: int, u: np.ndarray, v: np.ndarray, freq: float, angle: float) -> np.ndarray:
    """Pattern value in [0,1] (1 = primary colour, 0 = secondary) at object coordinates."""
    if p == 0:
        return np.ones_like(u)
    ru = u * np.cos(angle) + v * np.sin(angle)
    rv = -u * np.sin(angle) + v * np.cos(angle)
    if p == 1:  # stripes
        return (np.sin(ru * freq * np.pi) > 0).astype(np.float32)
    if p == 2:  # dots on a grid
        gu = (ru * freq / 2) % 1.0 - 0.5
        gv = (rv * freq / 2) % 1.0 - 0.5
        return (gu ** 2 + gv ** 2 > 0.25 ** 2).astype(np.float32)
    if p == 3:  # checks
        return ((np.floor(ru * freq / 2) + np.floor(rv * freq / 2)) % 2 == 0).astype(np.float32)
    return np.clip(0.5 + 0.5 * ru, 0.0, 1.0)  # gradient


class SyntheticCatalogue:
    """A deterministic, lazily rendered catalogue of ``n_items`` product images.

    ``render(i)`` -> uint8 [3, S, S]; ``render_many(idx)`` -> uint8 [M, 3, S, S];
    ``attributes`` holds the per-item attribute arrays (see :func:`item_attributes`) when
    ``n_items`` is given (they are cheap: ~40 bytes per item).
    """

    def __init__(self, seed: int = 0, size: int = 64, n_categories: int = 8, n_items: int | None = None,
                 supersample: int = 2, style: str = "classic"):
        if style not in STYLES:
            raise ValueError(f"synthetic style {style!r}: expected one of {', '.join(STYLES)}")
        self.seed, self.size, self.n_categories, self.style = int(seed), int(size), int(n_categories), style
        self.supersample = supersample  # silhouette coverage from a 2x grid: anti-aliased edges
        self.n_items = n_items
        self.attributes = item_attributes(seed, np.arange(n_items), n_categories) if n_items else None
        self._grid_hi = self._grid(self.size * supersample)
        self._grid_lo = self._grid(self.size)

    @staticmethod
    def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
        lin = ((np.arange(s) + 0.5) / s * 2.0 - 1.0).astype(np.float32)
        yy, xx = np.meshgrid(lin, lin, indexing="ij")
        return xx, yy

    def render(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 [3, S, S]; depends only on (seed, i, size, n_categories, style)."""
        a = {k: v[0].item() for k, v in item_attributes(self.seed, np.array([i]), self.n_categories).items()}
        geometric = self.style == "geometric"
        if geometric:  # hue centres half a bin over, dark tinted background (see STYLES)
            a["hue"] = (a["hue"] + 0.5 / N_HUE_BINS) % 1.0
            a["bg_value"] = a["bg_value"] - 0.55
        rng = np.random.default_rng([self.seed, int(i), 7])
        s, k = self.size, self.supersample
        # coverage of the silhouette (and its darker detail part) from the fine grid
        xx, yy = self._grid_hi
        mask, detail = (_geometric_mask if geometric else _shape_mask)(
            int(a["category"]), (xx - a["dx"]) / a["scale"], (yy - a["dy"]) / a["scale"])
        alpha = mask.reshape(s, k, s, k).mean(axis=(1, 3), dtype=np.float32)[..., None]
        dark = detail.reshape(s, k, s, k).mean(axis=(1, 3), dtype=np.float32)[..., None]
        xx, yy = self._grid_lo
        u, v = (xx - a["dx"]) / a["scale"], (yy - a["dy"]) / a["scale"]
        # background: pale, low-saturation tint with a soft vertical gradient (per row)
        bg_sat = 0.35 if geometric else 0.12
        rows = _hsv_to_rgb(a["bg_hue"], bg_sat, a["bg_value"] - 0.1 * (yy[:, :1] + 1) / 2)  # [S,1,3]
        primary = _hsv_to_rgb(a["hue"], a["saturation"], a["value"]).astype(np.float32)
        # secondary pattern colour: same hue, lighter and less saturated, so hue taste stays legible
        secondary = _hsv_to_rgb(a["hue"], a["saturation"] * 0.35, min(1.0, a["value"] * 0.45 + 0.5)).astype(np.float32)
        pat = _pattern(int(a["pattern"]), u, v, float(a["pattern_freq"]), float(a["pattern_angle"]))[..., None]
        obj = secondary + pat * (primary - secondary)
        # darker detail parts (sole, strap, band) and a soft light falloff towards bottom-right
        obj = obj * (1.0 - 0.45 * dark) * (1.0 - 0.06 * np.clip(u + v, 0, 2)[..., None])
        img = rows.astype(np.float32) + alpha * (obj - rows.astype(np.float32))
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(a["noise"])
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1).copy()

    def render_many(self, idx, progress=None) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), 3, self.size, self.size), dtype=np.uint8)
        it = range(len(idx)) if progress is None else progress(range(len(idx)))
        for k in it:
            out[k] = self.render(int(idx[k]))
        return out


def sample_interactions(seed: int, n_users: int, attrs: dict[str, np.ndarray], n_categories: int,
                        interactions_per_user: float, min_interactions: int,
                        popularity_weight: float, taste_strength: float = 4.0,
                        popularity_sigma: float = 0.7, n_styles: int = 2, chunk: int = 2048) -> np.ndarray:
    """(user, item) pairs [P, 2] int64, each user's items distinct, sorted by user.

    Each user has ``n_styles`` styles, a (category, hue) pair with weights 1.0, 0.8, ..., and a
    pattern preference. affinity(u, i) = max_k w_k · [c_i = c_k] · (0.4 + 0.6 · exp(-d_hue²))
    + 0.5 · pattern_pref[u, p_i], with d_hue the circular distance in hue bins. Then
    P(i | u) ∝ exp(taste_strength · affinity) × popularity_i^(2 · popularity_weight · sigma),
    sampled without replacement by Gumbel top-k; the number per user is Poisson(mean),
    clipped to [min_interactions, n_items - 1].

    The taste is conjunctive (category AND colour): it leaves few matching items per style, too
    few co-occurrences for ID factors, but plain to a CNN, so visual models have something to
    gain; an additive taste is learnt by BPR from IDs alone (docs/results/defaults.md).
    """
    rng = np.random.default_rng([seed, 11])
    n_items = len(attrs["category"])
    st_cat = rng.integers(0, n_categories, size=(n_users, n_styles))
    st_hue = rng.integers(0, N_HUE_BINS, size=(n_users, n_styles))
    st_w = 1.0 - 0.2 * np.arange(n_styles)
    pat_pref = rng.random((n_users, len(PATTERN_NAMES))) ** 2 * 0.5
    counts = np.clip(rng.poisson(interactions_per_user, size=n_users), min_interactions, n_items - 1)
    # popularity is lognormal(0, 1) per item; sigma sets how long the tail is
    log_pop = np.log(attrs["popularity"]) * (2.0 * popularity_weight * popularity_sigma)
    pairs = []
    chunk = max(1, min(chunk, (1 << 24) // max(1, n_items)))  # bound the [chunk, n_items] logits
    for s in range(0, n_users, chunk):
        e = min(n_users, s + chunk)
        aff = np.zeros((e - s, n_items))
        for k in range(n_styles):
            same = st_cat[s:e, k][:, None] == attrs["category"][None, :]
            dh = np.abs(st_hue[s:e, k][:, None] - attrs["hue_bin"][None, :])
            dh = np.minimum(dh, N_HUE_BINS - dh)
            aff = np.maximum(aff, st_w[k] * same * (0.4 + 0.6 * np.exp(-(dh ** 2))))
        logits = taste_strength * (aff + 0.5 * pat_pref[s:e][:, attrs["pattern"]]) + log_pop[None, :]
        logits = logits + rng.gumbel(size=logits.shape)
        order = np.argsort(-logits, axis=1)
        for r in range(e - s):
            items = np.sort(order[r, : counts[s + r]])
            pairs.append(np.stack([np.full(len(items), s + r), items], 1))
    return np.concatenate(pairs).astype(np.int64)


def write_image_folder(root: str | Path, n: int, size: int = 64, seed: int = 0, fmt: str = "jpg",
                       n_categories: int = 8, start: int = 0) -> list[Path]:
    """Write items ``start .. start+n-1`` as ``<root>/<item_id>.<ext>`` one at a time (streaming).

    ``fmt``: jpg | png | mixed (alternates jpg / png). Item ids are ``item{i:07d}``.
    Returns the written paths.
    """
    from PIL import Image

    gen = SyntheticCatalogue(seed=seed, size=size, n_categories=n_categories)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        ext = fmt if fmt != "mixed" else ("jpg" if i % 2 == 0 else "png")
        buf = io.BytesIO()
        Image.fromarray(gen.render(i).transpose(1, 2, 0)).save(buf, format="JPEG" if ext == "jpg" else "PNG",
                                                               **({"quality": 90} if ext == "jpg" else {}))
        p = root / f"item{i:07d}.{ext}"
        atomic_write_bytes(p, buf.getvalue())
        paths.append(p)
    return paths


def write_tar_shards(root: str | Path, n: int, per_shard: int = 1000, size: int = 64, seed: int = 0,
                     n_categories: int = 8) -> list[Path]:
    """WebDataset-style shards ``<root>/shard-000000.tar`` with ``<key>.jpg`` members, streamed.

    Keys are ``item{i:07d}``; each shard is written to a temp name and renamed when complete.
    """
    from PIL import Image

    gen = SyntheticCatalogue(seed=seed, size=size, n_categories=n_categories)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = root / f"shard-{s:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(gen.render(i).transpose(1, 2, 0)).save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"item{i:07d}.jpg")
                info.size = buf.tell()
                info.mtime = 0  # deterministic archives
                buf.seek(0)
                tar.addfile(info, buf)
        tmp.replace(path)
        shards.append(path)
    return shards
