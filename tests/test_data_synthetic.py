"""Synthetic catalogue: determinism, laziness, the split's invariants and cache reuse."""
from __future__ import annotations

import dataclasses
import tarfile

import numpy as np
import torch

from vars_fast.data import load_catalogue
from vars_fast.data.interactions import RawData, leave_one_out, preprocess
from vars_fast.data.synthetic import SyntheticCatalogue, item_attributes, write_image_folder, write_tar_shards


def test_render_is_deterministic_lazy_and_seeded():
    g = SyntheticCatalogue(seed=3, size=24)
    a = g.render(17)
    assert a.shape == (3, 24, 24) and a.dtype == np.uint8
    # rendering other items first, or in another instance, does not change item 17
    g2 = SyntheticCatalogue(seed=3, size=24)
    g2.render(5)
    np.testing.assert_array_equal(g2.render(17), a)
    np.testing.assert_array_equal(g.render_many([16, 17])[1], a)
    assert not np.array_equal(SyntheticCatalogue(seed=4, size=24).render(17), a)
    # a far item id renders without materialising anything before it
    assert g.render(999_999).shape == (3, 24, 24)


def test_images_carry_their_attributes():
    """Categories differ in silhouette: mean object masks of two categories are far apart."""
    g = SyntheticCatalogue(seed=0, size=32, n_items=200)
    imgs = g.render_many(np.arange(200)).astype(np.float32)
    cat = g.attributes["category"]
    assert len(np.unique(cat)) == 8 and len(np.unique(g.attributes["pattern"])) == 5
    # distance to background colour (corner pixel) approximates the object mask
    mask = (np.abs(imgs - imgs[:, :, :1, :1]).sum(1) > 60).astype(np.float32)
    means = np.stack([mask[cat == c].mean(0) for c in range(8)])
    d = np.abs(means[:, None] - means[None]).mean((2, 3))
    assert d[~np.eye(8, dtype=bool)].min() > 0.05


def test_attributes_vectorised_match_single():
    full = item_attributes(1, np.arange(50))
    one = item_attributes(1, np.array([37]))
    for k in full:
        assert full[k][37] == one[k][0]


