"""Loaders on fixture files written here: generic CSV/TSV/Parquet, Amazon JSON(.gz), DVBPR .npy."""
from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vars_fast.config import ConfigError, DataConfig
from vars_fast.data import load_catalogue

S = 16
COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _interactions(n_users=8, n_items=12, per_user=6, seed=0):
    """Rows (user, item, rating): each user rates per_user distinct items; user 'sparse' has 3."""
    rng = np.random.default_rng(seed)
    rows = [(f"user{u}", f"A{i:03d}", float(rng.integers(1, 6)))
            for u in range(n_users) for i in rng.choice(n_items, per_user, replace=False)]
    rows += [("sparse", f"A{i:03d}", 5.0) for i in range(3)]
    return rows


def _image_folder(root, item_ids, template_dir=True):
    for k, iid in enumerate(item_ids):
        p = root / iid[:3] / f"{iid}.jpg" if template_dir else root / f"{iid}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_jpeg(COLOURS[k % 3]))


def _check(cat, n_users, kept_items):
    assert cat.n_users == n_users and "sparse" not in cat.user_ids
    assert cat.item_ids == sorted(kept_items)
    assert cat.images.shape == (len(kept_items), 3, S, S)
    pos = cat.user_pos()
    for u in range(cat.n_users):
        assert int(cat.test[u]) not in pos[u] and not set(cat.negatives[u].tolist()) & pos[u]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_generic_loader(tmp_path, fmt):
    rows = _interactions()
    path = tmp_path / f"inter.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"uid": [r[0] for r in rows], "iid": [r[1] for r in rows],
                                 "stars": [r[2] for r in rows]}), path)
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text(sep.join(["uid", "iid", "stars"]) + "\n" + "".join(
            f"{u}{sep}{i}{sep}{r}\n" for u, i, r in rows))
    items = sorted({r[1] for r in rows if r[0] != "sparse"})
    _image_folder(tmp_path / "img", items[:-1])  # the last item has no image file
    cfg = DataConfig(source="generic", interactions=str(path), images_root=str(tmp_path / "img"),
                     path_template="{item_id[:3]}/{item_id}.jpg", user_col="uid", item_col="iid",
                     rating_col="stars", min_rating=0.0, image_size=S, n_negatives=3)
    cat = load_catalogue(cfg, tmp_path / "cache", progress=False)
    _check(cat, 8, items)
    assert cat.status[-1] == "missing" and cat.status[:-1] == ["ok"] * (len(items) - 1)
    assert cat.meta["status_counts"] == {"ok": len(items) - 1, "missing": 1, "unreadable": 0,
                                         "too_large": 0, "too_small": 0}
    assert cat.images[0, 0].float().mean() > 200  # item 0 is red
    assert cat.images[-1].max() == 0


