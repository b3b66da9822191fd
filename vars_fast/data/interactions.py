"""Interaction loaders (the embedded generator, generic table, Amazon reviews, DVBPR ``.npy``) and
the paper's split.

Preprocessing (as in the paper): ratings are binarised (``rating > min_rating`` is a positive),
duplicates are merged, users with fewer than ``min_interactions`` positives are dropped, users
and items are re-indexed to dense ids (sorted by their original id), one interaction per user
is held out for test (leave-one-out, seeded) and ``n_negatives`` items the user never
interacted with are sampled per user (seeded) and stored with the split.
"""
from __future__ import annotations

import ast
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from vars_fast.config import ConfigError
from vars_fast.data import synthetic as syn
from vars_fast.registry import SOURCES


@dataclass
class RawData:
    """What a loader returns: interactions by original id, plus item-level side information."""
    users: np.ndarray  # str [P]
    items: np.ndarray  # str [P]
    ratings: Optional[np.ndarray] = None  # float [P]; None: every row is a positive
    item_category: dict = field(default_factory=dict)  # item id -> category name
    item_bytes: dict = field(default_factory=dict)  # item id -> encoded image (DVBPR)
    meta: dict = field(default_factory=dict)
    # a source that knows its catalogue beyond the log: every item id (None: the logged items)
    # and the category names in index order (None: the sorted names of item_category)
    all_items: Optional[list] = None
    category_names: Optional[list] = None


# ---------------------------------------------------------------- preprocessing

def preprocess(raw: RawData, min_rating: float, min_interactions: int,
               all_items: Optional[Sequence[str]] = None) -> tuple[list[str], list[str], np.ndarray, dict]:
    """Binarise, deduplicate, drop sparse users, re-index densely.

    ``all_items``: keep exactly these items in this order (the synthetic catalogue, where
    never-interacted items exist and are part of the catalogue); otherwise the items are those
    left in the filtered interactions, sorted by id. Returns
    ``(user_ids, item_ids, pairs int64 [P, 2] sorted by (user, item), stats)``.
    """
    users = np.asarray(raw.users).astype(str)
    items = np.asarray(raw.items).astype(str)
    n_rows = len(users)
    keep = np.ones(n_rows, dtype=bool)
    if raw.ratings is not None:
        keep &= np.asarray(raw.ratings, dtype=np.float64) > min_rating
    users, items = users[keep], items[keep]
    if all_items is not None:
        item_ids = np.asarray(all_items).astype(str)
        order = np.argsort(item_ids, kind="stable")
        pos = np.searchsorted(item_ids[order], items)
        pos = np.minimum(pos, len(item_ids) - 1)
        known = item_ids[order][pos] == items
        users, items, item_idx = users[known], items[known], order[pos[known]]
    u_uniq, u_idx = np.unique(users, return_inverse=True)
    if all_items is None:
        i_uniq, item_idx = np.unique(items, return_inverse=True)
    pairs = np.unique(np.stack([u_idx, item_idx], 1).astype(np.int64), axis=0)  # dedup + sort
    counts = np.bincount(pairs[:, 0], minlength=len(u_uniq))
    good = counts >= min_interactions
    pairs = pairs[good[pairs[:, 0]]]
    new_u = np.cumsum(good) - 1
    pairs[:, 0] = new_u[pairs[:, 0]]
    user_ids = u_uniq[good].tolist()
    if all_items is None:
        used = np.zeros(len(i_uniq), dtype=bool)
        used[pairs[:, 1]] = True
        new_i = np.cumsum(used) - 1
        pairs[:, 1] = new_i[pairs[:, 1]]
        item_ids = i_uniq[used].tolist()
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    else:
        item_ids = item_ids.tolist()
    stats = {"rows_read": int(n_rows), "positives": int(keep.sum()), "users_dropped": int((~good).sum()),
             "interactions": int(len(pairs))}
    if not user_ids:
        raise ConfigError(f"no user has >= {min_interactions} positive interactions after binarising "
                          f"with rating > {min_rating} (data.min_interactions / data.min_rating)")
    return user_ids, item_ids, pairs, stats


