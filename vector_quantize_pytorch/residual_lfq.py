"""ResidualLFQ and GroupedResidualLFQ: residual lookup-free quantization."""

from __future__ import annotations

import math

from torch import Tensor, nn

from .core.linear import project
from .core.residual import GroupedStacks, ResidualStack, check_layer_kwargs
from .core.validate import check_float, check_input, check_int
from .lookup_free_quantization import LFQ


class ResidualLFQ(ResidualStack):
    """Residual LFQ: layer ``i`` is an LFQ whose codes are ``+-2^-i``, quantizing what earlier layers left.

    Args:
        dim: input feature size; Linear projections to ``log2(codebook_size)`` when different.
        num_quantizers: depth ``q``.
        codebook_size: codes per layer (a power of 2).
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of,
            quantize_dropout_per_sample: as ResidualVQ.
        soft_clamp_input_value: tanh soft clamp of the first layer, halved at every later layer.
        **lfq_kwargs: passed to every LFQ layer (entropy_loss_weight, commitment_loss_weight, ...).

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(b, n, q)``, aux losses ``(q,)``
        - channel-first images/video ``(b, dim, ...)`` -> ``(b, dim, ...)``, indices ``(b, ..., q)``

    Example::

        >>> rlfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)
        >>> quantized, indices, losses = rlfq(torch.randn(1, 1024, 256))
        >>> indices.shape, losses.shape
        (torch.Size([1, 1024, 8]), torch.Size([8]))
    """

    dropout_needs_grad = True  # no layers dropped under torch.no_grad(): dropout only shapes what training learns

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | None = None,
        quantize_dropout_per_sample: bool = False,
        **lfq_kwargs,
    ):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("num_quantizers", num_quantizers, minimum=1)
        check_int("codebook_size", codebook_size, minimum=2)
        if codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {codebook_size}")
        self._init_dropout(quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of,
                           quantize_dropout_per_sample, num_quantizers=num_quantizers)  # fmt: skip
        check_layer_kwargs(lfq_kwargs)
        if soft_clamp_input_value is not None:
            check_float("soft_clamp_input_value", soft_clamp_input_value, minimum=0.0, min_exclusive=True)
        codebook_dim = int(math.log2(codebook_size))
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        layers = []
        for index in range(num_quantizers):
            layers.append(
                LFQ(
                    dim=codebook_dim,
                    codebook_size=codebook_size,
                    codebook_scale=2**-index,
                    soft_clamp_input_value=soft_clamp_input_value,
                    **lfq_kwargs,
                )
            )
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        self.layers = nn.ModuleList(layers)
        self.codebook_size = codebook_size

    def _layer_codes(self, index, indices, previous) -> Tensor:
        return self.layers[index].indices_to_codes(indices, project_out=False)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        layout, tokens, mask = self._input_tokens(x, None, mask)
        h = project(self.project_in, tokens)
        quantized, indices, losses, _ = self._quantize_residuals(h, mask, rand_quantize_dropout_fixed_seed)
        out = layout.from_tokens(project(self.project_out, quantized).to(x.dtype))
        return self._forward_result(out, layout, indices, losses, return_all_codes)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for these indices in eval mode: ``(b, ..., q) -> (b, ..., dim)``
        (channel-first for image/video indices)."""
        return self._decode_indices(indices, indices.ndim >= 4)


class GroupedResidualLFQ(GroupedStacks):
    """Features split into ``groups`` chunks, each quantized by its own :class:`ResidualLFQ`.

    Args:
        dim, groups, accept_image_fmap: as :class:`GroupedResidualVQ`.
        **kwargs: passed to every group's :class:`ResidualLFQ`.

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(groups, b, n, q)``, losses ``(groups, q)``
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        self._init_groups(dim, groups, accept_image_fmap)
        self.rvqs = nn.ModuleList(ResidualLFQ(dim=dim // groups, **kwargs) for _ in range(groups))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        # the layers read features from axis 1 exactly for 4-d and larger inputs: the split must agree
        check_input("x", x, min_ndim=4 if self.accept_image_fmap else 3, max_ndim=None if self.accept_image_fmap else 3)
        return self._grouped_forward(
            x,
            None,
            mask=mask,
            return_all_codes=return_all_codes,
            rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
        )
