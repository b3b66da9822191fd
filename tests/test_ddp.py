"""Data parallelism (vars_fast.distributed.ddp): two gloo CPU processes on the same global
batches give the same parameters as one process, with the helpers the trainers use. The tests
that spawn two ranks are marked ``slow``: ``make test-all`` runs them, ``make test`` does not."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vars_fast.distributed import ddp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cat:
    """The two things train_bpr reads from a Catalogue: ``train`` and ``sample_triples``."""

    def __init__(self, n_users=30, n_items=40, n_train=128):
        g = torch.Generator().manual_seed(3)
        self.n_users, self.n_items = n_users, n_items
        self.train = torch.stack([torch.randint(0, n_users, (n_train,), generator=g),
                                  torch.randint(0, n_items, (n_train,), generator=g)], 1)

    def sample_triples(self, n, generator):
        rows = self.train[torch.randint(0, self.train.shape[0], (n,), generator=generator)]
        j = torch.randint(0, self.n_items, (n,), generator=generator)
        return torch.cat([rows, j[:, None]], 1)


def _train(kind: str) -> dict:
    """The same training on every rank; returns the final parameters."""
    if kind in ("mlp", "mlp_odd"):
        odd = kind == "mlp_odd"  # 63 rows: shards of 32 and 31, weighted by sync_grads(n_local=...)
        torch.manual_seed(100 + ddp.rank())  # ranks start different: broadcast_module must fix it
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        ddp.broadcast_module(model)
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(8):
            x = torch.randn(63 if odd else 64, 8, generator=g)  # the global batch, identical on every rank
            y = x.sum(1, keepdim=True).sin()
            xl, yl = ddp.shard(x), ddp.shard(y)
            loss = nn.functional.mse_loss(model(xl), yl)
            opt.zero_grad()
            loss.backward()
            ddp.sync_grads(model, n_local=xl.shape[0] if odd else None)
            assert ddp.global_batch_size(xl.shape[0]) == x.shape[0]
            opt.step()
            losses.append(float(ddp.all_reduce_mean(loss.detach())))
        ddp.barrier()
        return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "losses": torch.tensor(losses)}
    from vars_fast.recommenders.base import train_bpr
    from vars_fast.recommenders.vbpr import VBPR

    torch.manual_seed(0)
    cat = _Cat()
    model = VBPR(cat.n_users, cat.n_items, feature_dim=16, k=8, reg=1e-2 if kind == "vbpr" else 0.0)
    feats = torch.randn(cat.n_items, 16, generator=torch.Generator().manual_seed(5))
    model.set_item_visual(feats)
    model.fit_feature_norm(feats)
    train_bpr(model, cat, model.loss, epochs=2, lr=1e-2, lr_low=1e-3, lr_drop_frac=0.5, batch_size=32,
              generator=torch.Generator().manual_seed(0), show_progress=False)
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def _worker(rank: int, world: int, port: int, out: str, kind: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert ddp.init_from_env(torch.device("cpu"))
    assert ddp.world_size() == world and ddp.rank() == rank and ddp.is_main() == (rank == 0)
    try:
        res = _train(kind)
        torch.save(res, Path(out) / f"rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()  # no barrier: the peer may never reach it
        raise
    ddp.shutdown()  # what train.run does on a normal exit
    assert not dist.is_initialized() and not ddp.is_distributed()


def _spawn_two(worker, tmp_path: Path, *args) -> Path:
    """Run ``worker(rank, 2, port, out, *args)`` on two gloo ranks; returns ``out``.

    gloo's own C++ threads abort a rank now and then (SIGABRT, "terminate called without an
    active exception"; 2 launches in ~330 here, and once in CI, with the peer still alive).
    A rank killed by a signal is launched again, once, on a fresh port and folder; a Python
    exception or a wrong number in a rank still fails at once."""
    for attempt in range(2):
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        try:
            mp.spawn(worker, args=(2, _free_port(), str(out), *args), nprocs=2, join=True)
            return out
        except mp.ProcessExitedException as e:
            if attempt or e.signal_name is None:
                raise
            warnings.warn(f"gloo rank died by {e.signal_name}; launching the two ranks again")
    raise AssertionError("unreachable")


def _run_two(tmp_path: Path, kind: str) -> list[dict]:
    out = _spawn_two(_worker, tmp_path, kind)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_single_process_helpers_are_noops():
    x = torch.arange(10.0)
    assert not ddp.is_distributed() and ddp.world_size() == 1 and ddp.is_main()
    assert ddp.shard(x) is x and ddp.all_reduce_mean(x) is x
    assert not ddp.init_from_env()  # WORLD_SIZE unset: stays single-process
    ddp.shutdown()  # nothing to leave: a no-op


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["mlp", "mlp_odd"])
def test_two_gloo_ranks_match_one_process(tmp_path, kind):
    torch.set_num_threads(1)
    one = _train(kind)
    two = _run_two(tmp_path, kind)
    for k, v in one["params"].items():
        torch.testing.assert_close(two[0]["params"][k], two[1]["params"][k], rtol=0, atol=0)  # ranks in lockstep
        torch.testing.assert_close(two[0]["params"][k], v, rtol=1e-5, atol=1e-6)
    if kind == "mlp":  # equal shards: the mean of the per-rank mean losses is the global mean
        torch.testing.assert_close(two[0]["losses"], one["losses"], rtol=1e-5, atol=1e-6)


# NOTE: VBPR.reg divides the dense-weight penalty (E, beta') by the *global* batch size
# (ddp.global_batch_size): with the local size, W ranks would weigh it W times more.
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["vbpr_noreg", "vbpr"])
def test_vbpr_train_bpr_two_ranks_match_one(tmp_path, kind):
    torch.set_num_threads(1)
    one = _train(kind)
    two = _run_two(tmp_path, kind)
    for k, v in one["params"].items():
        torch.testing.assert_close(two[0]["params"][k], two[1]["params"][k], rtol=0, atol=0)
        torch.testing.assert_close(two[0]["params"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def _train_cli_worker(rank: int, world: int, port: int, out: str, caller_joins: bool) -> None:
    """``train.run`` as torchrun starts it: it joins the group from the environment and leaves
    it when done; a group its caller joined first stays for the caller to leave."""
    from vars_fast import train
    from vars_fast.config import make_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if caller_joins:
        assert ddp.init_from_env(torch.device("cpu"))
    cfg = make_config("quick", overrides={"data.n_users": 20, "data.n_items": 24, "run.stages": ["recommender"],
                                          "recommender.models": ["BPR"], "recommender.epochs": 2,
                                          "run.progress": False, "run.device": "cpu"})
    assert train.run(cfg, out) == 0
    assert dist.is_initialized() == caller_joins
    if caller_joins:
        ddp.shutdown()
    Path(out, f"done{rank}").touch()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("caller_joins", [False, True])
def test_train_run_under_two_ranks_leaves_the_group_it_joined(tmp_path, caller_joins):
    out = _spawn_two(_train_cli_worker, tmp_path, caller_joins)
    assert (out / "done0").is_file() and (out / "done1").is_file()
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