def test_generic_loader_rejects_escaping_ids(tmp_path):
    (tmp_path / "secret.jpg").write_bytes(_jpeg((9, 9, 9)))
    rows = [(f"u{u}", iid, 5) for u in range(3) for iid in ("good", "../secret", "a/b", f"x{u}", f"x{u + 1}")]
    path = tmp_path / "i.csv"
    path.write_text("user_id,item_id,r\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows))
    (tmp_path / "img").mkdir()
    for iid in ("good", "x0", "x1", "x2", "x3"):
        (tmp_path / "img" / f"{iid}.jpg").write_bytes(_jpeg((200, 200, 200)))
    cfg = DataConfig(source="generic", interactions=str(path), images_root=str(tmp_path / "img"),
                     image_size=S, n_negatives=1, min_interactions=5)
    cat = load_catalogue(cfg, tmp_path / "cache", progress=False)
    st = dict(zip(cat.item_ids, cat.status))
    assert st["../secret"] == "unreadable" and st["a/b"] == "unreadable" and st["good"] == "ok"
    assert cat.images[cat.item_ids.index("../secret")].max() == 0


def test_generic_loader_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.interactions"):
        load_catalogue(DataConfig(source="generic", interactions=str(tmp_path / "no.csv")), tmp_path)
    p = tmp_path / "i.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="user_col"):
        load_catalogue(DataConfig(source="generic", interactions=str(p), images_root=str(tmp_path)), tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_loader(tmp_path, gz):
    rows = _interactions()
    lines = []
    for k, (u, i, r) in enumerate(rows):
        rec = {"reviewerID": u, "asin": i, "overall": r, "reviewText": "ok"}
        lines.append(json.dumps(rec) if k % 2 else repr(rec))  # old dumps are Python dict literals
    lines.append("not json {")
    meta_lines = [repr({"asin": f"A{i:03d}", "categories": [["Clothing", "Men", "Shoes" if i % 2 else "Watches"]],
                        "imUrl": "http://example.invalid/x.jpg"}) for i in range(12)]
    opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    suffix = ".json.gz" if gz else ".json"
    with opener(tmp_path / f"reviews{suffix}") as f:
        f.write("\n".join(lines) + "\n")
    with opener(tmp_path / f"meta{suffix}") as f:
        f.write("\n".join(meta_lines) + "\n")
    # ratings <= 2 are negatives: compute which users keep >= 5 positives
    pos = {}
    for u, i, r in rows:
        if r > 2:
            pos.setdefault(u, set()).add(i)
    keep = {u for u, s in pos.items() if len(s) >= 5}
    items = sorted(set().union(*(pos[u] for u in keep)))
    _image_folder(tmp_path / "img", items, template_dir=False)
    cfg = DataConfig(source="amazon", interactions=str(tmp_path / f"reviews{suffix}"),
                     metadata=str(tmp_path / f"meta{suffix}"), images_root=str(tmp_path / "img"),
                     min_rating=2.0, image_size=S, n_negatives=2)
    cat = load_catalogue(cfg, tmp_path / "cache", progress=False)
    assert sorted(cat.user_ids) == sorted(keep) and cat.item_ids == items
    assert cat.meta["reviews_bad_lines"] == 1 and all(s == "ok" for s in cat.status)
    assert cat.category_names == ["Shoes", "Watches"]
    assert [cat.category_names[c] for c in cat.item_category.tolist()] == [
        "Shoes" if int(i[1:]) % 2 else "Watches" for i in items]


def test_dvbpr_npy_loader(tmp_path):
    n_items = 10
    item = [{b"imgs": _jpeg(COLOURS[i % 3]), b"c": b"Men"} for i in range(n_items)]
    item[4][b"imgs"] = b"garbage"
    rng = np.random.default_rng(0)
    user_train, user_val, user_test = {}, {}, {}
    for u in range(6):
        its = rng.choice(n_items, 7, replace=False)
        user_train[u] = [{b"productid": int(i), b"reviewerID": b"x"} for i in its[:5]]
        user_val[u] = [{b"productid": int(its[5])}]
        user_test[u] = [{b"productid": int(its[6])}]
    data = np.array([user_train, user_val, user_test, item, 6, n_items], dtype=object)
    np.save(tmp_path / "d.npy", data, allow_pickle=True)
    cfg = DataConfig(source="dvbpr_npy", interactions=str(tmp_path / "d.npy"), image_size=S, n_negatives=2)
    cat = load_catalogue(cfg, tmp_path / "cache", progress=False)
    assert cat.n_users == 6 and len(cat.train) == 6 * 7 - 6
    used = sorted({int(i) for d in (user_train, user_val, user_test) for v in d.values() for r in v
                   for i in [r[b"productid"]]})
    assert cat.item_ids == sorted(str(i) for i in used)
    k4 = cat.item_ids.index("4") if "4" in cat.item_ids else None
    for k, iid in enumerate(cat.item_ids):
        assert cat.status[k] == ("unreadable" if k == k4 else "ok")
    assert cat.category_names == ["Men"]
    # the cached split is reused and the images come back identical
    again = load_catalogue(cfg, tmp_path / "cache", progress=False)
    assert again.meta["split_cached"] and torch.equal(again.images, cat.images)
