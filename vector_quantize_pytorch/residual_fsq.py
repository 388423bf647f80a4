"""ResidualFSQ and GroupedResidualFSQ: residual finite scalar quantization."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor, nn

from .core.linear import project
from .core.residual import GroupedStacks, ResidualStack, check_layer_kwargs
from .core.tensors import as_dtype
from .core.validate import check_bool, check_input, check_int, check_int_sequence
from .finite_scalar_quantization import FSQ


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
    ``levels^i``, so that later layers resolve finer and finer grids.

    Args:
        levels: FSQ levels per code dimension.
        num_quantizers: depth ``q``.
        dim: input feature size (default ``len(levels)``); Linear projections when different.
        is_channel_first: inputs are ``(b, d, ...)``.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of,
            quantize_dropout_per_sample: as ResidualVQ.
        soft_clamp_input_value: tanh soft clamp before the layers (with ``bound_hard_clamp`` it is
            ``1 + 1/(L - 1)`` per dimension).
        bound_hard_clamp: the layers clamp instead of tanh-bound.
        **kwargs: passed to every FSQ layer.

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(b, n, q)`` int32
        - ``is_channel_first``: ``(b, dim, ...)`` -> ``(b, dim, ...)``, indices ``(b, ..., q)`` (the layer axis
          last, as the decoder reads it)

    Example::

        >>> rfsq = ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
        >>> quantized, indices = rfsq(torch.randn(1, 1024, 256))
        >>> indices.shape
        torch.Size([1, 1024, 8])
    """

    dropout_needs_grad = True  # no layers dropped under torch.no_grad(): dropout only shapes what training learns

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
        self._init_dropout(quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of,
                           quantize_dropout_per_sample, num_quantizers=num_quantizers)  # fmt: skip
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
        levels_t = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("scales", torch.stack([levels_t**-i for i in range(num_quantizers)]), persistent=False)
        if bound_hard_clamp:
            soft_clamp_input_value = 1 + 1 / (levels_t - 1)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)
        self._scale_rows, self._scales_of = None, None

    def _layer_scales(self) -> tuple[Tensor, ...]:
        """Every layer's row of ``scales``, as a tuple of views (no indexing operator per layer and call), taken
        again when ``.to()`` or a dtype conversion has replaced the buffer."""
        if self._scales_of is not self.scales:
            self._scale_rows, self._scales_of = self.scales.unbind(0), self.scales
        return self._scale_rows

    @property
    def codebooks(self) -> Tensor:
        """``(q, K, codebook_dim)`` implicit codebooks, unscaled (built on request)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def _quantize_layer(self, index, residual, mask, *, previous):
        scale = self._layer_scales()[index]
        quantized, indices = self.layers[index](as_dtype(residual, torch.float32) / scale)
        return as_dtype(quantized * scale, residual.dtype), indices, None

    def _layer_codes(self, index, indices, previous) -> Tensor:
        return self.layers[index].indices_to_codes(indices, project_out=False).float() * self.scales[index]

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        layout, tokens, _ = self._input_tokens(x, self.is_channel_first)
        h = project(self.project_in, tokens)
        if self.soft_clamp_input_value is not None:
            clamp = as_dtype(self.soft_clamp_input_value, h.dtype)
            h = (h / clamp).tanh() * clamp
        with torch.autocast(h.device.type, enabled=False):
            quantized, indices, _, _ = self._quantize_residuals(
                as_dtype(h, torch.float32), None, rand_quantize_dropout_fixed_seed
            )
        out = layout.from_tokens(as_dtype(project(self.project_out, as_dtype(quantized, h.dtype)), x.dtype))
        return self._forward_result(out, layout, indices, return_all_codes=return_all_codes)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for these indices in eval mode: ``(b, ..., q) -> (b, ..., dim)`` (channel-first
        when ``is_channel_first``)."""
        return self._decode_indices(indices, self.is_channel_first)


class GroupedResidualFSQ(GroupedStacks):
    """Features split into ``groups`` chunks, each quantized by its own :class:`ResidualFSQ`.

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(groups, b, n, q)``
        - ``accept_image_fmap``: ``(b, dim, h, w)`` -> ``(b, dim, h, w)``, indices ``(groups, b, h, w, q)``
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        self._init_groups(dim, groups, accept_image_fmap)
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
