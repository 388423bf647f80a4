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
from einops import rearrange
from torch import Tensor

from .validate import check_input, reads_indices_on_host


# not frozen: torch.compile of torch 2.3 cannot build a frozen dataclass inside a graph (a plain one it can)
@dataclass
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
            return rearrange(x, "b d -> b 1 d")
        if self.channel_first:
            return rearrange(x, "b d ... -> b (...) d")
        return x.reshape(x.shape[0], self.num_tokens, x.shape[-1])  # "b ... d -> b (...) d"; sizes explicit for b = 0

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


@dataclass  # not frozen, as TokenLayout
class TokenInput:
    """A quantizer's input parsed once: how to restore its layout, its tokens and which tokens count.

    Shape:
        - tokens: ``(b, n, dim)``
        - mask: ``(b, n)`` bool (True = a real token), or None when every token counts
    """

    layout: TokenLayout
    tokens: Tensor
    mask: Tensor | None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]


def parse_input(
    x,
    *,
    dim: int,
    channel_first: bool | None,
    ndim: int | tuple[int, ...] | None = None,
    min_ndim: int = 2,
    mask: Tensor | None = None,
    lens: Tensor | None = None,
    name: str = "x",
    layout_hint: str | dict[int, str] = "channel_first=True",
    shapes: str | None = None,
) -> TokenInput:
    """The one parser of quantizer inputs: checks ``x``, flattens it to tokens and turns ``mask``/``lens`` into
    a ``(b, n)`` token mask.

    Args:
        x: the input, features on the last axis, or on axis 1 when channel-first.
        dim: the number of features a token must have.
        channel_first: features on axis 1 (for inputs of 3 or more dimensions); None: on axis 1 for images and
            video (4 or more dimensions) only.
        ndim: the allowed number of dimensions (an int or a tuple); None: ``min_ndim`` or more.
        min_ndim: the fewest dimensions allowed when ``ndim`` is None.
        mask: True for the tokens that count: ``(b, *spatial)``, ``(b, n)``, or ``(b,)`` for whole samples.
        lens: ``(b,)`` lengths of 1-d sequences (tokens at positions ``>= lens`` are masked out).
        name: the argument's name in error messages.
        layout_hint: the option to suggest when the features sit on axis 1 of an input read channel-last (or
            of one of a number of dimensions not allowed): one option, or one per number of dimensions (e.g.
            ``{3: "channel_last=False", 4: "accept_image_fmap=True"}``).
        shapes: the accepted shapes, for the error on a wrong number of dimensions (e.g. ``"(b, n, dim)"``).

    Shape:
        - x: ``(b, dim)``, ``(b, ..., dim)`` or channel-first ``(b, dim, ...)``
        - output tokens: ``(b, n, dim)``, mask ``(b, n)``
    """
    check_input(name, x, min_ndim=0)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if (x.ndim not in allowed) if allowed else x.ndim < min_ndim:
        counts = " or ".join(map(str, allowed)) if allowed else f"at least {min_ndim}"
        message = f"{name} must have {counts} dimensions, got shape {tuple(x.shape)}"
        if shapes is not None:
            message = f"{name} must have shape {shapes} with dim = {dim}, got {tuple(x.shape)}"
        raise ValueError(message + _channel_first_hint(x, dim, layout_hint))
    channel_first = x.ndim >= 4 if channel_first is None else channel_first
    layout = TokenLayout.of(x, channel_first=channel_first)
    axis = 1 if layout.channel_first and x.ndim > 2 else x.ndim - 1
    if x.shape[axis] != dim:
        message = f"{name} must have {dim} features on axis {axis}, got shape {tuple(x.shape)}"
        raise ValueError(message + (_channel_first_hint(x, dim, layout_hint) if axis > 1 else ""))
    tokens = layout.to_tokens(x)
    return TokenInput(layout, tokens, token_mask(mask, lens, layout, tokens.shape[0]))


