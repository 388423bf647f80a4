"""The only module that touches ``torch.distributed``.

Whether to synchronise is decided when a function is called, never cached at construction: a model built
before ``init_process_group`` synchronises once the process group exists. Every function is a no-op in a
single process (it returns its input unchanged), so single-process numbers do not depend on this module.

Random choices that must agree across ranks (k-means seeds, dead-code replacements) are made without any
host synchronisation: rank 0 draws a seed *tensor* that is broadcast (:func:`shared_seed_tensor`), and the
choice is a function of that seed and of each row's position in the concatenated global batch
(:func:`random_row_keys`), so every rank computes the same choice, and a single process fed the
concatenated batch with the same seed computes it too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# keys of rows that must never be chosen (masked out, not finite, padding): larger than any real key
INVALID_KEY = torch.iinfo(torch.int64).max
_MASK32 = 0xFFFFFFFF


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


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks. Every rank's output is the same sum, and each rank's loss depends on
    every rank's input, so the gradient of an input is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(t: Tensor, sync: bool | None = None) -> Tensor:
    """Out-of-place, differentiable sum over ranks (the backward all-reduces the gradient too)."""
    if not should_sync(sync):
        return t
    return _AllReduceSum.apply(t)


def mean_over_ranks(local_mean: Tensor, count: Tensor, sync: bool | None = None) -> Tensor:
    """The mean over the concatenated batch of all ranks, from each rank's mean over its ``count`` items.

    ``sum_r count_r * mean_r / sum_r count_r``, differentiable in ``local_mean``. With DistributedDataParallel
    (which averages gradients over ranks) a loss built on the result gets the gradient a single process
    computes on the concatenated batch. Ranks with ``count = 0`` contribute nothing; if every rank has
    ``count = 0`` the result is zero. A single process gets ``local_mean`` back unchanged.

    Shape:
        - local_mean: any; count: ``()``
    """
    if not should_sync(sync):
        return local_mean
    count = count.detach().to(local_mean.dtype)
    total = all_reduce_sum_(count.clone(), sync=sync)
    return all_reduce_sum(local_mean * count, sync=sync) / total.clamp(min=1)


def shared_seed(seed: int | None = None, sync: bool | None = None) -> int:
    """A random seed that every rank agrees on (rank 0's draw). Costs one broadcast when distributed and
    one host read (use :func:`shared_seed_tensor` in a forward pass)."""
    if seed is not None:
        return int(seed)
    return int(shared_seed_tensor(torch.device("cpu"), sync=sync).item())


def shared_seed_tensor(device: torch.device | str, sync: bool | None = None) -> Tensor:
    """A 0-dim int64 seed drawn from the default generator of ``device``, rank 0's draw on every rank.

    Each rank draws (so every rank's generator advances alike) and rank 0's value is broadcast. No host
    synchronisation: the value stays a tensor on ``device``.
    """
    value = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    if should_sync(sync):
        value = broadcast_(value.to(_device()), sync=sync).to(device)
    return value.reshape(())


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function (bijective on ``[0, 2^32)``), in int64 arithmetic without overflow."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & _MASK32
    return x ^ (x >> 16)


def random_row_keys(seed: Tensor, num_rows: int, num_codebooks: int, *, sync: bool | None = None) -> Tensor:
    """Distinct random int64 sort keys for this rank's rows, as positions in the concatenated global batch.

    Row ``i`` of rank ``r`` (each rank holding ``num_rows`` rows) is global row ``g = r * num_rows + i``; its
    key in codebook ``c`` is ``hash(seed, c, g) * 2^32 + g``. The low bits make keys distinct, so sorting them
    has no ties, and a single process holding the concatenated batch computes the same keys for the same
    rows. (If ranks hold different numbers of rows the keys stay consistent across ranks but two rows may
    share a key; ties then break by rank.)

    Shape:
        - seed: ``()`` int64
        - output: ``(num_codebooks, num_rows)`` int64 in ``[0, 2^63)``
    """
    device = seed.device
    offset = rank() * num_rows if should_sync(sync) else 0
    rows = torch.arange(num_rows, device=device, dtype=torch.int64) + offset
    books = torch.arange(num_codebooks, device=device, dtype=torch.int64).unsqueeze(-1)
    stream = hash32(hash32(seed) + books * 0x9E3779B9)  # one independent stream per codebook
    scrambled = hash32(hash32(rows) ^ stream)
    return ((scrambled >> 1) << 32) | (rows & _MASK32)


def select_by_key(keys: Tensor, rows: Tensor, count: int, sync: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The ``count`` rows with the smallest keys over every rank's rows, smallest first, on every rank.

    Each rank keeps its own ``count`` best candidates (padded with :data:`INVALID_KEY` when it has fewer rows);
    their keys are all-gathered and merged, and the chosen rows, each held by one rank, are summed over ranks
    with zeros elsewhere (an exact copy). The communication is ``world_size * count`` keys and one
    ``count x d`` all-reduce per codebook, whatever the batch size; collectives are made on every call, so
    a rank without a valid row still takes part.

    Shape:
        - keys: ``(c, N)`` int64 (:data:`INVALID_KEY` for rows that must not be chosen), rows: ``(c, N, d)``
        - output: rows ``(c, count, d)`` (zeros where there is no real row), their keys ``(c, count)``, and
          which are real ``(c, count)`` bool
    """
    c, n, d = rows.shape
    best_keys, positions = keys.topk(min(count, n), dim=1, largest=False, sorted=True)
    best_rows = rows.gather(1, positions.unsqueeze(-1).expand(-1, -1, d))
    if n < count:  # pad to a fixed number of candidates, the same on every rank
        best_keys = torch.cat((best_keys, keys.new_full((c, count - n), INVALID_KEY)), dim=1)
        best_rows = torch.cat((best_rows, rows.new_zeros(c, count - n, d)), dim=1)
    if should_sync(sync):
        all_keys = all_gather_cat(best_keys, dim=1, sync=sync)  # (c, world * count), in rank order
        best_keys, chosen = all_keys.topk(count, dim=1, largest=False, sorted=True)
        owner = torch.div(chosen, count, rounding_mode="floor")
        mine = best_rows.gather(1, (chosen % count).unsqueeze(-1).expand(-1, -1, d))
        mine = torch.where((owner == rank()).unsqueeze(-1), mine, torch.zeros_like(mine))
        best_rows = all_reduce_sum_(mine, sync=sync)
    real = best_keys != INVALID_KEY
    return torch.where(real.unsqueeze(-1), best_rows, torch.zeros_like(best_rows)), best_keys, real


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
