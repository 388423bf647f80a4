"""Latent quantization: a learnable grid of scalar values for every latent dimension.

Hsu, Dorrell, Whittington, Wu and Finn, "Disentanglement via Latent Quantization", NeurIPS 2023,
https://arxiv.org/abs/2305.18378.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .core.autograd import CommitmentAndQuantizationLoss
from .core.estimators import straight_through
from .core.inplace import step_if_rows
from .core.layout import parse_input
from .core.linear import project
from .core.radix import MAX_CODEBOOK_SIZE, digits_to_index, index_to_digits, radix_basis
from .core.recompute import stateful_forward
from .core.tensors import as_dtype
from .core.validate import (
    ArgumentRuntimeError,
    check_code_indices,
    check_float,
    check_int,
    check_int_sequence,
    check_optional_bool,
)

__all__ = ["LatentQuantize", "LatentQuantizer"]

# Largest block of |latent - value| distances held at once (tokens x latent dims x values): 32 MiB of float32.
MAX_DISTANCES = 2**23


def initial_values(level: int) -> Tensor:
    """The starting grid for one latent dimension: ``level`` values spread over [-0.5, 0.5].

    Odd levels include both ends and zero; even levels start at -0.5 and step by ``1 / level``, so zero is
    still on the grid.
    """
    if level % 2 == 1:
        return torch.linspace(-0.5, 0.5, level)
    return torch.arange(level) / level - 0.5


class _FixedValueGrids(nn.Module):
    """Value grids that are not learned (``optimize_values=False``): non-persistent buffers, indexable like
    the ``nn.ParameterList`` used when they are learned, and absent from the ``state_dict``."""

    def __init__(self, grids: Sequence[Tensor]):
        super().__init__()
        for i, grid in enumerate(grids):
            self.register_buffer(str(i), grid, persistent=False)

    def __len__(self) -> int:
        return len(self._buffers)

    def __getitem__(self, i: int) -> Tensor:
        return self._buffers[str(range(len(self))[i])]

    def __iter__(self):
        return iter(self._buffers.values())

    def grids(self) -> list[Tensor]:
        """The grids in order, as a list."""
        return list(self._buffers.values())


def _check_levels(levels, codebook_dim) -> tuple[int, ...]:
    codebook_dim = check_int("codebook_dim", codebook_dim)
    if isinstance(levels, bool) or not isinstance(levels, int):
        levels = check_int_sequence("levels", levels, minimum=1)
        if codebook_dim > 0 and codebook_dim != len(levels):
            raise ValueError(
                f"codebook_dim must equal len(levels) = {len(levels)} (or be <= 0 to take it from levels), "
                f"got {codebook_dim}"
            )
        return levels
    level = check_int("levels", levels, minimum=1)
    if codebook_dim <= 0:
        raise ArgumentRuntimeError(
            f"codebook_dim must be >= 1 when levels is a single int ({level}), got {codebook_dim}"
        )
    return (level,) * codebook_dim


def _check_loss_weight(name: str, value) -> float:
    return 0.0 if value is None else check_float(name, value, minimum=0.0)


class LatentQuantize(nn.Module):
    r"""Latent quantization (LQ): every latent dimension is snapped to the nearest value of its own small,
    learnable grid of scalars (Hsu et al. 2023, https://arxiv.org/abs/2305.18378).

    The input is projected to ``num_codebooks * codebook_dim`` latents (if that differs from ``dim``). Latent
    dimension :math:`i` has the grid :math:`v_i` of ``levels[i]`` values, initialised evenly over
    :math:`[-0.5, 0.5]` and shared by all codebooks. Each latent :math:`z_i` becomes
    :math:`\hat z_i = v_{i, k_i}` with :math:`k_i = \arg\min_k |z_i - v_{i,k}|` (first index on ties), and
    the index of a token is the mixed-radix number :math:`\sum_i k_i \prod_{j<i} L_j`. The output's gradient
    reaches the latents unchanged (straight-through estimator).

    In training the returned loss is
    :math:`w_c \cdot \mathrm{MSE}(\mathrm{sg}(x), \hat x) + w_q \cdot \mathrm{MSE}(\mathrm{sg}(\hat x), x)`
    between the input :math:`x` and the output :math:`\hat x`; the first term also
    trains the value grids (the paper's "quantization loss"), the second pulls the encoder towards its codes.
    In eval mode the loss is zero. Non-finite values (NaN, Inf) are left out of both mean squared errors and
    of the in-place optimizer's steps, so they never reach the value grids.

    Args:
        levels: number of values per latent dimension (a list), or one int used for ``codebook_dim`` dims.
        dim: feature size of the input.
        commitment_loss_weight: :math:`w_c`. ``None`` means 0.
        quantization_loss_weight: :math:`w_q`. ``None`` means 0.
        num_codebooks: latent groups per token, each quantized with the same grids.
        codebook_dim: latent dimensions per codebook; ``<= 0`` takes ``len(levels)``.
        keep_num_codebooks_dim: keep a codebook axis on the indices; always on when ``num_codebooks > 1``.
        optimize_values: the grids are ``nn.Parameter`` s (``values_per_latent.{i}`` in the state_dict);
            otherwise fixed buffers outside the state_dict. ``None`` turns it off too.
        in_place_codebook_optimizer: a factory ``params -> torch.optim.Optimizer``. When given, it is called
            once with the value grids, and every training forward takes one step of it on
            :math:`\mathrm{MSE}(v_{k}, \mathrm{sg}(z))` (grids towards the latents), then quantizes with the
            updated grids; the grids then learn only through these steps, not through the returned loss.
            Other parameters' gradients are not touched; skipped under ``torch.no_grad()``. Needs
            ``optimize_values=True``.

    Shape:
        - Input: channel-first images ``(b, dim, h, w)`` and video ``(b, dim, t, h, w)``; ``(b, n, dim)``
          sequences, or ``(b, dim, n)`` series when the last axis does not have ``dim`` features; ``(b, dim)``.
        - Output: ``(out, indices, loss)``: ``out`` has the input's shape and dtype; ``indices`` are int32 of
          shape ``(b, n)``, ``(b,)``, ``(b, h, w)`` or ``(b, t, h, w)``, with a trailing ``num_codebooks``
          axis when ``keep_num_codebooks_dim``; ``loss`` is a float32 scalar.

    Example::

        >>> quantizer = LatentQuantize(levels=[5, 5, 8], dim=16)
        >>> out, indices, loss = quantizer(torch.randn(1, 16, 32, 32))
        >>> out.shape, indices.shape, loss.shape
        (torch.Size([1, 16, 32, 32]), torch.Size([1, 32, 32]), torch.Size([]))
        >>> torch.equal(quantizer.indices_to_codes(indices), out)
        True
    """

    def __init__(
        self,
        levels: Sequence[int] | int,
        dim: int,
        commitment_loss_weight: float | None = 0.1,
        quantization_loss_weight: float | None = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool | None = True,
        in_place_codebook_optimizer: Callable[..., Optimizer] | None = None,
    ):
        super().__init__()
        levels = _check_levels(levels, codebook_dim)
        dim = check_int("dim", dim, minimum=1)
        commitment_loss_weight = _check_loss_weight("commitment_loss_weight", commitment_loss_weight)
        quantization_loss_weight = _check_loss_weight("quantization_loss_weight", quantization_loss_weight)
        num_codebooks = check_int("num_codebooks", num_codebooks, minimum=1)
        keep_num_codebooks_dim = check_optional_bool("keep_num_codebooks_dim", keep_num_codebooks_dim)
        optimize_values = bool(check_optional_bool("optimize_values", optimize_values))
        if in_place_codebook_optimizer is not None:
            if not callable(in_place_codebook_optimizer):
                raise TypeError(
                    "in_place_codebook_optimizer must be a callable params -> torch.optim.Optimizer, "
                    f"got {type(in_place_codebook_optimizer).__name__}"
                )
            if not optimize_values:
                raise ValueError("in_place_codebook_optimizer needs optimize_values=True (fixed grids cannot learn)")
        codebook_size = math.prod(levels)
        if codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(f"levels must multiply to at most 2**31 - 1 (int32 indices), got {levels}")

        self.dim = dim
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = bool(keep_num_codebooks_dim) or num_codebooks > 1
        self.codebook_size = codebook_size
        self.optimize_values = optimize_values

        self.register_buffer("commitment_loss_weight", torch.tensor(commitment_loss_weight), persistent=False)
        self.register_buffer("quantization_loss_weight", torch.tensor(quantization_loss_weight), persistent=False)
        self._register_index_buffers(levels)

        self.has_projections = dim != self.effective_codebook_dim
        self.project_in = nn.Linear(dim, self.effective_codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.effective_codebook_dim, dim) if self.has_projections else nn.Identity()

        grids = [initial_values(level) for level in levels]
        if optimize_values:
            self.values_per_latent = nn.ParameterList([nn.Parameter(grid) for grid in grids])
        else:
            self.values_per_latent = _FixedValueGrids(grids)

        self.in_place_codebook_optimizer = None
        if in_place_codebook_optimizer is not None:
            self.in_place_codebook_optimizer = in_place_codebook_optimizer(self.values_per_latent)

    def _register_index_buffers(self, levels: tuple[int, ...]) -> None:
        levels_t = torch.tensor(levels, dtype=torch.int64)
        longest = max(levels)
        starts = torch.cumsum(levels_t, 0) - levels_t
        # slot of every grid value in a (longest, codebook_dim) table padded with +inf
        slots = torch.cat([torch.arange(level) * len(levels) + i for i, level in enumerate(levels)])
        self.register_buffer("_levels", levels_t.to(torch.int32), persistent=False)
        self.register_buffer("_basis", radix_basis(levels).to(torch.int32), persistent=False)
        # int64 copies for the hot path (no conversion per call)
        self.register_buffer("_last_levels", levels_t - 1, persistent=False)
        self.register_buffer("_place_values", radix_basis(levels), persistent=False)
        self.register_buffer("_value_starts", starts, persistent=False)
        self.register_buffer("_padded_slots", slots, persistent=False)
        self._longest_level = longest

    # ----- value grids -----------------------------------------------------------------------------------

    def _grids(self) -> list[Tensor]:
        """The value grids, learned (a ``ParameterList``) or fixed."""
        if isinstance(self.values_per_latent, _FixedValueGrids):
            return self.values_per_latent.grids()
        return list(self.values_per_latent)

    def _flat_values(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """All grids concatenated, ``(sum(levels),)``; differentiable w.r.t. ``values_per_latent``."""
        return as_dtype(torch.cat(self._grids()), dtype)

    def _padded_grid(self, flat_values: Tensor) -> Tensor:
        """``(max(levels), 1, codebook_dim)`` table of the grids, one per column, padded with +inf (never nearest).
        Built from the values as they are (call it without gradient tracking)."""
        table = flat_values.new_full((self._longest_level * self.codebook_dim,), math.inf)
        table = table.index_copy(0, self._padded_slots, flat_values)
        return table.view(self._longest_level, 1, self.codebook_dim)

    @torch.no_grad()
    def _nearest_level_indices(self, latents: Tensor, flat_values: Tensor) -> Tensor:
        """``(..., k * codebook_dim)`` -> int64 position of the nearest value in each dimension's grid (the
        last axis holds ``k`` groups of ``codebook_dim`` latents); the first position on ties.

        The distances to every level are laid out ``(levels, tokens, codebook_dim)`` and reduced over the
        first axis (``min`` over a leading axis reads contiguous rows), at most ``MAX_DISTANCES`` at a time.
        """
        grid = self._padded_grid(flat_values)
        single_group = latents.ndim == 2 and latents.shape[1] == self.codebook_dim
        rows = latents if single_group else latents.reshape(-1, self.codebook_dim)
        chunk = max(1, MAX_DISTANCES // grid.numel())
        if rows.shape[0] <= chunk:
            nearest = _first_nearest(grid, rows)
        else:
            nearest = torch.cat([_first_nearest(grid, part) for part in rows.split(chunk)])
        # an infinite latent meets inf - inf = nan in the padding; keep its index inside the grid
        nearest = torch.minimum(nearest, self._last_levels)
        return nearest if single_group else nearest.view(latents.shape)

    def _values_at(self, flat_values: Tensor, level_indices: Tensor) -> Tensor:
        """Grid values at ``(..., k * codebook_dim)`` level indices (``k`` groups of ``codebook_dim``)."""
        grouped = level_indices.shape[-1] != self.codebook_dim
        positions = self._value_starts + (level_indices.reshape(-1, self.codebook_dim) if grouped else level_indices)
        # index_select: a faster forward and backward (index_add) than advanced indexing
        return flat_values.index_select(0, positions.view(-1)).view(level_indices.shape)

    def _level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        """``(..., codebook_dim)`` level indices -> int32 mixed-radix indices ``(...)``."""
        return digits_to_index(level_indices, self._place_values, torch.int32)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """``(...)`` code indices -> ``(..., codebook_dim)`` int64 positions in each grid."""
        return index_to_digits(indices, self._place_values, self._last_levels + 1)

    @property
    def implicit_codebook(self) -> Tensor:
        """``(codebook_size, codebook_dim)`` every code, from the current grids (enumerated on request)."""
        all_indices = torch.arange(self.codebook_size, device=self._levels.device)
        return self._values_at(self._flat_values(), self.indices_to_level_indices(all_indices)).detach()

    # ----- public pieces for custom training loops -----------------------------------------------------------------

    def quantization_loss(self, z: Tensor, zhat: Tensor, reduce: str = "mean") -> Tensor:
        """``MSE(sg(zhat), z)``: pulls ``z`` towards the codes."""
        return F.mse_loss(zhat.detach(), z, reduction=reduce)

    def commitment_loss(self, z: Tensor, zhat: Tensor, reduce: str = "mean") -> Tensor:
        """``MSE(sg(z), zhat)``: pulls ``zhat`` (and through it the value grids) towards ``z``."""
        return F.mse_loss(z.detach(), zhat, reduction=reduce)

    def quantize(self, z: Tensor) -> Tensor:
        """``(..., codebook_dim)`` latents -> nearest grid values, same shape and dtype, straight-through."""
        flat_values = self._flat_values()
        latents = as_dtype(z, _compute_dtype(z.dtype))
        codes = self._values_at(flat_values, self._nearest_level_indices(latents, flat_values))
        return as_dtype(straight_through(latents, codes), z.dtype)

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """``(..., codebook_dim)`` codes -> int32 indices ``(...)``: the nearest value of each current grid."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"zhat must have codebook_dim = {self.codebook_dim} on its last axis, got {tuple(zhat.shape)}"
            )
        return self._level_indices_to_indices(self._nearest_level_indices(zhat, self._flat_values()))

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Indices from :meth:`forward` -> the output they stand for (``project_out=True``) or the latent codes.

        Image and video indices (two or more spatial axes) give channel-first codes;
        sequence indices ``(b, n)`` give ``(b, n, d)``, the layout :meth:`forward` takes them in.
        Values outside ``[0, codebook_size)`` raise a ``ValueError``.
        """
        indices = check_code_indices("indices", indices, self.codebook_size, min_ndim=1)
        codes = self._values_at(self._flat_values(), self.indices_to_level_indices(indices)).detach()
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        spatial_axes = indices.ndim - 1 - int(self.keep_num_codebooks_dim)
        return codes.movedim(-1, 1) if spatial_axes >= 2 else codes

    def quantize_and_project(self, z: Tensor, is_img_or_video: bool, ps) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize already projected latents, project them out and lay out output and indices.

        Args:
            z: ``(b, n, num_codebooks, codebook_dim)`` latents.
            is_img_or_video: put the output's features on axis 1.
            ps: the packed shapes from ``einops.pack([x], "b * d")``: ``ps[0]`` is the spatial shape of ``n``.

        Returns:
            ``(codes (b, n, num_codebooks * codebook_dim), out (b, *spatial, dim) or channel-first, indices)``.
        """
        flat_values = self._flat_values()
        latents = as_dtype(z, _compute_dtype(z.dtype))
        level_indices = self._nearest_level_indices(latents, flat_values)
        codes = straight_through(latents, self._values_at(flat_values, level_indices), grad_to_q=True)
        codes = as_dtype(codes.flatten(-2), z.dtype)
        spatial = tuple(ps[0])
        out = self.project_out(codes)
        out = out.reshape(out.shape[0], *spatial, out.shape[-1])
        if is_img_or_video:
            out = out.movedim(-1, 1)
        indices = self._level_indices_to_indices(level_indices)
        indices = indices.reshape(indices.shape[0], *spatial, indices.shape[-1])
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return codes, out, indices

    # ----- training-time value updates -------------------------------------------------------------------

    def _step_values_in_place(self, latents: Tensor) -> None:
        """One step of the in-place optimizer on ``MSE(nearest values, sg(latents))``, other grads untouched.

        Non-finite latents are left out of the loss; when none is finite the grids keep their values (a step
        with zero gradients could still move them through the optimizer's momentum)."""
        params = self._grids()
        flat_values = self._flat_values(latents.dtype)
        chosen = self._values_at(flat_values, self._nearest_level_indices(latents, flat_values))
        finite = torch.isfinite(latents)
        loss = _finite_mse(latents.detach(), chosen, finite)
        grads = torch.autograd.grad(loss, params)
        saved = [p.grad for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        # this rank's grids only (no all-reduce), and the caller's gradients are put back afterwards
        step_if_rows(self.in_place_codebook_optimizer, params, finite.sum(), sync=False, zero_grad=False)
        for p, grad in zip(params, saved):
            p.grad = grad

    # ----- forward -----------------------------------------------------------------------------------------

    @stateful_forward  # activation checkpointing (core/recompute.py): refuses an in-place optimizer
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # images and video channel-first; a 3-d input (b, n, dim) when its last axis has the features, else a
        # (b, dim, n) series (only the last axis is compared: a dynamic sequence axis stays dynamic in export)
        channel_first = isinstance(z, Tensor) and (z.ndim >= 4 or (z.ndim == 3 and z.shape[-1] != self.dim))
        parsed = parse_input(z, dim=self.dim, channel_first=channel_first, name="z")
        x, layout, tokens = z, parsed.layout, parsed.tokens
        # one token per row; a copy for channel-first inputs, which the loss then reuses as its target
        token_rows = tokens.reshape(-1, self.dim)
        latents = project(self.project_in, token_rows)  # (tokens, num_codebooks * codebook_dim)
        latents = as_dtype(latents, _compute_dtype(latents.dtype))

        in_place = self.in_place_codebook_optimizer is not None and self.training and torch.is_grad_enabled()
        if in_place:
            self._step_values_in_place(latents)

        flat_values = self._flat_values(latents.dtype)
        level_indices = self._nearest_level_indices(latents, flat_values)
        chosen = self._values_at(flat_values, level_indices)

        out = self._project_out(straight_through(latents, chosen), x.dtype)
        out = layout.from_tokens(out.view(tokens.shape))
        indices = self._token_indices(level_indices, *tokens.shape[:2])
        indices = layout.indices_from_tokens(indices)

        if not self.training:
            return out, indices, torch.zeros((), device=x.device)
        return out, indices, self._loss(chosen, token_rows, learn_values=not in_place)

    def _loss(self, chosen: Tensor, token_rows: Tensor, learn_values: bool) -> Tensor:
        """The training loss between the projected codes and the input, one token per row.

        The codes project to the same values as the output, but the commitment term reaches only the chosen
        grid values and project_out, never the input: through the straight-through path its input gradient
        would cancel the quantization term's exactly when the two weights are equal, so the encoder gets no
        gradient from the loss. Only finite errors count (see
        :class:`~vector_quantize_pytorch.core.autograd.CommitmentAndQuantizationLoss`).
        """
        dtype = token_rows.dtype
        learn_values = learn_values and self.optimize_values and chosen.requires_grad
        projected = self._project_out(chosen if learn_values else chosen.detach(), dtype)
        return CommitmentAndQuantizationLoss.apply(
            projected, token_rows, self.commitment_loss_weight, self.quantization_loss_weight
        )

    def _token_indices(self, level_indices: Tensor, batch: int, num_tokens: int) -> Tensor:
        """Level indices of the tokens -> int32 code indices, with a codebook axis when it is kept.

        Shape:
            - level_indices: ``(batch * num_tokens, num_codebooks * codebook_dim)``
            - output: ``(batch, num_tokens, num_codebooks)`` or ``(batch, num_tokens)``
        """
        if self.num_codebooks > 1:
            level_indices = level_indices.view(-1, self.num_codebooks, self.codebook_dim)
        indices = self._level_indices_to_indices(level_indices)
        if self.keep_num_codebooks_dim:
            return indices.view(batch, num_tokens, self.num_codebooks)
        return indices.view(batch, num_tokens)

    def _project_out(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        """``(tokens, num_codebooks * codebook_dim)`` float32 codes -> ``(tokens, dim)`` outputs in ``dtype``."""
        return as_dtype(project(self.project_out, as_dtype(codes, dtype)), dtype)

    def extra_repr(self) -> str:
        return (
            f"levels={self._levels.tolist()}, dim={self.dim}, num_codebooks={self.num_codebooks}, "
            f"codebook_size={self.codebook_size}, optimize_values={self.optimize_values}"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype latents are quantized in: float64 stays, every other floating dtype becomes float32 (what
    ``torch.promote_types(dtype, torch.float32)`` gives for floating dtypes, without an operator call)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _first_nearest(grid: Tensor, rows: Tensor) -> Tensor:
    """Index of the nearest grid value for every latent: the first one on ties, the first NaN distance when
    there is one (as ``argmin``), and 0 where every distance is infinite.

    Shape:
        - grid: ``(L, 1, D)``, rows: ``(N, D)``
        - output: ``(N, D)`` int64
    """
    # min over the leading axis: about five times faster than argmin on a CPU, and the same first index
    return (grid - rows).abs_().min(0).indices


def _finite_mse(target: Tensor, prediction: Tensor, finite: Tensor) -> Tensor:
    """Mean squared error over the elements where ``finite`` is True (0 when there is none). Other elements are
    replaced by zeros before any arithmetic, so their gradient is exactly zero, not NaN."""
    zero = prediction.new_zeros(())
    error = torch.where(finite, prediction, zero) - torch.where(finite, target, zero)
    return error.pow(2).sum() / finite.sum().clamp(min=1)


LatentQuantizer = LatentQuantize
