"""ResidualSimVQ: residual quantization with SimVQ layers."""

from __future__ import annotations

from torch import Tensor, nn

from .core.residual import ResidualStack
from .core.validate import check_bool, check_int
from .sim_vq import SimVQ


class ResidualSimVQ(ResidualStack):
    """Residual quantization (SoundStream, Algorithm 1) whose layers are :class:`SimVQ` quantizers: frozen
    codebooks reparameterised by learned linear maps (Zhu et al. 2024).

    Args:
        dim: input feature size (also the code size).
        num_quantizers: depth ``q``.
        codebook_size: codes per layer.
        heads: must be 1.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of,
            quantize_dropout_per_sample: as ResidualVQ.
        channel_first: inputs are ``(b, dim, ...)``.
        rotation_trick: gradient estimator of the layers.
        **sim_vq_kwargs: passed to every SimVQ layer.

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(b, n, q)``, losses ``(q,)``
        - ``channel_first``: ``(b, dim, h, w)`` -> ``(b, dim, h, w)``, indices ``(b, h, w, q)``
        - ``return_all_codes``: codes ``(q, b, n, dim)`` (``(q, b, dim, h, w)`` with ``channel_first``)

    Example::

        >>> rsim = ResidualSimVQ(dim=64, num_quantizers=4, codebook_size=128)
        >>> quantized, indices, losses = rsim(torch.randn(2, 16, 64))
        >>> indices.shape, losses.shape
        (torch.Size([2, 16, 4]), torch.Size([4]))
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        quantize_dropout_per_sample: bool = False,
        **sim_vq_kwargs,
    ):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("num_quantizers", num_quantizers, minimum=1)
        if check_int("heads", heads) != 1:
            raise ValueError(f"heads must be 1 for ResidualSimVQ, got {heads}")
        self.dim = dim
        self.channel_first = check_bool("channel_first", channel_first)
        self._init_dropout(quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of,
                           quantize_dropout_per_sample, num_quantizers=num_quantizers)  # fmt: skip
        self.layers = nn.ModuleList(
            SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick, **sim_vq_kwargs)
            for _ in range(num_quantizers)
        )

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.layers[0].codebook_dim

    def _layer_codes(self, index, indices, previous) -> Tensor:
        return self.layers[index].indices_to_codes(indices)

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        layout, tokens, _ = self._input_tokens(x, self.channel_first)
        quantized, indices, losses, _ = self._quantize_residuals(tokens, None, rand_quantize_dropout_fixed_seed)
        return self._forward_result(layout.from_tokens(quantized), layout, indices, losses, return_all_codes)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Every layer's codes; index -1 gives zeros. ``(b, ..., q') -> (q, b, ..., dim)``
        (``(q, b, dim, ...)`` with ``channel_first``)."""
        codes = self._all_layer_codes(indices)
        return codes.movedim(-1, 2) if self.channel_first else codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for these indices in eval mode (the sum of every layer's codes)."""
        return self._sum_in_layer_order(self.get_codes_from_indices(indices))
