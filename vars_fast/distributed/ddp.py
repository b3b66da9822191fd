"""Data parallelism for the training loops, under ``torchrun`` (gloo on CPU, NCCL on GPU).

The training loops call these helpers unconditionally; in a single process they are no-ops,
so one code path serves both. Each rank takes a strided shard of every *global* batch and
gradients are averaged across ranks before the optimiser step, so N ranks on a global batch
B compute the same update as one process on B (up to float summation order).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns True when joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    use_nccl = device is not None and device.type == "cuda"
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return True


def shard(x: Tensor) -> Tensor:
    """This rank's strided share of a global batch (dim 0)."""
    return x[rank()::world_size()] if is_distributed() else x


def sync_grads(module: nn.Module, n_local: int | None = None) -> None:
    """Average parameter gradients across ranks.

    Default: every rank weighs the same (exact when the shards are equal; ``shard`` makes them
    differ by at most one row). ``n_local`` (this rank's rows in the global batch) weighs each
    rank by its share instead, so the mean of per-rank mean losses becomes exactly the global
    mean for any batch size (one extra scalar all-reduce per step).
    """
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if n_local is None:
        scale = 1.0 / world_size()
    else:
        total = torch.tensor([float(n_local)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        for g in grads:
            g.mul_(float(n_local))
        scale = 1.0 / float(total.item())
    for g in grads:
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        g.mul_(scale)


def global_batch_size(n_local: int) -> int:
    """Rows of the global batch (sum of ``n_local`` over ranks); ``n_local`` in one process.
    For per-batch terms (e.g. a penalty on dense weights "once per batch") that a rank must
    divide by the global, not its local, batch size."""
    if not is_distributed():
        return int(n_local)
    t = torch.tensor([float(n_local)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def all_reduce_mean(x: Tensor) -> Tensor:
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group on a normal exit: every rank first waits for the others, so
    that no collective is still in flight on a peer when this rank closes its connections,
    then destroys the group, rather than leaving its teardown to interpreter exit."""
    if not is_distributed():
        return
    dist.barrier()
    dist.destroy_process_group()