def _channel_first_hint(x: Tensor, dim: int, layout_hint: str | dict[int, str]) -> str:
    """A suggestion when the features of ``x`` seem to sit on axis 1 of an input read another way."""
    option = layout_hint.get(x.ndim) if isinstance(layout_hint, dict) else layout_hint
    if option is None or x.ndim < 3 or x.shape[1] != dim:
        return ""
    return f"; its axis 1 has {dim} features: for channel-first inputs pass {option}"


def token_mask(mask, lens, layout: TokenLayout, batch: int) -> Tensor | None:
    """``mask`` or ``lens`` -> a ``(b, n)`` bool token mask (None when neither is given).

    Shape:
        - mask: ``(b, *spatial)``, ``(b, n)``, or ``(b,)`` (every token of a sample)
        - lens: ``(b,)`` integer lengths, for 1-d sequences
        - output: ``(b, n)`` bool
    """
    n = layout.num_tokens
    if mask is not None and lens is not None:
        raise ValueError("pass either mask or lens, not both")
    if lens is not None:
        return lens_to_mask(_checked_lens(lens, batch, n), n)
    if isinstance(mask, Tensor) and mask.ndim == 1 and mask.shape[0] == batch and n != 1:
        mask = mask.unsqueeze(-1).expand(batch, n)  # whole samples
    return check_mask(layout.mask_to_tokens(mask), batch, n)


def _checked_lens(lens, batch: int, n: int) -> Tensor:
    """``lens``: a ``(batch,)`` integer tensor with values in ``[0, n]`` (values read only where that is free:
    :func:`~.validate.reads_indices_on_host`)."""
    if not isinstance(lens, Tensor) or lens.ndim != 1 or lens.shape[0] != batch:
        raise ValueError(f"lens must be a (batch,) = ({batch},) tensor of lengths, got {_describe(lens)}")
    if lens.dtype.is_floating_point or lens.dtype.is_complex or lens.dtype == torch.bool:
        raise TypeError(f"lens must be an integer tensor, got dtype {lens.dtype}")
    if reads_indices_on_host(lens) and lens.numel() and bool(((lens < 0) | (lens > n)).any()):
        raise ValueError(
            f"lens must lie in [0, seq] = [0, {n}], got values from {int(lens.min())} to {int(lens.max())}"
        )
    return lens


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


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
    if mask.dtype != torch.bool and reads_indices_on_host(mask) and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must be boolean (or hold only 0 and 1), got dtype {mask.dtype} with other values")
    return mask.bool()


@dataclass(frozen=True)
class HeadSplit:
    """How ``heads`` chunks of every token map to the rows of a quantizer's codebooks.

    With one codebook per head (``separate``) each head's chunks form the rows of its codebook, ``(h, b*n, d)``;
    with a shared codebook every chunk is a row of the one codebook, token-major, ``(1, b*n*h, d)``.

    Args:
        heads: chunks per token.
        dim: features per chunk.
        separate: one codebook per head.

    Shape:
        - split: ``(b, n, heads * dim)`` -> ``(c, N, dim)``
        - merge: ``(c, N, *tail)`` -> ``(b, n, heads, *tail)``
        - rows_of: ``(b, n)`` (a mask) or ``(b, n, heads)`` (indices) -> ``(c, N)``
    """

    heads: int
    dim: int
    separate: bool

    def split(self, tokens: Tensor) -> Tensor:
        if self.separate:
            return rearrange(tokens, "b n (h d) -> h (b n) d", h=self.heads)
        return rearrange(tokens, "b n (h d) -> 1 (b n h) d", h=self.heads)

    def merge(self, rows: Tensor, b: int, n: int) -> Tensor:
        if self.separate:
            return rearrange(rows, "h (b n) ... -> b n h ...", b=b, n=n)
        return rearrange(rows, "1 (b n h) ... -> b n h ...", b=b, n=n, h=self.heads)

    def rows_of(self, t: Tensor) -> Tensor:
        """A per-token mask ``(b, n)`` (repeated for every head) or per-head indices ``(b, n, heads)``, in the
        row order of :meth:`split`."""
        if t.ndim == 2:
            t = t.unsqueeze(-1).expand(*t.shape, self.heads)
        if self.separate:
            return rearrange(t, "b n h -> h (b n)")
        return rearrange(t, "b n h -> 1 (b n h)")
