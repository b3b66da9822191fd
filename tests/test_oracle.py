"""The evaluation-aware (oracle) attacker: its triples, its per-user images, its invariants."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("VARS_FAST_PROGRESS", "0")

from test_attacks import setup  # noqa: E402,F401 - the tiny recommender and catalogue fixture

from vars_fast.attacks.oracle import (attack_eval_lists, encode_lists, eval_lists, eval_triples,  # noqa: E402
                                      list_loss, list_ranking, list_scores, oracle_users)
from vars_fast.config import AttackConfig  # noqa: E402


def test_triples_are_exactly_each_users_evaluation_list(setup):
    _, cat = setup
    users = oracle_users(cat, 5, torch.Generator().manual_seed(0))
    assert users.numel() == 5 and torch.equal(users, users.sort().values)
    trip = eval_triples(cat, users)
    C = cat.negatives.shape[1]
    assert trip.shape == (5, C, 3)
    for r, u in enumerate(users.tolist()):
        assert (trip[r, :, 0] == u).all()
        assert (trip[r, :, 1] == cat.test[u]).all()
        assert torch.equal(trip[r, :, 2], cat.negatives[u])
    lists = eval_lists(cat, users)
    assert torch.equal(lists[:, 0], cat.test[users]) and torch.equal(lists[:, 1:], cat.negatives[users])
    # seeded and stable; n <= 0 means every user with a test item
    assert torch.equal(users, oracle_users(cat, 5, torch.Generator().manual_seed(0)))
    assert oracle_users(cat, 0, torch.Generator()).numel() == int((cat.test >= 0).sum())


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_images_are_per_user_and_in_the_ball(setup, method):
    rec, cat = setup
    users = oracle_users(cat, 4, torch.Generator().manual_seed(1))
    cfg = AttackConfig(pgd_steps=3, batch_size=6, fast_encoder=False)
    run = lambda bs, seed=0: attack_eval_lists(rec, cat, users, method, 8, cfg,  # noqa: E731
                                               torch.Generator().manual_seed(seed), progress=False, batch_images=bs)
    adv = run(6)
    L = 1 + cat.negatives.shape[1]
    assert adv.shape == (4, L) + tuple(cat.images.shape[1:]) and adv.dtype == torch.uint8
    clean = cat.images[eval_lists(cat, users)]
    assert (adv.int() - clean.int()).abs().max() <= 8
    # batches of whole lists: the batch size does not change the result
    assert torch.equal(adv, run(3 * L))
    # the same item gets different images for different users when it is in both lists
    lists = eval_lists(cat, users)
    shared = [(a, b, int(i)) for a in range(4) for b in range(a + 1, 4)
              for i in set(lists[a].tolist()) & set(lists[b].tolist())]
    assert shared, "fixture: the lists share no item"
    differs = [not torch.equal(adv[a][lists[a] == i][0], adv[b][lists[b] == i][0]) for a, b, i in shared]
    assert any(differs)
    # every user's BPR loss over its evaluation triples went up
    feats = encode_lists(rec.encode, adv, 16, "cpu")
    s_adv, s_clean = list_scores(rec, users, lists, feats), list_scores(rec, users, lists)
    loss = lambda s: torch.nn.functional.softplus(-(s[:, :1] - s[:, 1:])).mean(1)  # noqa: E731
    assert (loss(s_adv) > loss(s_clean)).all()
    m_adv, m_clean = list_ranking(rec, cat, users, feats, (1, 3)), list_ranking(rec, cat, users, None, (1, 3))
    assert m_adv["HR@3"] <= m_clean["HR@3"]


def test_a_users_scores_use_only_that_users_images(setup):
    rec, cat = setup
    users = oracle_users(cat, 3, torch.Generator().manual_seed(2))
    lists = eval_lists(cat, users)
    adv = attack_eval_lists(rec, cat, users, "fgsm", 16, AttackConfig(fast_encoder=False),
                            torch.Generator().manual_seed(0), progress=False)
    feats = encode_lists(rec.encode, adv, 16, "cpu")
    base = list_scores(rec, users, lists, feats)
    other = feats.clone()
    other[1:] = torch.randn_like(other[1:]) * 10  # replace every other user's images
    got = list_scores(rec, users, lists, other)
    assert torch.equal(got[0], base[0]) and not torch.equal(got[1:], base[1:])
    # and user 0's scores are exactly its own images' scores
    own = rec.score(users[:1].expand(lists.shape[1]), lists[0], visual=rec.encode(adv[0].float() / 255))
    torch.testing.assert_close(base[0], own.float(), rtol=1e-5, atol=1e-5)


def test_list_loss_puts_the_user_loss_in_the_positive_slot(setup):
    rec, cat = setup
    users = oracle_users(cat, 2, torch.Generator().manual_seed(3))
    lists = eval_lists(cat, users)
    x = cat.item_batch(lists.reshape(-1))
    out = list_loss(rec, x, users, lists).view(lists.shape)
    assert (out[:, 1:] == 0).all() and (out[:, 0] > 0).all()
    s = list_scores(rec, users, lists)
    torch.testing.assert_close(out[:, 0], torch.nn.functional.softplus(-(s[:, :1] - s[:, 1:])).mean(1),
                               rtol=1e-5, atol=1e-6)
