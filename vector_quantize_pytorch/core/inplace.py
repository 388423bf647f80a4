"""In-place codebook optimisation: an optimiser stepped inside a quantizer's forward (vqtorch's alternating
update), shared by VectorQuantize and LatentQuantize.

A step moves only parameters that learned from a valid row: when no rank had one, the parameters are put
back after the step, so that an optimiser with momentum or weight decay cannot move codes on a batch with
nothing to learn from. No host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed

__all__ = ["average_gradients_", "step_if_rows"]


def step_if_rows(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    num_valid_rows: Tensor,
    *,
    sync: bool | None = None,
    zero_grad: bool = True,
) -> None:
    """Average the gradients of ``params`` over ranks (when distributed), step ``optimizer``, and restore
    ``params`` when ``num_valid_rows`` summed over ranks is 0.

    Args:
        optimizer: the in-place optimiser.
        params: the parameters it steps (those with ``requires_grad``).
        num_valid_rows: ``()`` number of rows of this rank that the gradients came from.
        sync: all-reduce across ranks (None: whenever ``torch.distributed`` is initialised).
        zero_grad: clear the gradients after the step.
    """
    params = [p for p in params if p.requires_grad]
    before = [p.detach().clone() for p in params]
    average_gradients_(params, sync)
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad()
    total = distributed.all_reduce_sum_(num_valid_rows.detach().float().clone(), sync=sync)
    with torch.no_grad():
        for param, old in zip(params, before):
            param.copy_(torch.where(total > 0, param, old))


def average_gradients_(params, sync: bool | None = None) -> None:
    """Replace the gradient of every parameter by its mean over ranks (nothing when not distributed)."""
    if not distributed.should_sync(sync):
        return
    for param in params:
        if param.grad is not None:
            distributed.all_reduce_sum_(param.grad).div_(distributed.world_size())
