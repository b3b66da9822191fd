"""The catalogue: interactions, the leave-one-out split, sampled negatives and item images.

``load_catalogue(cfg.data, cache_dir)`` is the one entry point. Sources (``data.source``):

* ``synthetic`` (default): the embedded generator of :mod:`vars_fast.data.synthetic`.
* ``generic``: an interactions CSV/TSV/Parquet + an image folder with a path template.
* ``amazon``: the Amazon review / metadata JSON lines of the paper, images on local disk.
* ``dvbpr_npy``: DVBPR's pickled ``.npy`` (images embedded as JPEG bytes).

The split (and the preprocessed ids) is cached in ``cache_dir`` as ``split-<hash>.npz``, the
decoded images as ``images-<hash>.npy``; both keys cover every input, so a re-run with the same
inputs reuses them and a changed input rebuilds them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vars_fast.config import ConfigError, DataConfig
from vars_fast.data.images import decode_catalogue, render_template, resolve_image_path, status_counts
from vars_fast.data.interactions import format_stats, leave_one_out, preprocess, split_stats
from vars_fast.data.synthetic import GENERATOR_VERSION, SyntheticCatalogue
from vars_fast.io import atomic_write_bytes
from vars_fast.registry import SOURCES
from vars_fast.utils import progress as pbar

__all__ = ["Catalogue", "load_catalogue"]


@dataclass
class Catalogue:
    """Everything the recommender, attack and defence stages need about the data.

    train [T, 2] int64 (user, item) positives; test [n_users] held-out item per user;
    negatives [n_users, n_negatives] never-interacted items; images uint8 [N, 3, S, S]
    (zeros where status != "ok"); status / item_ids length N; user_ids length n_users.
    """
    n_users: int
    n_items: int
    train: torch.Tensor
    test: torch.Tensor
    negatives: torch.Tensor
    images: torch.Tensor
    status: list
    item_ids: list
    user_ids: list
    item_category: Optional[torch.Tensor] = None
    category_names: Optional[list] = None
    meta: dict = field(default_factory=dict)
    _pos: Optional[list] = field(default=None, repr=False, init=False)
    _keys: Optional[torch.Tensor] = field(default=None, repr=False, init=False)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def user_pos(self) -> list[set[int]]:
        """Training positives per user (cached)."""
        if self._pos is None:
            pos: list[set[int]] = [set() for _ in range(self.n_users)]
            for u, i in self.train.tolist():
                pos[u].add(i)
            self._pos = pos
        return self._pos

    def _train_keys(self) -> torch.Tensor:
        if self._keys is None:
            self._keys = torch.sort(self.train[:, 0] * self.n_items + self.train[:, 1]).values
        return self._keys

    def is_train_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """bool, same shape as users/items: (u, i) is a training positive."""
        keys = self._train_keys()
        q = users.long() * self.n_items + items.long()
        pos = torch.searchsorted(keys, q).clamp_(max=len(keys) - 1)
        return keys[pos] == q

    def sample_triples(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[n, 3] int64 (u, i, j): (u, i) uniform over training pairs, j uniform over items
        that are not a training positive of u (vectorised rejection sampling)."""
        t = torch.randint(0, len(self.train), (n,), generator=generator)
        u, i = self.train[t, 0], self.train[t, 1]
        j = torch.randint(0, self.n_items, (n,), generator=generator)
        for _ in range(1000):
            bad = self.is_train_positive(u, j)
            nb = int(bad.sum())
            if nb == 0:
                return torch.stack([u, i, j], 1)
            j[bad] = torch.randint(0, self.n_items, (nb,), generator=generator)
        raise RuntimeError("sample_triples: could not find negatives (some user has every item as a positive)")

    def item_batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Images of items ``idx`` [B] as float [B, 3, S, S] in [0, 1] on ``device``
        (uint8 crosses the bus, the conversion happens on the device)."""
        x = self.images[torch.as_tensor(idx).long().cpu()]
        return x.to(device, non_blocking=True).float().div_(255.0)


# ---------------------------------------------------------------- loading

def _file_id(path: Optional[str]) -> str:
    if not path:
        return "-"
    p = Path(path).expanduser()
    try:
        st = p.stat()
        return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{p}:absent"


def _split_key(cfg: DataConfig) -> str:
    d = dataclasses.asdict(cfg)
    for k in ("cache_dir", "image_size", "images_root", "path_template"):  # do not change the split
        d.pop(k, None)
    d["_files"] = [_file_id(cfg.interactions), _file_id(cfg.metadata)]
    d["_version"] = [1, GENERATOR_VERSION]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _build_split(cfg: DataConfig) -> dict:
    """Load the source, preprocess and split; returns the arrays stored in the split cache."""
    raw = SOURCES[cfg.source](cfg)
    all_items, names = raw.all_items, raw.category_names
    user_ids, item_ids, pairs, stats = preprocess(raw, cfg.min_rating, cfg.min_interactions, all_items)
    n_u, n_i = len(user_ids), len(item_ids)
    train, test, negatives, replaced = leave_one_out(pairs, n_u, n_i, cfg.n_negatives, cfg.seed)
    if names is None and raw.item_category:
        names = sorted(set(raw.item_category.values()))
    if names is not None:
        lookup = {n: k for k, n in enumerate(names)}
        cat = np.array([lookup.get(raw.item_category.get(i), -1) for i in item_ids], dtype=np.int64)
    else:
        cat = np.full(n_i, -1, dtype=np.int64)
    stats.update(raw.meta)
    stats["negatives_with_replacement"] = bool(replaced)
    return {"train": train, "test": test, "negatives": negatives, "user_ids": np.array(user_ids, dtype=str),
            "item_ids": np.array(item_ids, dtype=str), "item_category": cat,
            "category_names": np.array(names or [], dtype=str), "stats": np.array(json.dumps(stats)),
            "_raw": raw}


def _load_split(cfg: DataConfig, cache_dir: Path, log) -> tuple[dict, bool]:
    path = cache_dir / f"split-{_split_key(cfg)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}, True
        except (OSError, ValueError, KeyError) as e:
            log(f"split cache {path} unreadable ({e}); rebuilding")
    d = _build_split(cfg)
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in d.items() if not k.startswith("_")})
    atomic_write_bytes(path, buf.getvalue())
    return d, False


def _image_sources(cfg: DataConfig, item_ids: list[str], raw) -> tuple[list, list[str]]:
    """Per item: bytes or a path inside images_root, or None with the reason."""
    if SOURCES.meta(cfg.source)["images"] == "embedded":
        return [raw.item_bytes.get(i) for i in item_ids], ["" if i in raw.item_bytes else "no imgs in the .npy"
                                                            for i in item_ids]
    if not cfg.images_root:
        raise ConfigError(f"data.images_root is not set (needed by data.source={cfg.source})")
    root = Path(cfg.images_root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.images_root: folder not found: {root}")
    try:
        render_template(cfg.path_template, "x")
    except ValueError as e:
        raise ConfigError(f"data.path_template: {e}") from None
    sources, errors = [], []
    for iid in item_ids:
        p, why = resolve_image_path(root, cfg.path_template, iid)
        sources.append(p)
        errors.append("unsafe: " + why if p is None else "")
    return sources, errors


def load_catalogue(cfg: DataConfig, cache_dir, progress: bool = True, workers: int = 0, log=None) -> Catalogue:
    """Load (or reuse from ``cache_dir``) the split and the decoded images of ``cfg.source``."""
    log = log or (lambda msg: None)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    split, reused = _load_split(cfg, cache_dir, log)
    t_split = time.perf_counter() - t0
    item_ids = split["item_ids"].tolist()
    n_items, size = len(item_ids), cfg.image_size
    bar = (lambda it, total=None: pbar(it, desc="images", total=total or len(it), enabled=progress, unit="img"))
    t0 = time.perf_counter()
    images_from = SOURCES.meta(cfg.source)["images"]
    if images_from == "generated":
        images, status = _synthetic_images(cfg, cache_dir, bar, item_ids)
    else:
        raw = split.get("_raw")
        if raw is None and images_from == "embedded":  # images live inside the interaction file
            raw = SOURCES[cfg.source](cfg)
        sources, errors = _image_sources(cfg, item_ids, raw)
        images, status, _ = decode_catalogue(sources, size, cache_dir, workers=workers, progress=bar,
                                             errors=errors)
    t_img = time.perf_counter() - t0
    cat = torch.from_numpy(split["item_category"].astype(np.int64))
    names = split["category_names"].tolist()
    n_users = len(split["user_ids"])
    train = torch.from_numpy(split["train"].astype(np.int64))
    counts = status_counts(status)
    meta = {"source": cfg.source, "split_key": _split_key(cfg), "n_users": n_users, "n_items": n_items, "n_train": int(len(train)),
            "n_interactions": int(len(train) + n_users), "density": (len(train) + n_users) / (n_users * n_items),
            "n_negatives": int(split["negatives"].shape[1]), "image_size": size, "status_counts": counts,
            "items_without_train": int(n_items - len(np.unique(split["train"][:, 1]))),
            "split_cached": bool(reused), "seconds_split": round(t_split, 3), "seconds_images": round(t_img, 3),
            **json.loads(str(split["stats"]))}
    meta["regime"] = split_stats(split["train"], split["test"], n_users, n_items)
    log(f"catalogue: {format_stats(meta['regime'])}; images {counts}")
    return Catalogue(n_users=n_users, n_items=n_items, train=train,
                     test=torch.from_numpy(split["test"].astype(np.int64)),
                     negatives=torch.from_numpy(split["negatives"].astype(np.int64)),
                     images=torch.from_numpy(images), status=list(status), item_ids=item_ids,
                     user_ids=split["user_ids"].tolist(),
                     item_category=cat if (cat >= 0).any() else None, category_names=names or None, meta=meta)


def _synthetic_images(cfg: DataConfig, cache_dir: Path, bar, item_ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Rendered images of ``item_ids`` (``i<index>``: every generated item, or the bought ones)."""
    idx = np.array([int(i[1:]) for i in item_ids], dtype=np.int64)
    subset = "" if len(idx) == cfg.n_items else "|" + hashlib.sha256(idx.tobytes()).hexdigest()[:16]
    key = hashlib.sha256(f"{GENERATOR_VERSION}|{cfg.seed}|{cfg.n_items}|{cfg.image_size}|{cfg.n_categories}{subset}"
                         .encode()).hexdigest()[:20]
    path = cache_dir / f"synthetic-{key}.npy"
    if path.is_file():
        try:
            arr = np.load(path)
            if arr.shape == (len(idx), 3, cfg.image_size, cfg.image_size):
                return arr, ["ok"] * len(idx)
        except (OSError, ValueError):
            pass
    gen = SyntheticCatalogue(cfg.seed, cfg.image_size, cfg.n_categories)
    arr = gen.render_many(idx, progress=bar)
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())
    return arr, ["ok"] * len(idx)
