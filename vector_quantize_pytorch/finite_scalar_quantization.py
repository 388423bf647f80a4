"""Finite Scalar Quantization (FSQ): VQ-VAE Made Simple, Mentzer et al. 2023, arXiv 2309.15505.

Each of the ``D = len(levels)`` code dimensions is bounded and rounded to one of ``L_i`` values; the
implicit codebook is the product grid of ``prod(levels)`` points. A code's index is its mixed-radix number
(see :mod:`vector_quantize_pytorch.core.radix`), so neither indices nor codes ever enumerate the grid.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .core.autograd import floor_ste, round_ste
from .core.layout import parse_input
from .core.linear import project
from .core.radix import (
    INT64_CODEBOOK_LIMIT,
    codebook_size_of,
    digits_to_index,
    index_dtype_for,
    index_to_digits,
    radix_basis,
)
from .core.tensors import as_dtype
from .core.validate import (
    check_arguments,
    check_code_indices,
    check_float,
    check_int_sequence,
)

IMPLICIT_CODEBOOK_MAX_CODES = 2**26  # `implicit_codebook` refuses to enumerate more codes than this


DEFAULT_BOUND_EPS = 1e-3

_ARGUMENTS = {
    "int": {"num_codebooks": 1},
    "optional_int": {"dim": 1},
    "float": {"noise_dropout": (0.0, 1.0)},
    "bool": ("preserve_symmetry", "channel_first", "projection_has_bias", "return_indices", "force_quantization_f32",
             "bound_hard_clamp", "orthogonal_rotation"),
    "optional_bool": ("keep_num_codebooks_dim",),
}  # fmt: skip
_STORED_OPTIONS = (
    "scale", "channel_first", "return_indices", "force_quantization_f32", "preserve_symmetry", "bound_hard_clamp",
    "orthogonal_rotation",
)  # fmt: skip


def _checked_levels(args: dict) -> tuple[tuple[int, ...], int]:
    """``(levels, codebook_size)`` after the checks that involve the levels."""
    levels = check_int_sequence("levels", args["levels"], minimum=2)
    if 2 in levels and not args["preserve_symmetry"]:
        raise ValueError(
            f"levels={list(levels)} has a level of 2, which needs preserve_symmetry=True: with the default "
            "bound a 2-level dimension maps nearly every input to one level. Use levels >= 3 or "
            "preserve_symmetry=True"
        )
    if args["scale"] is not None:
        check_float("scale", args["scale"])
    if args["noise_dropout"] > 0 and not args["preserve_symmetry"]:
        raise ValueError(f"noise_dropout={float(args['noise_dropout'])} needs preserve_symmetry=True")
    codebook_size = codebook_size_of(levels)
    if args["return_indices"] and codebook_size > INT64_CODEBOOK_LIMIT:
        raise ValueError(
            f"levels={list(levels)} give {codebook_size} codes, more than int64 indices can number "
            f"({INT64_CODEBOOK_LIMIT}); use fewer levels or return_indices=False"
        )
    return tuple(levels), codebook_size


class _LevelConstants(NamedTuple):
    bound: tuple[Tensor, Tensor, Tensor, Tensor]  # half range, offset, shift and atanh(shift) of the bound
    half_width: Tensor  # L // 2, exactly, as a float
    levels_minus_1: Tensor  # int64, as the bound multiplies by it (keeps a bf16 input's dtype)
    lowest_level: Tensor  # the lower clamp of level indices, as a tensor like the upper
    symmetric_step: Tensor  # 2 / (L - 1)

    @classmethod
    def of(cls, levels: Tensor) -> _LevelConstants:
        half_range = (levels - 1) * (1 + DEFAULT_BOUND_EPS) / 2
        offset = (levels % 2 == 0) * 0.5
        shift = offset / half_range
        half_width = (levels // 2).to(half_range.dtype)
        return cls((half_range, offset, shift, torch.atanh(shift)), half_width, levels - 1, torch.zeros_like(levels),
                   2.0 / (levels - 1))  # fmt: skip


def _check_dtypes(name: str, value) -> tuple[torch.dtype, ...]:
    if isinstance(value, torch.dtype):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(d, torch.dtype) for d in value):
        raise TypeError(f"{name} must be a tuple of torch.dtype, got {value!r}")
    return tuple(value)


class FSQ(nn.Module):
    r"""Finite Scalar Quantization (Mentzer et al. 2023, arXiv 2309.15505).

    The (optionally projected) input is split into ``num_codebooks`` groups of ``D = len(levels)`` values.
    Value ``i`` of a group is bounded to ``L_i`` levels and rounded with a straight-through gradient:

    * default bound (the paper's): ``round(tanh(z + shift) * h - offset) / (L // 2)`` with
      ``h = (L - 1)(1 + eps) / 2``, ``offset = 0.5`` for even ``L`` (0 for odd) and ``shift = atanh(offset / h)``;
    * ``preserve_symmetry=True`` (arXiv 2411.19842, section 3.2):
      ``2 / (L - 1) * floor((L - 1)(tanh(z) + 1) / 2 + 0.5) - 1``, levels symmetric around 0.

    The index of a code is the mixed-radix number of its per-dimension level indices with radices
    ``levels`` (``index = sum_i d_i * prod_{j<i} L_j``), computed exactly in integers; indices are int32
    when ``prod(levels) <= 2**31`` and int64 beyond, up to ``2**63``. The codebook is
    never enumerated: ``implicit_codebook`` is built only when read.

    Quantization runs in float32 with autocast disabled (unless ``force_quantization_f32=False``), so the
    indices are exact under bf16/fp16 autocast; the output has the input's dtype.

    Args:
        levels: number of levels of each code dimension; ``codebook_size = prod(levels)``. Every level must
            be >= 2; a level of 2 needs ``preserve_symmetry=True`` (ValueError otherwise): with the default
            bound the single boundary of a 2-level dimension sits at ``z = atanh(0.999) = -3.8``, so nearly
            every input would map to the same level.
        dim: input feature size. Default: ``len(levels) * num_codebooks``; if different, Linear projections
            ``project_in`` / ``project_out`` are added.
        num_codebooks: groups the projected features are split into, each quantized with ``levels``.
        keep_num_codebooks_dim: keep a trailing codebook axis on the indices. Default: ``num_codebooks > 1``
            (must be True then).
        scale: accepted for compatibility and unused.
        allowed_dtypes: input dtypes quantized as they are; others are upcast to float32.
        channel_first: input is ``(b, d, ...)``; inputs with 4 or more dimensions are always channel-first.
        projection_has_bias: bias of the projections.
        return_indices: compute indices (else ``forward`` returns None for them).
        force_quantization_f32: quantize in float32 with autocast disabled.
        preserve_symmetry: use the symmetry-preserving quantizer.
        noise_dropout: in training, each quantized value is replaced with probability ``noise_dropout`` by
            itself plus uniform noise in ``[-0.5, 0.5)``, clamped to ``[-1, 1]`` (needs
            ``preserve_symmetry``). Indices are always those of the noise-free codes.
        bound_hard_clamp: bound by clamping to ``[-1, 1]`` instead of ``tanh`` (for pre-clamped inputs).
        orthogonal_rotation: rotate each group by a fixed random orthogonal matrix (buffer
            ``orthogonal_rot``) before quantization and back after.

    Shape:
        - Input: ``(b, n, dim)``, ``(b, dim)``, channel-first ``(b, dim, n)`` with ``channel_first=True``,
          images ``(b, dim, h, w)`` or video ``(b, dim, t, h, w)``.
        - Output: ``(out, indices)``: ``out`` of the input's shape and dtype; ``indices`` ``(b, n)``,
          ``(b,)``, ``(b, h, w)``, ``(b, t, h, w)``, with a trailing ``num_codebooks`` axis when
          ``keep_num_codebooks_dim``; None when ``return_indices=False``.

    Example::

        >>> quantizer = FSQ(levels=[8, 5, 5, 5])
        >>> x = torch.randn(1, 1024, 4)
        >>> xhat, indices = quantizer(x)
        >>> xhat.shape, indices.shape
        (torch.Size([1, 1024, 4]), torch.Size([1, 1024]))
        >>> assert torch.equal(xhat, quantizer.indices_to_codes(indices))
    """

    def __init__(
        self,
        levels: list[int] | tuple[int, ...],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        args = dict(locals())
        check_arguments(args, **_ARGUMENTS)
        levels, codebook_size = _checked_levels(args)
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError(
                f"keep_num_codebooks_dim must be True when num_codebooks > 1, got num_codebooks={num_codebooks}"
            )
        effective_codebook_dim = len(levels) * num_codebooks
        self.levels, self.codebook_dim, self.codebook_size = levels, len(levels), codebook_size
        self.num_codebooks, self.effective_codebook_dim = num_codebooks, effective_codebook_dim
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = effective_codebook_dim if dim is None else dim
        self.allowed_dtypes = _check_dtypes("allowed_dtypes", allowed_dtypes)
        self.noise_dropout = float(noise_dropout)
        for name in _STORED_OPTIONS:
            setattr(self, name, args[name])

        self.has_projections = self.dim != effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", radix_basis(levels), persistent=False)
        self._constants, self._constants_of = None, None
        if orthogonal_rotation:
            if len(set(levels)) > 1:
                warnings.warn(
                    "orthogonal_rotation is not recommended for FSQ with levels that differ across dimensions",
                    stacklevel=2,
                )
            self.register_buffer("orthogonal_rot", nn.init.orthogonal_(torch.empty(len(levels), len(levels))))

    def _level_constants(self) -> _LevelConstants:
        """Per-dimension constants of the bounds, computed from the int64 ``_levels`` with exactly the arithmetic
        (and float32 results) the bounds would otherwise repeat on every call. Kept as plain attributes, not
        buffers, so that ``.half()`` cannot round them; computed again when ``_levels`` moves to another device
        (``.to()`` replaces the buffer)."""
        if self._constants_of is not self._levels:
            self._constants, self._constants_of = _LevelConstants.of(self._levels), self._levels
        return self._constants

    @property
    def index_dtype(self) -> torch.dtype:
        """int32 when ``codebook_size <= 2**31``, else int64 (an int32 could not number the codes)."""
        return index_dtype_for(self.codebook_size)

    @property
    def implicit_codebook(self) -> Tensor:
        """Every code of the grid, ``(codebook_size, codebook_dim)`` float32, in index order (built on each read)."""
        if self.codebook_size > IMPLICIT_CODEBOOK_MAX_CODES:
            raise RuntimeError(
                f"implicit_codebook would enumerate {self.codebook_size} codes (limit {IMPLICIT_CODEBOOK_MAX_CODES}); "
                "decode the indices you need with indices_to_codes instead"
            )
        indices = torch.arange(self.codebook_size, device=self._levels.device)
        return self._level_indices_to_codes(self.indices_to_level_indices(indices))

    # quantization

    def bound(self, z: Tensor, eps: float = DEFAULT_BOUND_EPS, hard_clamp: bool = False) -> Tensor:
        """The paper's bound-and-round: ``(..., codebook_dim)`` -> codes in ``[-1, 1]``, same shape."""
        return self._bound_levels(z, eps, hard_clamp)[0]

    def _bound_levels(self, z: Tensor, eps: float, hard_clamp: bool) -> tuple[Tensor, Tensor]:
        """:meth:`bound`'s codes and the rounded values ``r`` they are ``r / (L // 2)`` of (still attached to the
        graph: callers only turn them into integers, which carry no gradient)."""
        if eps == DEFAULT_BOUND_EPS:
            half_range, offset, shift, atanh_shift = self._level_constants().bound
        else:
            levels = self._levels
            half_range = (levels - 1) * (1 + eps) / 2
            offset = (levels % 2 == 0) * 0.5
            shift = offset / half_range
            atanh_shift = torch.atanh(shift)
        if hard_clamp:
            bounded = (z + shift).clamp(-1.0, 1.0) * half_range - offset
        else:
            bounded = torch.tanh(z + atanh_shift) * half_range - offset
        rounded = round_ste(bounded)
        return rounded / self._level_constants().half_width, rounded

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        """``2 / (L - 1) * floor((L - 1)(tanh(z) + 1) / 2 + 0.5) - 1`` (arXiv 2411.19842, section 3.2)."""
        return self._symmetric_levels(z, hard_clamp)[0]

    def _symmetric_levels(self, z: Tensor, hard_clamp: bool) -> tuple[Tensor, Tensor]:
        """:meth:`symmetry_preserving_bound`'s codes and their level indices in ``[0, L)`` (as floats still attached
        to the graph: callers only turn them into integers)."""
        squashed = z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)
        constants = self._level_constants()
        level_index = floor_ste((constants.levels_minus_1 * (squashed + 1) / 2.0) + 0.5)
        return constants.symmetric_step * level_index - 1.0, level_index

    def quantize(self, z: Tensor) -> Tensor:
        """Quantize ``(..., codebook_dim)`` to codes of the same shape, straight-through gradient."""
        return self._quantize_levels(z)[0]

    def _quantize_levels(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Codes (as :meth:`quantize`) and their level indices ``(..., codebook_dim)`` int64 in ``[0, L)``.

        The level indices come from the rounded values directly (``r + L // 2``, or the symmetric bound's
        floor) instead of from the codes as :meth:`codes_to_indices` gets them: the same integers (the
        codes are ``r / (L // 2)`` and ``2 k / (L - 1) - 1``, which that method rounds back to ``r`` and
        ``k``) without the arithmetic."""
        if self.preserve_symmetry:
            codes, level_index = self._symmetric_levels(z, self.bound_hard_clamp)
        else:
            codes, rounded = self._bound_levels(z, DEFAULT_BOUND_EPS, self.bound_hard_clamp)
            level_index = rounded + self._level_constants().half_width
        # out of range only for non-finite inputs; clamped into [0, L - 1] as codes_to_indices clamps them
        constants = self._level_constants()
        return codes, level_index.long().clamp_(constants.lowest_level, constants.levels_minus_1)

    def maybe_apply_noise(self, codes: Tensor) -> Tensor:
        """Noise dropout (training only): see ``noise_dropout``."""
        if not self.training or self.noise_dropout == 0:
            return codes
        replace = torch.rand_like(codes) < self.noise_dropout
        noisy = codes + (torch.rand_like(codes) - 0.5)
        return torch.where(replace, noisy, codes).clamp(-1.0, 1.0)

    # index arithmetic

    def _codes_to_level_indices(self, codes: Tensor) -> Tensor:
        if codes.dtype not in (torch.float32, torch.float64):
            codes = codes.float()
        levels = self._levels
        if self.preserve_symmetry:
            level_index = (codes + 1.0) / (2.0 / (levels - 1))
        else:
            level_index = codes * (levels // 2) + levels // 2
        return level_index.detach().round().long().clamp(min=0).minimum(levels - 1)

    def _level_indices_to_codes(self, level_indices: Tensor) -> Tensor:
        levels = self._levels
        if self.preserve_symmetry:
            return (2.0 / (levels - 1)) * level_indices.long() - 1.0
        half_width = levels // 2
        return (level_indices.long() - half_width) / half_width

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Codes ``(..., codebook_dim)`` -> indices ``(...)`` (exact integer arithmetic).

        Each value is rounded to its nearest level first (and clamped into range), so codes perturbed by
        noise dropout or low precision still give valid indices.
        """
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"zhat must have {self.codebook_dim} values on its last axis, got shape {tuple(zhat.shape)}"
            )
        return digits_to_index(self._codes_to_level_indices(zhat), self._basis).to(self.index_dtype)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """Indices ``(...)`` -> level index of every code dimension ``(..., codebook_dim)``, in ``[0, L_i)``."""
        return index_to_digits(indices, self._basis, self._levels).to(self.index_dtype)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Inverse of the forward's indices: the output the forward gave for them (in eval mode).

        Args:
            indices: as returned by ``forward``.
            project_out: apply ``project_out`` (else return codes of size ``codebook_dim * num_codebooks``).

        Returns:
            ``(..., d)`` codes; channel-first ``(b, d, ...)`` for image/video indices or ``channel_first``.

        Raises:
            TypeError: ``indices`` is not an integer tensor (floating point and bool are refused).
            ValueError: a value lies outside ``[0, codebook_size)``.
        """
        indices = check_code_indices("indices", indices, self.codebook_size)
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = self._level_indices_to_codes(self.indices_to_level_indices(indices))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t().to(codes.dtype)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out and self.has_projections:
            codes = self.project_out(codes.to(self.project_out.weight.dtype))
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    # forward

    def _quantization_context(self, device: torch.device):
        if self.force_quantization_f32:
            return torch.autocast(device.type, enabled=False)
        return nullcontext()

    def _quantize_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Projected tokens -> (codes of the same shape and dtype, indices or None).

        A single codebook quantizes the feature axis as it is; several are split off it and joined back.

        Shape:
            - tokens: ``(b, n, c * D)``
            - output: codes ``(b, n, c * D)``, indices ``(b, n, c)``, or ``(b, n)`` when ``c == 1``
        """
        grouped = self.num_codebooks > 1
        with self._quantization_context(tokens.device):
            z = tokens
            if self.force_quantization_f32 and z.dtype not in self.allowed_dtypes:
                z = z.float()
            if grouped:
                z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
            if self.orthogonal_rotation:
                z = z @ as_dtype(self.orthogonal_rot, z.dtype)
            codes, level_indices = self._quantize_levels(z)
            indices = None
            if self.return_indices:
                # the mixed-radix number of the level indices; each term and the sum fit the index dtype
                indices = (level_indices * self._basis).sum(-1, dtype=self.index_dtype)
            codes = self.maybe_apply_noise(codes)
            if self.orthogonal_rotation:
                codes = codes @ as_dtype(self.orthogonal_rot, codes.dtype).t()
            if grouped:
                codes = codes.flatten(-2)
            return as_dtype(codes, tokens.dtype), indices

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Quantize ``z``; returns ``(out, indices)`` (see the class docstring for shapes)."""
        parsed = parse_input(z, dim=self.dim, channel_first=True if self.channel_first else None, name="z")
        layout = parsed.layout
        tokens = project(self.project_in, parsed.tokens)
        codes, indices = self._quantize_tokens(tokens)
        out = as_dtype(layout.from_tokens(project(self.project_out, codes)), z.dtype)

        if indices is not None:
            indices = layout.indices_from_tokens(indices)
            if self.num_codebooks == 1 and self.keep_num_codebooks_dim:
                indices = indices.unsqueeze(-1)
        return out, indices
