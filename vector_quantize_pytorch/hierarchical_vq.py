"""HierarchicalVQ: VAR-style multi-scale residual vector quantization of feature maps."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import distributed
from .core.layout import lens_to_mask
from .core.tracing import is_exporting
from .core.validate import check_bool, check_code_indices, check_float, check_input, check_int, check_int_sequence
from .vector_quantize_pytorch import VectorQuantize

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Phi(nn.Module):
    """VAR's quantized-residual refinement ``phi``: ``(1 - r) q + r conv3x3(q)`` (identity when ``r = 0``).

    Args:
        dim: channels.
        spatial_dims: 1, 2 or 3 (Conv1d / Conv2d / Conv3d).
        resi_ratio: ``r``; its absolute value is used, as in VAR.
    """

    def __init__(self, dim: int, spatial_dims: int, resi_ratio: float):
        super().__init__()
        self.conv = _CONVS[spatial_dims](dim, dim, 3, padding=1)
        self.resi_ratio = abs(float(resi_ratio))

    def forward(self, q: Tensor) -> Tensor:
        if self.resi_ratio <= 1e-8:
            return q
        # under autocast the conv gives half precision; mix in q's dtype
        return q.lerp(self.conv(q).to(q.dtype), self.resi_ratio)


def to_level_shape(scale, spatial_dims: int, name: str = "scales") -> tuple[int, ...]:
    """A scale (an int, or one int per spatial axis) -> the level's spatial shape."""
    if isinstance(scale, bool):
        raise TypeError(f"{name} entries must be ints or sequences of ints, got {scale!r}")
    if isinstance(scale, int):
        return (check_int(name, scale, minimum=1),) * spatial_dims
    shape = check_int_sequence(name, scale, minimum=1)
    if len(shape) != spatial_dims:
        raise ValueError(f"{name} entry {scale!r} must have {spatial_dims} sizes (one per spatial axis)")
    return shape


