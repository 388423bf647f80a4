"""Conversions that cost no operator when there is nothing to convert.

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
