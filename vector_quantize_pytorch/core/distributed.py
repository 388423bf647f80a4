"""The only module that touches ``torch.distributed``.

Whether to synchronise is decided when a function is called, never cached at construction: a model built
before ``init_process_group`` synchronises once the process group exists. Every function is a no-op in a
single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def should_sync(sync: bool | None) -> bool:
    """``sync=None`` means: synchronise whenever running distributed."""
    return is_distributed() if sync is None else (sync and is_distributed())


def all_reduce_sum_(t: Tensor, sync: bool | None = None) -> Tensor:
    """Sum ``t`` over ranks in place (contiguous copy if needed) and return it."""
    if not should_sync(sync):
        return t
    if not t.is_contiguous():
        t = t.contiguous()
    dist.all_reduce(t)
    return t


def broadcast_(t: Tensor, src: int = 0, sync: bool | None = None) -> Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s value."""
    if not should_sync(sync):
        return t
    if not t.is_contiguous():
        t = t.contiguous()
    dist.broadcast(t, src=src)
    return t


def all_gather_cat(t: Tensor, dim: int = 0, sync: bool | None = None) -> Tensor:
    """Concatenate equally shaped tensors of every rank along ``dim`` (rank order)."""
    if not should_sync(sync):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def shared_seed(seed: int | None = None, sync: bool | None = None) -> int:
    """A random seed that every rank agrees on (rank 0's draw). Costs one broadcast when distributed."""
    if seed is not None:
        return int(seed)
    value = torch.randint(0, 2**31 - 1, (1,))
    if should_sync(sync):
        value = broadcast_(value.to(_device()), sync=sync).cpu()
    return int(value.item())


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
