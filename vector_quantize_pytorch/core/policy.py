"""Memory budgets of the chunked hot paths, chosen per device type.

Every search, top-k, sampling, code-norm, k-means, beam-search and LFQ-entropy computation works in chunks
so that no tokens x codes matrix grows without bound. How big a chunk may be depends on the hardware:

- On a CPU the best chunk stays in cache: the matrix product writes a chunk of scores and the row maximum
  reads it back while it is still there (measured in benchmarks/README.md, "Search chunk size").
- On an accelerator every operator is a kernel launch of several microseconds, so a call should be a
  handful of large kernels. Chunks are bounded by a fixed cap instead: ``ACCELERATOR_POLICY`` holds at most
  ``2**27`` float32 scores (512 MiB) at once, which covers a 16384 x 8192 search in one kernel and keeps the
  memory of a larger one bounded, unlike a full tokens x codes matrix.

:func:`chunk_policy` is the one function that decides. A user can override it for every device
(:func:`set_chunk_policy`) or for a block of code (:func:`use_chunk_policy`), e.g. to give a small GPU a
smaller cap or to count the accelerator policy's operators on a CPU. Results do not depend on the policy:
every chunked path returns the same indices, ties included, whatever the budgets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class ChunkPolicy:
    """Budgets of the chunked hot paths, in elements (float32: four bytes each).

    Args:
        name: a label, shown in benchmarks.
        search_scores: scores held at once by the nearest-code search, over all codebooks.
        logit_scores: distance logits held at once by top-k search, Gumbel sampling and beam search.
        norm_values: code values squared at once when computing code norms.
        entropy_codes: codes (codebooks x codes) of one chunk of LFQ's batch-mean distribution.
        entropy_table: elements of one token chunk's per-bit probability tables in LFQ's exact entropy.
        blocked_max: find the maxima of rows of 2048 codes or more with a blocked ``amax`` (several cheap
            operators, up to twice as fast as ``max`` on a CPU) instead of a single ``max`` (one kernel on an
            accelerator); see :func:`~vector_quantize_pytorch.core.search.first_max`.
    """

    name: str
    search_scores: int
    logit_scores: int
    norm_values: int
    entropy_codes: int
    entropy_table: int
    blocked_max: bool

    def __post_init__(self):
        for field in ("search_scores", "logit_scores", "norm_values", "entropy_codes", "entropy_table"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ChunkPolicy.{field} must be a positive int, got {value!r}")


CPU_POLICY = ChunkPolicy(
    name="cpu",
    search_scores=2**21,
    logit_scores=2**23,
    norm_values=2**20,
    entropy_codes=2**18,
    entropy_table=2**17,
    blocked_max=True,
)

ACCELERATOR_POLICY = ChunkPolicy(
    name="accelerator",
    search_scores=2**27,
    logit_scores=2**27,
    norm_values=2**27,
    # LFQ's exact entropy holds about 2 * entropy_codes + 2 * entropy_table elements at once (a chunk's mean and
    # its gradient, a token chunk's tables and their gradient): 384 MiB in float32 (768 MiB in float64). One
    # chunk of codes covers 2^24 codes (a 24-bit codebook), and a token chunk 2^25 / (2^12 + 2^12) = 4096 tokens
    # at 24 bits, 65536 at 16 bits: the entropy (forward and backward) is then about 50 operators.
    entropy_codes=2**24,
    entropy_table=2**25,
    blocked_max=False,
)

POLICIES = {policy.name: policy for policy in (CPU_POLICY, ACCELERATOR_POLICY)}

PolicyLike = Union[ChunkPolicy, str, None]

_override: ChunkPolicy | None = None


def _as_policy(policy: PolicyLike) -> ChunkPolicy | None:
    if policy is None or isinstance(policy, ChunkPolicy):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]
    raise ValueError(f"policy must be a ChunkPolicy, one of {sorted(POLICIES)} or None, got {policy!r}")


def chunk_policy(device: torch.device | str | None = None) -> ChunkPolicy:
    """The budgets for tensors on ``device``: the override if one is set, else ``CPU_POLICY`` on a CPU and
    ``ACCELERATOR_POLICY`` on any other device (CUDA, ROCm, MPS, XPU, ...)."""
    if _override is not None:
        return _override
    device_type = "cpu" if device is None else torch.device(device).type
    return CPU_POLICY if device_type == "cpu" else ACCELERATOR_POLICY


def set_chunk_policy(policy: PolicyLike) -> None:
    """Use ``policy`` (a :class:`ChunkPolicy`, ``"cpu"`` or ``"accelerator"``) on every device from now on;
    ``None`` restores the choice by device type."""
    global _override
    _override = _as_policy(policy)


@contextmanager
def use_chunk_policy(policy: PolicyLike) -> Iterator[ChunkPolicy | None]:
    """Within the block, use ``policy`` on every device (see :func:`set_chunk_policy`); the previous setting
    is restored on exit."""
    global _override
    previous, _override = _override, _as_policy(policy)
    try:
        yield _override
    finally:
        _override = previous
