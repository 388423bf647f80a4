"""Input layouts <-> flat token sequences.

Every quantizer works on tokens shaped ``(b, n, d)``. Users hand in sequences ``(b, n, d)``, single
tokens ``(b, d)``, channel-first sequences ``(b, d, n)``, images ``(b, c, h, w)`` and video
``(b, c, t, h, w)``. :class:`TokenLayout` remembers how an input was laid out so that features and
indices can be put back the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """How one input tensor maps to ``(b, n, d)`` tokens.

    Args:
        spatial: sizes of the axes that were flattened into ``n`` (empty for a single token).
        channel_first: features sit on axis 1 instead of the last axis.
        single_token: the input was ``(b, d)``.

    Shape:
        - to_tokens: ``x`` of the input's layout -> ``(b, n, d)``
        - from_tokens: ``(b, n, d)`` -> the input's layout
        - indices_from_tokens: ``(b, n, *tail)`` -> ``(b, *spatial, *tail)`` (``(b, *tail)`` for a single token)
        - indices_to_tokens: the inverse of ``indices_from_tokens``
    """

    spatial: tuple[int, ...]
    channel_first: bool
    single_token: bool

    @classmethod
    def of(cls, x: Tensor, *, channel_first: bool) -> TokenLayout:
        if x.ndim < 2:
            raise ValueError(f"input must have at least 2 dimensions (batch, feature), got shape {tuple(x.shape)}")
        if x.ndim == 2:
            return cls(spatial=(), channel_first=False, single_token=True)
        spatial = tuple(x.shape[2:]) if channel_first else tuple(x.shape[1:-1])
        return cls(spatial=spatial, channel_first=channel_first, single_token=False)

    @property
    def num_tokens(self) -> int:
        n = 1
        for s in self.spatial:
            n *= s
        return n

    def to_tokens(self, x: Tensor) -> Tensor:
        if self.single_token:
            return x.unsqueeze(1)
        if self.channel_first:
            return x.flatten(2).transpose(1, 2)
        return x.reshape(x.shape[0], self.num_tokens, x.shape[-1])  # explicit sizes: an empty batch reshapes too

    def from_tokens(self, t: Tensor) -> Tensor:
        """``(b, n, d)`` -> input layout; ``(b, n, k, d)`` (top-k) keeps ``k`` after the spatial axes."""
        b, d = t.shape[0], t.shape[-1]
        extra = tuple(t.shape[2:-1])
        if self.single_token:
            return t.reshape(b, *extra, d)
        t = t.reshape(b, *self.spatial, *extra, d)
        if self.channel_first:
            return t.movedim(-1, 1)
        return t

    def indices_from_tokens(self, idx: Tensor) -> Tensor:
        tail = tuple(idx.shape[2:])
        if self.single_token:
            return idx.reshape(idx.shape[0], *tail)
        return idx.reshape(idx.shape[0], *self.spatial, *tail)

    def indices_to_tokens(self, idx: Tensor, tail_dims: int = 0) -> Tensor:
        tail = tuple(idx.shape[idx.ndim - tail_dims :]) if tail_dims else ()
        return idx.reshape(idx.shape[0], math.prod(idx.shape[1 : idx.ndim - tail_dims]), *tail)

    def mask_to_tokens(self, mask: Tensor) -> Tensor:
        """A mask over the spatial axes ``(b, *spatial)`` (or ``(b, n)``) -> ``(b, n)``; anything else is left
        for :func:`check_mask` to reject."""
        if not isinstance(mask, Tensor) or mask.ndim == 0:
            return mask
        return mask.reshape(mask.shape[0], math.prod(mask.shape[1:]))


def lens_to_mask(lens: Tensor, max_length: int) -> Tensor:
    """``(b,)`` lengths -> ``(b, max_length)`` bool mask, True where a position is within its length."""
    return torch.arange(max_length, device=lens.device) < lens.unsqueeze(-1)


def check_mask(mask: Tensor | None, batch: int, num_tokens: int, *, name: str = "mask") -> Tensor | None:
    """Validate a ``(b, n)`` boolean mask; returns it as bool or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, seq), got {type(mask).__name__}")
    if mask.shape != (batch, num_tokens):
        raise ValueError(f"{name} must have shape (batch, seq) = {(batch, num_tokens)}, got {tuple(mask.shape)}")
    return mask.bool()
