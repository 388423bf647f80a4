"""Index arithmetic for implicit codebooks: mixed-radix digits (FSQ, LatentQuantize) and bits (LFQ, BSQ).

An implicit codebook is the Cartesian product of per-dimension value grids, so a code is a tuple of digits
``(d_0, ..., d_{D-1})`` with ``0 <= d_i < L_i`` and its index is the mixed-radix number

    index = sum_i d_i * B_i,    B_0 = 1,  B_i = L_0 * ... * L_{i-1}.

Everything here is exact integer arithmetic in int64 (indices up to ``2**63 - 1``); nothing enumerates the
codebook. Bit codes are the radix-2 case written most significant bit first, as LFQ numbers its codes:
bit ``k`` of a ``K``-bit code has weight ``2**(K - 1 - k)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .tensors import as_dtype

INT32_CODEBOOK_LIMIT = 2**31  # codebooks up to this size index in int32 (FSQ)
# Largest codebook of the quantizers whose indices are always int32 (LatentQuantize, FSP).
MAX_CODEBOOK_SIZE = 2**31 - 1
INT64_CODEBOOK_LIMIT = 2**63  # beyond this an index does not fit in int64


def radix_basis(levels: tuple[int, ...] | list[int]) -> Tensor:
    """Place values ``B_i = L_0 * ... * L_{i-1}`` of the mixed-radix number system with radices ``levels``.

    Computed with Python integers, so it is exact whenever the codebook fits in int64.

    Example::

        >>> radix_basis([8, 5, 5, 5])
        tensor([  1,   8,  40, 200])
    """
    basis, place = [], 1
    for level in levels:
        basis.append(place)
        place *= level
    return torch.tensor(basis, dtype=torch.int64)


def codebook_size_of(levels: tuple[int, ...] | list[int]) -> int:
    """Number of codes of the product grid: ``prod(levels)`` as an exact Python int."""
    return math.prod(levels)


def index_dtype_for(codebook_size: int) -> torch.dtype:
    """int32 when every index of a codebook of this size fits in it, else int64."""
    return torch.int32 if codebook_size <= INT32_CODEBOOK_LIMIT else torch.int64


def digits_to_index(digits: Tensor, basis: Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
    """Mixed-radix digits ``(..., D)`` -> indices ``(...)`` of ``dtype``, summed in it: exact in int64, and in int32
    when the codebook has at most ``2**31`` codes (every term and every partial sum is then below ``2**31``)."""
    return (as_dtype(digits, torch.int64) * basis).sum(dim=-1, dtype=dtype)


def index_to_digits(indices: Tensor, basis: Tensor, levels: Tensor) -> Tensor:
    """Indices ``(...)`` -> mixed-radix digits ``(..., D)`` (int64): ``d_i = (index // B_i) mod L_i``."""
    return torch.div(indices.long().unsqueeze(-1), basis, rounding_mode="floor") % levels


def bit_weights(num_bits: int) -> Tensor:
    """Weights ``2**(K-1), ..., 2, 1`` (int64) of bits written most significant first."""
    return 2 ** torch.arange(num_bits - 1, -1, -1, dtype=torch.int64)


def bits_to_index(bits: Tensor, weights: Tensor) -> Tensor:
    """Bits ``(..., K)`` (bool or 0/1) -> indices ``(...)`` (int64)."""
    return (bits.long() * weights).sum(dim=-1)


def index_to_bits(indices: Tensor, weights: Tensor) -> Tensor:
    """Indices ``(...)`` -> bits ``(..., K)`` (bool), most significant first."""
    return (indices.long().unsqueeze(-1) & weights) != 0


def all_bit_patterns(num_bits: int, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Every ``num_bits``-bit pattern, least significant bit first: row ``i`` holds the bits of ``i``.

    Shape: ``(2**num_bits, num_bits)``. Used by the LFQ entropy to map code probabilities back to bits.
    """
    codes = torch.arange(2**num_bits, device=device).unsqueeze(-1)
    shifts = torch.arange(num_bits, device=device)
    return ((codes >> shifts) & 1).to(dtype)
