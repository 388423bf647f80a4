"""ResidualFSQ and GroupedResidualFSQ: residual finite scalar quantization."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor, nn

from .core.layout import TokenLayout
from .core.residual import GroupedStacks, ResidualStack
from .core.validate import check_bool, check_input, check_int, check_int_sequence
from .finite_scalar_quantization import FSQ


def check_dropout_args(num_quantizers, quantize_dropout, cutoff_index, multiple_of, per_sample) -> None:
    """Types and ranges of the quantize dropout arguments of a residual stack (before any state is built)."""
    check_bool("quantize_dropout", quantize_dropout)
    check_int("quantize_dropout_cutoff_index", cutoff_index, minimum=0, maximum=num_quantizers - 1)
    check_int("quantize_dropout_multiple_of", multiple_of, minimum=1)
    check_bool("quantize_dropout_per_sample", per_sample)


# layer arguments that would change a layer's token shapes (the stack feeds every layer ``(b, n, codebook_dim)``
# tokens and stacks ``(b, n)`` indices), with the values that leave them alone
LAYER_ARGUMENTS_FIXED_BY_THE_STACK = {
    "num_codebooks": (1,),
    "keep_num_codebooks_dim": (None, False),
    "channel_first": (None, False),
    "has_projections": (None, False),
    "return_indices": (True,),
}


def check_layer_kwargs(layer_kwargs: dict) -> None:
    """Reject per-layer arguments a residual stack cannot honour (the reference asserts on some, breaks on others)."""
    for name, allowed in LAYER_ARGUMENTS_FIXED_BY_THE_STACK.items():
        if name in layer_kwargs and not any(
            layer_kwargs[name] is value or layer_kwargs[name] == value for value in allowed
        ):
            raise ValueError(
                f"{name}={layer_kwargs[name]!r} is not supported for the layers of a residual stack (allowed: "
                f"{', '.join(map(repr, allowed))}); split features with the Grouped* class, and use the stack's own "
                "dim / is_channel_first for projections and layouts"
            )


def _check_soft_clamp(value, codebook_dim: int) -> Tensor:
    """``soft_clamp_input_value``: a positive number, or one per code dimension -> float32 tensor."""
    if isinstance(value, bool) or not isinstance(value, (Real, list, tuple, Tensor)):
        raise TypeError(
            f"soft_clamp_input_value must be a number, a list of {codebook_dim} numbers or a tensor, got {value!r}"
        )
    try:
        clamp = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"soft_clamp_input_value must hold numbers, got {value!r}") from error
    if clamp.ndim > 1 or clamp.numel() not in (1, codebook_dim):
        raise ValueError(
            f"soft_clamp_input_value must be one number or {codebook_dim} (one per code dimension), "
            f"got shape {tuple(clamp.shape)}"
        )
    if not (torch.isfinite(clamp) & (clamp > 0)).all():
        raise ValueError(f"soft_clamp_input_value must be positive and finite, got {value!r}")
    return clamp


class ResidualFSQ(ResidualStack):
    """Residual FSQ: each layer is an FSQ (symmetry-preserving) applied to the residual scaled up by
    ``levels^i``, so that later layers resolve finer and finer grids (the reference's "improvised" design).

    Args:
        levels: FSQ levels per code dimension.
        num_quantizers: depth ``q``.
        dim: input feature size (default ``len(levels)``); Linear projections when different.
        is_channel_first: inputs are ``(b, d, ...)``.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: as ResidualVQ.
        soft_clamp_input_value: tanh soft clamp before the layers (with ``bound_hard_clamp`` it is
            ``1 + 1/(L - 1)`` per dimension).
        bound_hard_clamp: the layers clamp instead of tanh-bound.
        **kwargs: passed to every FSQ layer.

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(b, n, q)`` int32
        - ``is_channel_first``: ``(b, dim, ...)`` -> ``(b, dim, ...)``, indices ``(b, ..., q)`` (the reference
          moves the q axis to position 1, which its own decoder cannot read; we keep it last)

    Example::

        >>> rfsq = ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
        >>> quantized, indices = rfsq(torch.randn(1, 1024, 256))
        >>> indices.shape
        torch.Size([1, 1024, 8])
    """

    def __init__(
        self,
        *,
        levels: list[int],
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | list[float] | Tensor | None = None,
        bound_hard_clamp: bool = True,
        quantize_dropout_per_sample: bool = False,
        **kwargs,
    ):
        super().__init__()
        levels = check_int_sequence("levels", levels, minimum=2)
        check_int("num_quantizers", num_quantizers, minimum=1)
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else check_int("dim", dim, minimum=1)
        self.is_channel_first = check_bool("is_channel_first", is_channel_first)
        check_dropout_args(
            num_quantizers,
            quantize_dropout,
            quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of,
            quantize_dropout_per_sample,
        )
        check_bool("bound_hard_clamp", bound_hard_clamp)
        check_layer_kwargs(kwargs)
        if bound_hard_clamp and soft_clamp_input_value is not None:
            raise ValueError(
                "soft_clamp_input_value cannot be set with bound_hard_clamp=True (it is derived from levels)"
            )
        if soft_clamp_input_value is not None:
            soft_clamp_input_value = _check_soft_clamp(soft_clamp_input_value, codebook_dim)
        self.dim = dim
        self.levels = list(levels)
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.layers = nn.ModuleList(
            FSQ(
                levels=list(levels),
                dim=codebook_dim,
                preserve_symmetry=True,
                bound_hard_clamp=bound_hard_clamp,
                **kwargs,
            )
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size
        self._init_dropout(
            quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of, quantize_dropout_per_sample
        )
        levels_t = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("scales", torch.stack([levels_t**-i for i in range(num_quantizers)]), persistent=False)
        if bound_hard_clamp:
            soft_clamp_input_value = 1 + 1 / (levels_t - 1)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)

    @property
    def codebooks(self) -> Tensor:
        """``(q, K, codebook_dim)`` implicit codebooks, unscaled (built on request)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def _quantize_layer(self, index, residual, mask, *, previous):
        scale = self.scales[index]
        quantized, indices = self.layers[index](residual.float() / scale)
        return (quantized * scale).to(residual.dtype), indices, None

    def _layer_codes(self, index, indices, previous) -> Tensor:
        return self.layers[index].indices_to_codes(indices, project_out=False).float() * self.scales[index]

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        check_input("x", x, min_ndim=3)
        layout = TokenLayout.of(x, channel_first=self.is_channel_first)
        tokens = layout.to_tokens(x)
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"x must have {self.dim} features, got shape {tuple(x.shape)}")
        h = self.project_in(tokens)
        if self.soft_clamp_input_value is not None:
            clamp = self.soft_clamp_input_value.to(h.dtype)
            h = (h / clamp).tanh() * clamp

        cutoffs = last_layer = None
        if self.training and self.quantize_dropout and torch.is_grad_enabled():
            cutoffs, last_layer = self._dropout_plan(h.shape[0], h.device, rand_quantize_dropout_fixed_seed)
        with torch.autocast(h.device.type, enabled=False):
            quantized, indices, _, _ = self._residual_loop(h.float(), None, cutoffs, last_layer)
        out = layout.from_tokens(self.project_out(quantized.to(h.dtype)).to(x.dtype))
        result = (out, layout.indices_from_tokens(indices))
        if return_all_codes:
            result = (*result, self.get_codes_from_indices(result[1]))
        return result

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Scaled codes of every layer; index -1 gives zeros. ``(b, ..., q') -> (q, b, ..., codebook_dim)``."""
        return self._all_layer_codes(indices)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for these indices in eval mode: ``(b, ..., q) -> (b, ..., dim)`` (channel-first
        when ``is_channel_first``)."""
        out = self.project_out(self._sum_in_layer_order(self.get_codes_from_indices(indices)))
        return out.movedim(-1, 1) if self.is_channel_first else out


class GroupedResidualFSQ(GroupedStacks):
    """Features split into ``groups`` chunks, each quantized by its own :class:`ResidualFSQ`.

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(groups, b, n, q)``
        - ``accept_image_fmap``: ``(b, dim, h, w)`` -> ``(b, dim, h, w)``, indices ``(groups, b, h, w, q)``
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("groups", groups, minimum=1)
        if dim % groups:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups = dim, groups
        self.accept_image_fmap = check_bool("accept_image_fmap", accept_image_fmap)
        if kwargs.setdefault("is_channel_first", accept_image_fmap) != accept_image_fmap:
            raise ValueError(
                f"is_channel_first ({kwargs['is_channel_first']!r}) must equal accept_image_fmap "
                f"({accept_image_fmap}): the features are split along the axis the layers read them from"
            )
        self.rvqs = nn.ModuleList(ResidualFSQ(dim=dim // groups, **kwargs) for _ in range(groups))
        self.codebook_size = self.rvqs[0].codebook_size

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        check_input("x", x, min_ndim=3)  # before the split reads the feature axis
        return self._grouped_forward(
            x,
            None,
            return_all_codes=return_all_codes,
            rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
        )