def leave_one_out(pairs: np.ndarray, n_users: int, n_items: int, n_negatives: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Split pairs [P, 2] (sorted by user, every user present) into train [P-U, 2], test [U]
    and negatives [U, n_negatives] never interacted by the user (train or test).

    Negatives are distinct per user when the user has enough non-interacted items; otherwise
    they are drawn with replacement (the returned flag says so).
    """
    rng = np.random.default_rng([seed, 2024])
    counts = np.bincount(pairs[:, 0], minlength=n_users)
    if (counts < 2).any():
        raise ValueError("leave-one-out needs >= 2 interactions per user")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pick = offsets + (rng.random(n_users) * counts).astype(np.int64)
    test = pairs[pick, 1].copy()
    mask = np.ones(len(pairs), dtype=bool)
    mask[pick] = False
    train = pairs[mask]
    keys = np.sort(pairs[:, 0] * n_items + pairs[:, 1])
    negatives, replaced = _sample_negatives(rng, keys, counts, n_users, n_items, n_negatives)
    return train, test, negatives, replaced


def _is_member(sorted_keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_keys, q), len(sorted_keys) - 1)
    return sorted_keys[pos] == q


def _sample_negatives(rng, keys, counts, n_users, n_items, k) -> tuple[np.ndarray, bool]:
    """Vectorised rejection sampling of k distinct non-interacted items per user."""
    m = 2 * k + 16
    out = np.empty((n_users, k), dtype=np.int64)
    cand = rng.integers(0, n_items, size=(n_users, m))
    bad = _is_member(keys, np.arange(n_users)[:, None] * n_items + cand)
    # duplicates within a row: after a stable sort, equal neighbours are repeats
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, 1)
    dup_sorted = np.concatenate([np.zeros((n_users, 1), bool), srt[:, 1:] == srt[:, :-1]], 1)
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, 1)
    valid = ~bad & ~dup
    ok_rows = valid.sum(1) >= k
    rank = np.cumsum(valid, 1) - 1
    sel = valid & (rank < k)
    out[ok_rows] = cand[ok_rows][sel[ok_rows]].reshape(-1, k)
    replaced = False
    for u in np.flatnonzero(~ok_rows):  # rare: users with most of the catalogue, or tiny catalogues
        seen = keys[(keys >= u * n_items) & (keys < (u + 1) * n_items)] - u * n_items
        free = np.setdiff1d(np.arange(n_items), seen)
        if len(free) == 0:
            raise ValueError(f"user {u} interacted with every item: no negatives can be sampled")
        out[u] = rng.choice(free, size=k, replace=len(free) < k)
        replaced |= len(free) < k
    return out, replaced


# ---------------------------------------------------------------- file readers

def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rt", encoding="utf-8") if magic == b"\x1f\x8b" else open(path, encoding="utf-8")


def _json_lines(path: Path, meta: dict, tag: str) -> Iterator[dict]:
    """JSON objects from a JSON-lines file (optionally gzipped); the old Amazon dumps hold
    Python dict literals, which ``ast.literal_eval`` reads safely (no code runs)."""
    bad = 0
    with _open_text(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                try:
                    obj = ast.literal_eval(line)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    bad += 1
                    continue
            if isinstance(obj, dict):
                yield obj
            else:
                bad += 1
    meta[f"{tag}_bad_lines"] = bad


def _require_file(path: Optional[str], key: str) -> Path:
    if not path:
        raise ConfigError(f"{key} is not set (needed by this data.source)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {p}")
    return p


def load_synthetic(cfg) -> RawData:
    """The embedded generator's log (``vars_fast.data.synthetic``); with ``keep_unbought`` its catalogue is every generated
    item, else the items of the log (sorted by id: i<index> keeps index order)."""
    attrs = syn.item_attributes(cfg.seed, np.arange(cfg.n_items), cfg.n_categories)
    pairs = syn.sample_interactions(cfg.seed, cfg.n_users, attrs, cfg.n_categories, cfg.interactions_per_user,
                                    cfg.min_interactions, cfg.popularity_weight,
                                    taste_strength=cfg.taste_strength, popularity_sigma=cfg.popularity_sigma,
                                    n_styles=cfg.n_styles)
    item_ids = [f"i{i:07d}" for i in range(cfg.n_items)]
    names = [syn.CATEGORY_NAMES[k % 8] + (f"-{k // 8}" if k >= 8 else "") for k in range(cfg.n_categories)]
    return RawData(np.array([f"u{u:06d}" for u in pairs[:, 0]]), np.array(item_ids)[pairs[:, 1]],
                   item_category={iid: names[c] for iid, c in zip(item_ids, attrs["category"])},
                   all_items=item_ids if cfg.keep_unbought else None, category_names=names)


def load_generic(cfg) -> RawData:
    """Interactions table (CSV / TSV / Parquet) with columns cfg.user_col, cfg.item_col and
    optionally cfg.rating_col. Ids are read as strings (``007`` stays ``007``)."""
    import pyarrow as pa

    path = _require_file(cfg.interactions, "data.interactions")
    suffixes = [s.lower() for s in path.suffixes]
    cols = [c for c in (cfg.user_col, cfg.item_col, cfg.rating_col) if c]
    if ".parquet" in suffixes or ".pq" in suffixes:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        missing = [c for c in cols if c not in names]
        if missing:
            raise ConfigError(f"data.interactions {path}: column(s) {missing} not found (has {names}); "
                              "set data.user_col / data.item_col / data.rating_col")
        table = pq.read_table(path, columns=cols)
    else:
        import pyarrow.csv as pcsv

        sep = cfg.sep
        if sep is None:
            if ".tsv" in suffixes or ".tab" in suffixes:
                sep = "\t"
            elif ".csv" in suffixes:
                sep = ","
            else:
                raise ConfigError(f"data.interactions {path}: cannot tell the separator from the suffix; set data.sep")
        sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)
        types = {cfg.user_col: pa.string(), cfg.item_col: pa.string()}
        try:
            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=sep),
                                  convert_options=pcsv.ConvertOptions(column_types=types, include_columns=cols))
        except (pa.ArrowInvalid, KeyError) as e:
            raise ConfigError(f"data.interactions {path}: cannot read columns {cols} with sep={sep!r} ({e}); "
                              "check data.user_col / data.item_col / data.rating_col / data.sep") from None
    users = np.asarray(table.column(cfg.user_col).cast(pa.string()).to_pylist(), dtype=object)
    items = np.asarray(table.column(cfg.item_col).cast(pa.string()).to_pylist(), dtype=object)
    ok = np.array([u is not None and i is not None for u, i in zip(users, items)], dtype=bool)
    ratings = None
    if cfg.rating_col:
        r = table.column(cfg.rating_col).cast(pa.float64()).to_numpy(zero_copy_only=False)
        ok &= ~np.isnan(r)
        ratings = r[ok]
    return RawData(users[ok].astype(str), items[ok].astype(str), ratings,
                   meta={"rows_with_nulls": int((~ok).sum())})


def load_amazon(cfg) -> RawData:
    """Amazon review dumps (McAuley et al.): reviews JSON lines with ``reviewerID``, ``asin``,
    ``overall``; optional metadata JSON lines with ``asin`` and ``categories`` (old format:
    list of category paths) or ``category`` (new format: one path). Images come from
    ``images_root`` / ``path_template`` with ``{item_id}`` = asin. Lines that are neither JSON
    nor a Python dict literal are skipped and counted in meta."""
    path = _require_file(cfg.interactions, "data.interactions")
    meta: dict = {}
    users, items, ratings = [], [], []
    for r in _json_lines(path, meta, "reviews"):
        u, i = r.get("reviewerID"), r.get("asin")
        if u is None or i is None:
            meta["reviews_incomplete"] = meta.get("reviews_incomplete", 0) + 1
            continue
        users.append(str(u))
        items.append(str(i))
        try:
            ratings.append(float(r.get("overall", 5.0)))
        except (TypeError, ValueError):
            ratings.append(np.nan)
    cats: dict = {}
    if cfg.metadata:
        for m in _json_lines(_require_file(cfg.metadata, "data.metadata"), meta, "metadata"):
            asin = m.get("asin")
            c = m.get("categories") or m.get("category")
            if asin is None or not c:
                continue
            path_ = c[0] if isinstance(c[0], (list, tuple)) else c  # old: [[path], ...]; new: [path]
            if path_:
                cats[str(asin)] = str(path_[-1])  # the most specific level
    r = np.asarray(ratings, dtype=np.float64)
    return RawData(np.asarray(users), np.asarray(items), r, item_category=cats, meta=meta)


def _get(d, key: str):
    """DVBPR pickles come from Python 2: dict keys may be bytes."""
    if key in d:
        return d[key]
    return d.get(key.encode())


def load_dvbpr_npy(cfg) -> RawData:
    """DVBPR's data file (Kang et al. 2017): ``np.load(path, allow_pickle=True)`` of
    ``[user_train, user_validation, user_test, Item, usernum, itemnum]``; each user list holds
    dicts with ``productid``; ``Item[i]`` has ``imgs`` (JPEG bytes) and ``c`` (category).

    SECURITY: this format is a pickle. Loading it can run arbitrary code embedded in the file:
    only load files from a source you trust. The split inside the file is merged and redone
    with this package's leave-one-out so that every source is evaluated the same way.
    """
    path = _require_file(cfg.interactions, "data.interactions")
    try:
        obj = np.load(path, allow_pickle=True, encoding="bytes")
        user_train, user_val, user_test, item_table, usernum, itemnum = list(obj)[:6]
    except Exception as e:  # noqa: BLE001 -- any malformed file is a config error with the path
        raise ConfigError(f"data.interactions {path}: not a DVBPR .npy file "
                          f"([user_train, user_validation, user_test, Item, usernum, itemnum]): {e}") from None
    users, items = [], []
    for part in (user_train, user_val, user_test):
        keys = part.keys() if isinstance(part, dict) else range(len(part))
        for u in keys:
            for rec in part[u]:
                pid = _get(rec, "productid") if isinstance(rec, dict) else rec
                users.append(str(int(u)))
                items.append(str(int(pid)))
    item_bytes, cats = {}, {}
    n = int(itemnum)
    for i in range(n):
        try:
            it = item_table[i]
        except (KeyError, IndexError):
            continue
        img = _get(it, "imgs")
        if img is not None:
            item_bytes[str(i)] = bytes(img)
        c = _get(it, "c")
        if c is not None:
            c = c[0] if isinstance(c, (list, tuple)) and c else c
            cats[str(i)] = c.decode() if isinstance(c, bytes) else str(c)
    return RawData(np.asarray(users), np.asarray(items), None, item_category=cats, item_bytes=item_bytes,
                   meta={"dvbpr_usernum": int(usernum), "dvbpr_itemnum": n})


SOURCES.register("synthetic", load_synthetic, images="generated")
SOURCES.register("generic", load_generic, images="files")
SOURCES.register("amazon", load_amazon, images="files")
SOURCES.register("dvbpr_npy", load_dvbpr_npy, images="embedded")


# ---------------------------------------------------------------- statistics

def split_stats(train: np.ndarray, test: np.ndarray, n_users: int, n_items: int) -> dict:
    """The regime a recommender faces, from the split alone: size, density, training purchases
    per item (median, p90) and how many test items the training data knows.

    ``test_cold`` is the share of test items with no training purchase (only images can rank
    them), ``test_le1`` the share with at most one: on a real fashion log most test items are
    in one of the two, which is what decides whether collaborative terms can help at all."""
    per_item = np.bincount(np.asarray(train)[:, 1], minlength=n_items)
    test = np.asarray(test)
    test_counts = per_item[test[test >= 0]]
    n_inter = int(len(train) + (test >= 0).sum())
    return {"users": int(n_users), "items": int(n_items), "train_purchases": int(len(train)),
            "density": n_inter / max(1, n_users * n_items),
            "per_item_median": float(np.median(per_item)), "per_item_p90": float(np.percentile(per_item, 90)),
            "items_without_train": int((per_item == 0).sum()),
            "test_cold": float((test_counts == 0).mean()) if len(test_counts) else 0.0,
            "test_le1": float((test_counts <= 1).mean()) if len(test_counts) else 0.0}


def format_stats(s: dict) -> str:
    """One log line for ``split_stats``."""
    return (f"{s['users']} users, {s['items']} items, {s['train_purchases']} training purchases, density "
            f"{100 * s['density']:.2f}%, purchases per item median {s['per_item_median']:g} / p90 "
            f"{s['per_item_p90']:g}, test items cold in training {100 * s['test_cold']:.0f}% "
            f"(<= 1 purchase: {100 * s['test_le1']:.0f}%)")
