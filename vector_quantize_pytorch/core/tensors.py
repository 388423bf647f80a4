"""Small tensor helpers of the hot paths: conversions that cost no operator when there is nothing to convert,
and the flush of subnormal EMA statistics (:func:`flush_subnormal_`).

On an accelerator every operator call is a kernel launch or at least a dispatch; ``t.detach()`` of a tensor
that needs no gradient and ``t.float()`` of a float32 tensor do nothing useful, so the hot paths skip them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def detached(t: Tensor) -> Tensor:
    """``t`` without its autograd history: ``t`` itself when it has none."""
    return t.detach() if t.requires_grad else t


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, or ``t`` itself when it already has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)


def as_float32(t: Tensor) -> Tensor:
    """``t.float()``, or ``t`` itself when it is float32."""
    return as_dtype(t, torch.float32)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for inputs of ``dtype``: float32 for half and bfloat16, float64 kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flush_subnormal_(t: Tensor) -> Tensor:
    """Set the elements of ``t`` smaller in magnitude than the smallest normal number to zero, in place.

    An EMA statistic of a code that is no longer used decays geometrically; with a decay above 0.5 the product
    rounds back up to the smallest subnormal number and stays there for good, and a CPU computes with
    subnormal numbers many times slower (measured: a VectorQuantize training step 25x slower once most codes
    of a 4096-code codebook were unused). One elementwise pass, in place.
    """
    return torch.hardshrink(t, torch.finfo(t.dtype).tiny, out=t)
