"""Batched k-means and random row sampling without host synchronisation.

Random rows are chosen by sorting per-row random keys derived from a seed tensor and each row's position in
the concatenated batch of all ranks (core/distributed.py), so that distributed runs choose the rows a single
process would choose on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .search import nearest_codes


def shuffled_valid_rows(valid: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Row indices in random order with every valid row before every invalid one.

    Shape:
        - valid: ``(c, N)`` bool
        - output: order ``(c, N)`` int64, number of valid rows ``(c, 1)`` int64
    """
    keys = torch.rand(valid.shape, device=valid.device, generator=generator)
    keys = keys.masked_fill(~valid, 2.0)
    return keys.argsort(dim=-1), valid.sum(dim=-1, keepdim=True)


def random_valid_rows(
    samples: Tensor, valid: Tensor, count: int, seed: Tensor | None = None, *, sync: bool | None = False
) -> tuple[Tensor, Tensor]:
    """Up to ``count`` distinct valid rows in random order, the same on every rank.

    Every row gets a random key from ``seed`` and its position in the concatenated batch of all ranks
    (:func:`~vector_quantize_pytorch.core.distributed.random_row_keys`); the valid rows with the smallest
    keys are taken. When synchronised the candidates of every rank compete, so every rank gets the same rows,
    and they are the rows a single process gets from the concatenated batch with the same seed.

    Args:
        samples: ``(c, N, d)`` rows.
        valid: ``(c, N)`` bool, the rows that may be chosen.
        count: rows wanted.
        seed: ``()`` int64 seed shared by the ranks; None draws one (:func:`distributed.shared_seed_tensor`).
        sync: choose among the rows of every rank (None: whenever distributed).

    Returns:
        rows ``(c, count, d)`` (zeros after the last valid row) and how many are real, ``(c, 1)`` int64.
    """
    if seed is None:
        seed = distributed.shared_seed_tensor(samples.device, sync=sync)
    c, n, _ = samples.shape
    keys = distributed.random_row_keys(seed, n, c, sync=sync)
    keys = torch.where(valid, keys, torch.full_like(keys, distributed.INVALID_KEY))
    rows, _, real = distributed.select_by_key(keys, samples, count, sync=sync)
    return rows, real.sum(dim=-1, keepdim=True)


def sample_rows(
    samples: Tensor, valid: Tensor, count: int, seed: Tensor | None = None, *, sync: bool | None = False
) -> Tensor:
    """``count`` rows drawn from the valid rows of each codebook: distinct while there are enough valid
    rows, repeating them in the same random order otherwise (zeros when there is none). Synchronised as
    :func:`random_valid_rows`.

    Shape:
        - samples: ``(c, N, d)``, valid: ``(c, N)``
        - output: ``(c, count, d)``
    """
    rows, num_valid = random_valid_rows(samples, valid, count, seed, sync=sync)
    slots = torch.arange(count, device=samples.device).unsqueeze(0) % num_valid.clamp(min=1)
    return rows.gather(1, slots.unsqueeze(-1).expand(-1, -1, samples.shape[-1]))


def cluster_statistics(
    samples: Tensor, assign: Tensor, weights: Tensor, num_clusters: int, *, samples_weighted: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-cluster weighted counts and vector sums, by index_add (never a one-hot matrix).

    Args:
        samples_weighted: the rows of ``samples`` are already multiplied by their weights (e.g. 0/1 weights
            with the rows of weight 0 zeroed), so they are summed as they are.

    Shape:
        - samples: ``(c, N, d)`` (rows with zero weight must be finite), assign: ``(c, N)`` int64,
          weights: ``(c, N)``
        - output: counts ``(c, K)``, sums ``(c, K, d)``
    """
    c, n, d = samples.shape
    flat_assign = assign.reshape(-1)
    if c > 1:  # one index space: codebook i's clusters are rows [i K, (i + 1) K)
        flat_assign = (assign + torch.arange(c, device=assign.device).unsqueeze(-1) * num_clusters).reshape(-1)
    counts = torch.zeros(c * num_clusters, device=samples.device, dtype=samples.dtype)
    counts.index_add_(0, flat_assign, weights.reshape(-1).to(samples.dtype))
    weighted = samples if samples_weighted else samples * weights.unsqueeze(-1)
    sums = torch.zeros(c * num_clusters, d, device=samples.device, dtype=samples.dtype)
    sums.index_add_(0, flat_assign, weighted.reshape(-1, d))
    return counts.view(c, num_clusters), sums.view(c, num_clusters, d)


def kmeans(
    samples: Tensor,
    num_clusters: int,
    num_iters: int = 10,
    *,
    valid: Tensor | None = None,
    cosine: bool = False,
    sync: bool | None = False,
    seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means, one independent problem per codebook.

    Initial means are random valid rows (:func:`sample_rows` with ``seed``: when synchronised, chosen among
    the rows of every rank, identically on every rank). Each iteration assigns every valid row to its nearest
    mean and moves each mean to the average of its rows; counts and sums are summed over ranks first. So
    distributed k-means equals k-means on the concatenated batch with the same seed (up to the rounding of
    the summed statistics). A cluster that receives no row keeps its previous mean. With ``num_iters=0`` the
    means are the sampled rows and the counts those of the valid rows' assignment to them.

    Shape:
        - samples: ``(c, N, d)``, valid: ``(c, N)`` bool
        - output: means ``(c, K, d)``, counts of the last assignment ``(c, K)``
    """
    if valid is None:
        valid = torch.ones(samples.shape[:2], dtype=torch.bool, device=samples.device)
    samples = torch.where(valid.unsqueeze(-1), samples, torch.zeros_like(samples))
    weights = valid.to(samples.dtype)

    means = sample_rows(samples, valid, num_clusters, seed, sync=sync)
    if num_iters == 0:
        counts, _ = _assignment_statistics(samples, means, weights, cosine, sync)
    for _ in range(num_iters):
        counts, sums = _assignment_statistics(samples, means, weights, cosine, sync)
        new_means = sums / counts.clamp(min=1.0).unsqueeze(-1)
        if cosine:
            new_means = F.normalize(new_means, dim=-1)
        means = torch.where((counts > 0).unsqueeze(-1), new_means, means)
    return means, counts


def _assignment_statistics(
    samples: Tensor, means: Tensor, weights: Tensor, cosine: bool, sync: bool | None
) -> tuple[Tensor, Tensor]:
    """Counts and sums of the rows nearest to each mean, summed over ranks.

    Shape:
        - samples: ``(c, N, d)``, means: ``(c, K, d)``, weights: ``(c, N)``
        - output: counts ``(c, K)``, sums ``(c, K, d)``
    """
    assign = nearest_codes(samples, means, cosine=cosine)
    counts, sums = cluster_statistics(samples, assign, weights, means.shape[1])
    return distributed.all_reduce_sum_(counts, sync=sync), distributed.all_reduce_sum_(sums, sync=sync)