class HierarchicalVQ(nn.Module):
    r"""Multi-scale residual quantization of VAR (Tian et al. 2024, "Visual Autoregressive Modeling:
    Scalable Image Generation via Next-Scale Prediction", arXiv 2404.02905).

    A feature map ``f`` is encoded as token maps of increasing resolution. For each level ``l`` (scales
    non-decreasing) the residual is average-pooled to the level's shape, quantized with a
    :class:`VectorQuantize` (one shared by every level, or one per level), upsampled back to the full
    shape (linear / bilinear / trilinear) and refined by a convolution ``phi``::

        r_0 = f
        z_l = VQ(pool_l(r_l)),       h_l = phi_l(up(z_l))
        r_{l+1} = r_l - h_l,         f_hat = sum_l h_l

    ``phi_l(q) = (1 - quant_resi) q + quant_resi conv3x3(q)``: one convolution shared by every level
    (``share_quant_resi=1``), one per level (``<= 0``), or ``n`` convolutions assigned to levels by
    relative depth. The quantizer is a VectorQuantize with EMA codebook, k-means initialisation and dead-code
    expiry by default (the VQ arguments below are passed to it).

    Inputs are 1-d sequences ``(b, c, l)`` by default, feature maps ``(b, c, h, w)`` with
    ``accept_image_fmap=True``, or volumes ``(b, c, t, h, w)`` with ``accept_3d_fmap=True`` (channel axis
    last with ``channel_first=False``). With ``nested_dropout > 0`` a training forward keeps, with that
    probability, only the first levels of the reconstruction (same choice on every rank; this reads a
    shared random seed on the host).

    Args:
        dim: channels ``c``.
        codebook_size: codes per codebook; a tuple gives one size per level (needs ``shared_codebook=False``
            unless all equal).
        scales: per level an int (square / cubic) or one size per spatial axis, non-decreasing.
        shared_codebook: one VectorQuantize for every level (state keys ``vq.*``), else one per level (``vqs.*``).
        channel_first: channels on axis 1.
        sync_codebook, decay, commitment_weight, rotation_trick, kmeans_init, kmeans_iters,
            threshold_ema_dead_code, stochastic_sample_codes, sample_codebook_temp, orthogonal_reg_weight,
            orthogonal_reg_max_codes, orthogonal_reg_active_codes_only: passed to VectorQuantize.
        quant_resi: weight of the convolution in ``phi``.
        share_quant_resi: number of ``phi`` convolutions (1: shared, ``<= 0``: one per level).
        nested_dropout: probability of truncating the levels in a training forward.
        nested_dropout_min_levels: levels always kept when truncating.
        accept_image_fmap / accept_3d_fmap: 2-d / 3-d inputs.

    Shape:
        - input ``(b, c, *spatial)`` -> reconstruction ``(b, c, *spatial)``, indices: a tuple with one
          ``(b, *level_shape)`` int64 tensor per level, loss ``()`` (mean commitment loss over levels)

    Example::

        >>> hvq = HierarchicalVQ(dim=32, codebook_size=64, scales=(1, 2, 4, 8), accept_image_fmap=True)
        >>> x = torch.randn(2, 32, 8, 8)
        >>> recon, indices, loss = hvq(x)
        >>> [tuple(i.shape) for i in indices]
        [(2, 1, 1), (2, 2, 2), (2, 4, 4), (2, 8, 8)]
        >>> _ = hvq.eval()
        >>> recon, indices, _ = hvq(x)
        >>> torch.equal(hvq.get_output_from_indices(indices, full_shape=(8, 8)), recon)
        True
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int | tuple[int, ...],
        scales: Sequence[int | Sequence[int]],
        shared_codebook: bool = True,
        channel_first: bool = True,
        sync_codebook: bool | None = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 0.1,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_max_codes: int | None = 128,
        orthogonal_reg_active_codes_only: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 1,
        nested_dropout: float = 0.0,
        nested_dropout_min_levels: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
    ):
        super().__init__()
        check_int("dim", dim, minimum=1)
        for name, value in (
            ("shared_codebook", shared_codebook),
            ("channel_first", channel_first),
            ("accept_image_fmap", accept_image_fmap),
            ("accept_3d_fmap", accept_3d_fmap),
        ):
            check_bool(name, value)
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        check_float("quant_resi", quant_resi)
        check_int("share_quant_resi", share_quant_resi)
        check_float("nested_dropout", nested_dropout, minimum=0.0, maximum=1.0)
        check_int("nested_dropout_min_levels", nested_dropout_min_levels, minimum=1)

        spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        level_shapes = _level_shapes(scales, spatial_dims)
        codebook_sizes = _codebook_sizes(codebook_size, len(level_shapes), shared_codebook)

        self.dim = dim
        self.spatial_dims = spatial_dims
        self.channel_first = channel_first
        self.scales = tuple(scales)
        self.level_shapes = level_shapes
        self.num_levels = len(level_shapes)
        self.codebook_sizes = codebook_sizes
        self.nested_dropout = float(nested_dropout)
        self.nested_dropout_min_levels = nested_dropout_min_levels

        vq_kwargs = dict(
            dim=dim,
            decay=decay,
            commitment_weight=commitment_weight,
            rotation_trick=rotation_trick,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            stochastic_sample_codes=stochastic_sample_codes,
            sample_codebook_temp=sample_codebook_temp,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
            orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            sync_codebook=sync_codebook,
        )
        self.vq = self.vqs = None
        if shared_codebook:
            self.vq = VectorQuantize(codebook_size=codebook_sizes[0], **vq_kwargs)
        else:
            self.vqs = nn.ModuleList([VectorQuantize(codebook_size=size, **vq_kwargs) for size in codebook_sizes])

        self.phi_shared = self.phi_levels = None
        if share_quant_resi == 1:
            self.phi_shared = Phi(dim, spatial_dims, quant_resi)
        else:
            count = self.num_levels if share_quant_resi <= 0 else min(self.num_levels, share_quant_resi)
            self.phi_levels = nn.ModuleList([Phi(dim, spatial_dims, quant_resi) for _ in range(count)])

    # ------------------------------------------------------------------ per-level parts

    def get_vq(self, level_index: int) -> VectorQuantize:
        return self.vq if self.vq is not None else self.vqs[level_index]

    def choose_phi(self, level_index: int) -> Phi:
        """The shared ``phi``, or the one nearest to the level's relative depth ``l / (L - 1)``."""
        if self.phi_shared is not None:
            return self.phi_shared
        count = len(self.phi_levels)
        position = level_index / max(self.num_levels - 1, 1)
        return self.phi_levels[round(position * (count - 1))]  # Python's round (half to even)

    def pool_residual(self, residual: Tensor, level_shape: tuple[int, ...], mask: Tensor | None = None):
        """Average-pool ``(b, c, *spatial)`` to the level's shape, over valid positions only when masked.

        Returns:
            ``(pooled (b, c, *level_shape), level mask (b, *level_shape) bool or None)``: a level position
            is valid when it pools at least one valid position.
        """
        pool = _POOLS[self.spatial_dims]
        if mask is None:
            return pool(residual, level_shape), None
        weights = mask.unsqueeze(1).to(residual.dtype)
        pooled_weights = pool(weights, level_shape)
        if all(s == 1 for s in level_shape):
            spatial = tuple(range(2, residual.ndim))
            total = (residual * weights).sum(dim=spatial, keepdim=True)
            pooled = total / weights.sum(dim=spatial, keepdim=True).clamp(min=1e-5)
        else:
            pooled = pool(residual * weights, level_shape) / pooled_weights.clamp(min=1e-6)
        return pooled, pooled_weights.squeeze(1) > 0

    def upsample_to_full(self, q: Tensor, full_shape: tuple[int, ...], level_index: int) -> Tensor:
        """Interpolate a level's codes ``(b, c, *level_shape)`` to ``full_shape`` and apply its ``phi``."""
        if is_exporting() or tuple(q.shape[2:]) != tuple(full_shape):  # exported: any size
            q = F.interpolate(q, size=full_shape, mode=_INTERPOLATION[self.spatial_dims], align_corners=False)
        return self.choose_phi(level_index)(q)

    def _level_output(self, tokens: Tensor, full_shape: tuple[int, ...], level_index: int) -> Tensor:
        """Quantized tokens ``(b, n, c)`` of a level -> its contribution ``(b, c, *full_shape)``."""
        q = tokens.transpose(1, 2).reshape(tokens.shape[0], self.dim, *self.level_shapes[level_index])
        return self.upsample_to_full(q, full_shape, level_index)

    def sample_nested_cutoff(self, device: torch.device | None = None) -> int | None:
        """Index of the last level kept by nested dropout in this training step (None: all kept)."""
        min_levels = self.nested_dropout_min_levels
        if not self.training or self.nested_dropout <= 0 or self.num_levels <= 1 or min_levels >= self.num_levels:
            return None
        rng = random.Random(distributed.shared_seed())
        if rng.random() >= self.nested_dropout:
            return None
        return rng.randrange(min_levels - 1, self.num_levels - 1)

    # ------------------------------------------------------------------ forward and decode

    def forward(
        self,
        x: Tensor,
        indices=None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        sample_codebook_temp: float | None = None,
        return_cutoff: bool = False,
    ):
        if indices is not None:
            raise ValueError("forward does not take indices; decode them with get_output_from_indices")
        full_shape = self._check_input(x)
        mask = self._full_mask(mask, lens, x, full_shape)
        x = x if self.channel_first else x.movedim(-1, 1)
        vq_kwargs = {} if sample_codebook_temp is None else {"sample_codebook_temp": sample_codebook_temp}

        residual, reconstruction = x, None
        partial_reconstructions, all_indices, level_losses = [], [], []
        for level_index, level_shape in enumerate(self.level_shapes):
            pooled, level_mask = self.pool_residual(residual, level_shape, mask)
            tokens = pooled.flatten(2).transpose(1, 2)  # (b, n, c)
            level_mask = None if level_mask is None else level_mask.flatten(1)
            quantized, level_indices, loss = self.get_vq(level_index)(tokens, mask=level_mask, **vq_kwargs)

            contribution = self._level_output(quantized, full_shape, level_index)
            reconstruction = contribution if reconstruction is None else reconstruction + contribution
            residual = residual - contribution

            partial_reconstructions.append(reconstruction)
            all_indices.append(level_indices.reshape(x.shape[0], *level_shape))
            level_losses.append(loss)

        cutoff = self.sample_nested_cutoff(x.device)
        losses = torch.stack(level_losses)
        if cutoff is not None:
            reconstruction = partial_reconstructions[cutoff]
            losses = losses[: cutoff + 1]
        if mask is not None:
            reconstruction = torch.where(mask.unsqueeze(1), reconstruction, torch.zeros_like(reconstruction))
        reconstruction = reconstruction if self.channel_first else reconstruction.movedim(1, -1)

        if return_cutoff:
            return reconstruction, tuple(all_indices), losses.mean(), cutoff
        return reconstruction, tuple(all_indices), losses.mean()

    def get_output_from_indices(self, indices, full_shape: int | Sequence[int] | None = None) -> Tensor:
        """The reconstruction for the indices of every level; equal to the eval forward's output when
        ``full_shape`` is the input's spatial shape. Index -1 contributes a zero code; any other value outside
        ``[0, codebook_size)`` of its level raises a ``ValueError`` naming the level.

        Args:
            indices: one ``(b, *level_shape)`` integer tensor per level, as forward returns them.
            full_shape: spatial shape of the output; default: the last level's shape (the decoder cannot
                know the input's shape otherwise).

        Shape:
            - output ``(b, c, *full_shape)`` (``(b, *full_shape, c)`` with ``channel_first=False``)
        """
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise TypeError(f"indices must be a tuple of {self.num_levels} tensors (one per level)")
        batch = indices[0].shape[0] if isinstance(indices[0], Tensor) else None
        for level_index, level_indices in enumerate(indices):
            expected = (batch, *self.level_shapes[level_index])
            if not isinstance(level_indices, Tensor) or tuple(level_indices.shape) != expected:
                got = tuple(level_indices.shape) if isinstance(level_indices, Tensor) else type(level_indices)
                raise ValueError(f"indices[{level_index}] must have shape (b, *level_shape) = {expected}, got {got}")
        indices = [
            check_code_indices(f"indices[{i}]", level_indices, self.get_vq(i).codebook_size, allow_dropped=True)
            for i, level_indices in enumerate(indices)
        ]
        full_shape = (
            self.level_shapes[-1] if full_shape is None else to_level_shape(full_shape, self.spatial_dims, "full_shape")
        )

        reconstruction = None
        for level_index, level_indices in enumerate(indices):
            tokens = self.get_vq(level_index).get_output_from_indices(level_indices.flatten(1))  # (b, n, c)
            contribution = self._level_output(tokens, full_shape, level_index)
            reconstruction = contribution if reconstruction is None else reconstruction + contribution
        return reconstruction if self.channel_first else reconstruction.movedim(1, -1)

    # ------------------------------------------------------------------ input checks

    def _check_input(self, x: Tensor) -> tuple[int, ...]:
        ndim = 2 + self.spatial_dims
        check_input("x", x, min_ndim=ndim, max_ndim=ndim)
        channel_axis = 1 if self.channel_first else -1
        if x.shape[channel_axis] != self.dim:
            layout = ("(b, c, ...)" if self.channel_first else "(b, ..., c)") + f" with c = {self.dim}"
            raise ValueError(f"x must have shape {layout} and {self.spatial_dims} spatial axes, got {tuple(x.shape)}")
        return tuple(x.shape[2:]) if self.channel_first else tuple(x.shape[1:-1])

    def _full_mask(self, mask, lens, x: Tensor, full_shape: tuple[int, ...]) -> Tensor | None:
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("lens is only supported for 1-d sequences; pass a mask for images and volumes")
            mask = lens_to_mask(lens.to(x.device), full_shape[0])
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (x.shape[0], *full_shape):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape (b, *spatial) = {(x.shape[0], *full_shape)}, got {got}")
        return mask.to(x.device).bool()


def _level_shapes(scales, spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise TypeError(f"scales must be a non-empty sequence of ints or of per-axis sizes, got {scales!r}")
    shapes = tuple(to_level_shape(scale, spatial_dims) for scale in scales)
    for previous, current in zip(shapes, shapes[1:]):
        if any(a > b for a, b in zip(previous, current)):
            raise ValueError(f"scales must be non-decreasing along every axis, got {scales!r}")
    return shapes


def _codebook_sizes(codebook_size, num_levels: int, shared_codebook: bool) -> tuple[int, ...]:
    if isinstance(codebook_size, int) and not isinstance(codebook_size, bool):
        return (check_int("codebook_size", codebook_size, minimum=1),) * num_levels
    sizes = check_int_sequence("codebook_size", codebook_size, minimum=1)
    if len(sizes) != num_levels:
        raise ValueError(f"codebook_size must have one entry per level ({num_levels}), got {codebook_size!r}")
    if shared_codebook and len(set(sizes)) != 1:
        raise ValueError(f"shared_codebook=True needs a single codebook size, got codebook_size={codebook_size!r}")
    return sizes