def test_catalogue_deterministic_and_changes_with_seed(tiny_cfg, tmp_path):
    a = load_catalogue(tiny_cfg, tmp_path / "a", progress=False)
    b = load_catalogue(tiny_cfg, tmp_path / "b", progress=False)
    for k in ("train", "test", "negatives", "images"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    c = load_catalogue(dataclasses.replace(tiny_cfg, seed=1), tmp_path / "c", progress=False)
    assert not torch.equal(a.test, c.test) and not torch.equal(a.images, c.images)


def test_split_invariants(tiny_catalogue):
    cat = tiny_catalogue
    assert cat.images.shape == (80, 3, 32, 32) and cat.images.dtype == torch.uint8
    assert cat.n_items == 80 and cat.train.dtype == torch.int64
    assert cat.test.shape == (cat.n_users,) and cat.negatives.shape == (cat.n_users, 30)
    pos = cat.user_pos()
    for u in range(cat.n_users):
        t = int(cat.test[u])
        assert t not in pos[u], "the test item must not be a training positive"
        negs = set(cat.negatives[u].tolist())
        assert len(negs) == 30, "negatives are distinct"
        assert not (negs & pos[u]) and t not in negs, "negatives are never-interacted items"
        assert len(pos[u]) + 1 >= 5
    assert cat.meta["status_counts"]["ok"] == 80 and cat.item_category is not None
    assert cat.category_names[:2] == ["t-shirt", "trousers"]


def test_preprocess_drops_sparse_users_and_binarises():
    users = np.array(["a"] * 6 + ["b"] * 4 + ["c"] * 7)
    items = np.array([f"x{k}" for k in range(6)] + ["x0", "x1", "x2", "x3"] + [f"y{k}" for k in range(7)])
    ratings = np.array([5.0] * 6 + [5.0] * 4 + [5.0] * 4 + [1.0] * 3)
    uid, iid, pairs, stats = preprocess(RawData(users, items, ratings), min_rating=2.0, min_interactions=5)
    # b has 4 (< 5); c has 4 ratings > 2 (< 5): both dropped; items of dropped users disappear
    assert uid == ["a"] and iid == [f"x{k}" for k in range(6)]
    assert stats["users_dropped"] == 2 and pairs.tolist() == [[0, k] for k in range(6)]


def test_leave_one_out_is_seeded():
    rng = np.random.default_rng(0)
    pairs = np.array([[u, i] for u in range(20) for i in sorted(rng.choice(50, 6, replace=False))])
    a = leave_one_out(pairs, 20, 50, 10, seed=0)
    b = leave_one_out(pairs, 20, 50, 10, seed=0)
    c = leave_one_out(pairs, 20, 50, 10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert not np.array_equal(a[1], c[1])
    assert len(a[0]) == len(pairs) - 20


def test_sample_triples(tiny_catalogue):
    g = torch.Generator().manual_seed(0)
    tr = tiny_catalogue.sample_triples(5000, g)
    assert tr.shape == (5000, 3) and tr.dtype == torch.int64
    pos = tiny_catalogue.user_pos()
    assert all(i in pos[u] and j not in pos[u] for u, i, j in tr.tolist())
    assert torch.equal(tr, tiny_catalogue.sample_triples(5000, torch.Generator().manual_seed(0)))
    x = tiny_catalogue.item_batch(torch.tensor([0, 5]), "cpu")
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_split_cache_reused(tiny_cfg, tmp_path):
    a = load_catalogue(tiny_cfg, tmp_path, progress=False)
    assert not a.meta["split_cached"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.startswith("split-") for f in files) and any(f.startswith("synthetic-") for f in files)
    b = load_catalogue(tiny_cfg, tmp_path, progress=False)
    assert b.meta["split_cached"] and torch.equal(a.negatives, b.negatives)
    # a changed input gets its own cache entry
    load_catalogue(dataclasses.replace(tiny_cfg, n_negatives=10), tmp_path, progress=False)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("split-")]) == 2


def test_writers_stream_folders_and_shards(tmp_path):
    paths = write_image_folder(tmp_path / "imgs", 6, size=16, seed=0, fmt="mixed")
    assert [p.suffix for p in paths] == [".jpg", ".png"] * 3 and all(p.stat().st_size > 0 for p in paths)
    shards = write_tar_shards(tmp_path / "shards", 7, per_shard=3, size=16)
    assert len(shards) == 3
    with tarfile.open(shards[-1]) as t:
        assert t.getnames() == ["item0000006.jpg"]


def test_keep_unbought_false_keeps_only_bought_items_with_their_own_images(tiny_cfg, tmp_path):
    """A catalogue read from a purchase log holds only bought items; the synthetic source can do
    the same, and each kept item still shows its own generated image."""
    from vars_fast.data.interactions import split_stats

    full = load_catalogue(dataclasses.replace(tiny_cfg, n_items=400), tmp_path / "a", progress=False)
    cat = load_catalogue(dataclasses.replace(tiny_cfg, n_items=400, keep_unbought=False), tmp_path / "b",
                         progress=False)
    bought = set(full.train[:, 1].tolist()) | set(full.test.tolist())
    assert cat.n_items == len(bought) < full.n_items
    assert sorted(int(i[1:]) for i in cat.item_ids) == sorted(bought)
    for k in (0, cat.n_items // 2, cat.n_items - 1):
        j = full.item_ids.index(cat.item_ids[k])
        assert torch.equal(cat.images[k], full.images[j])
    s = split_stats(cat.train.numpy(), cat.test.numpy(), cat.n_users, cat.n_items)
    assert s["items"] == cat.n_items and s["train_purchases"] == len(cat.train)
    assert 0 <= s["test_cold"] <= s["test_le1"] <= 1 and cat.meta["regime"] == s
    # every item was bought at least once, in training or as someone's test item
    counts = np.bincount(cat.train[:, 1].numpy(), minlength=cat.n_items) + np.bincount(cat.test.numpy(),
                                                                                       minlength=cat.n_items)
    assert counts.min() >= 1
