"""Lookup-Free Quantization (LFQ, MAGVIT-v2, Yu et al. 2023, arXiv 2310.05737) and its spherical variant
(BSQ, Zhao et al. 2024, arXiv 2406.07548).

Each code dimension is quantized to its sign, ``+-codebook_scale``; a code's index is its bits, most
significant first. An entropy loss pushes each token towards a confident code (low per-sample entropy)
and the batch towards using every code (high batch entropy); both are computed without enumerating the
``2^K`` codes (see :mod:`vector_quantize_pytorch.core.entropy`).
"""

from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import health
from .core.distributed import mean_over_ranks, should_sync
from .core.entropy import code_entropy, per_sample_entropy, token_weights
from .core.estimators import straight_through
from .core.layout import parse_input
from .core.linear import project
from .core.radix import bit_weights, bits_to_index, index_to_bits
from .core.tensors import as_dtype, at_least_float32
from .core.validate import (
    check_arguments,
    check_code_indices,
    check_float,
    check_int,
)

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])

LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

MAX_CODEBOOK_BITS = 63  # indices are int64
CODEBOOK_MAX_CODES = 2**26  # the `codebook` property refuses to enumerate more codes than this


def _scaled(t: Tensor, weight: float) -> Tensor:
    """``t * weight``, without a multiplication when ``weight`` is 1 (the same value)."""
    return t if weight == 1 else t * weight


class CosineSimLinear(nn.Module):
    """``normalize(x) @ normalize(W, dim=0) * scale``: a projection whose outputs are cosine similarities.

    Args:
        dim_in: input features.
        dim_out: output features.
        scale: multiplies the cosine similarities.

    Shape:
        ``(..., dim_in)`` -> ``(..., dim_out)``. The parameter ``weight`` is ``(dim_in, dim_out)``.
    """

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0) * self.scale


def sample_token_subset(mask: Tensor | None, num_tokens: int, fraction: float, device) -> Tensor:
    """A random ``(n,)`` bool selection of ``max(1, floor(fraction * count))`` of the tokens where ``mask``
    is True (all ``n`` when None). No host synchronisation: the count stays a tensor."""
    scores = torch.rand(num_tokens, device=device)
    if mask is not None:
        scores = scores + (~mask).to(scores.dtype) * 2  # excluded tokens rank last
    rank = scores.argsort().argsort()
    if mask is None:
        return rank < max(1, math.floor(num_tokens * fraction))
    keep = rank < (mask.sum() * fraction).floor().clamp(min=1)
    return keep & mask


_ARGUMENTS = {
    "int": {"num_codebooks": 1},
    "float": {"entropy_loss_weight": (0.0, None), "commitment_loss_weight": (0.0, None),
              "diversity_gamma": (0.0, None), "entropy_loss_offset": (None, None)},
    "bool": ("projection_has_bias", "cosine_sim_project_in", "experimental_softplus_entropy_loss", "spherical",
             "force_quantization_f32", "orthogonal_rotation"),
    "optional_bool": ("has_projections", "keep_num_codebooks_dim", "channel_first"),
}  # fmt: skip
_STORED_OPTIONS = (
    "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma", "codebook_scale", "frac_per_sample_entropy",
    "soft_clamp_input_value", "channel_first", "experimental_softplus_entropy_loss", "entropy_loss_offset",
    "spherical", "force_quantization_f32", "orthogonal_rotation",
)  # fmt: skip


def _sizes(dim, codebook_size, num_codebooks) -> tuple[int, int, int, int]:
    """``(dim, codebook_size, bits per codebook, num_codebooks)`` from what was given (checked)."""
    if dim is None and codebook_size is None:
        raise ValueError("LFQ needs dim or codebook_size (or both), got neither")
    if codebook_size is None:
        codebook_size = 2 ** check_int("dim", dim, minimum=1, maximum=MAX_CODEBOOK_BITS)
    codebook_size = check_int("codebook_size", codebook_size, minimum=2, maximum=2**MAX_CODEBOOK_BITS)
    if codebook_size & (codebook_size - 1):
        raise ValueError(
            f"codebook_size must be a power of 2, got {codebook_size} (nearest above: "
            f"{2 ** codebook_size.bit_length()})"
        )
    codebook_dim = codebook_size.bit_length() - 1
    dim = codebook_dim * num_codebooks if dim is None else check_int("dim", dim, minimum=1)
    return dim, codebook_size, codebook_dim, num_codebooks


def _check_scales(args: dict) -> None:
    check_float("codebook_scale", args["codebook_scale"], minimum=0.0, min_exclusive=True)
    check_float("frac_per_sample_entropy", args["frac_per_sample_entropy"], minimum=0.0, maximum=1.0,
                min_exclusive=True)  # fmt: skip
    for name in ("soft_clamp_input_value", "cosine_sim_project_in_scale"):
        if args[name] is not None:
            check_float(name, args[name])


class LFQ(nn.Module):
    r"""Lookup-free quantization (MAGVIT-v2, arXiv 2310.05737); ``spherical=True`` is BSQ (arXiv 2406.07548).

    The (optionally projected) input is split into ``num_codebooks`` groups of ``K = log2(codebook_size)``
    values; each value is quantized to ``+codebook_scale`` if positive else ``-codebook_scale`` (with
    ``spherical``, inputs and codes are l2-normalised per group and multiplied by ``codebook_scale``).
    The index of a code is its bits, most significant first: ``index = sum_k [x_k > 0] * 2^(K-1-k)``.
    Gradients pass straight through (after ``straight_through_activation``).

    In training the auxiliary loss is

        entropy_loss_weight * (H_sample - diversity_gamma * H_batch) + commitment_loss_weight * commitment

    where ``q(c | x) = softmax_c(2 * inv_temperature * <x, c>)`` over the ``2^K`` codes ``c``,
    ``H_sample`` is the mean over tokens of ``H(q(. | x))`` and ``H_batch`` is ``H(mean_x q(. | x))``
    (both averaged over codebooks), and ``commitment`` is the MSE between the input and its code.
    ``H_sample`` is exact and O(K) per token (the softmax factorises into per-bit sigmoids
    ``p_k = sigmoid(4 * inv_temperature * s * x_k)``, ``s`` the code value). ``H_batch`` is exact up to
    ``EXACT_CODE_ENTROPY_MAX_BITS`` bits, streamed over chunks of codes and tokens (peak memory flat in
    ``K``, time growing as ``tokens x 2^K``); beyond,
    it is the BSQ grouped estimate, an upper bound of the exact value (subadditivity of entropy), so
    ``codebook_size=2**32`` trains. Entropies are exact ``-sum p log p`` (no clamp inside the log, so rare
    codes count at their true weight). Masked-out tokens change neither entropy nor commitment;
    ``frac_per_sample_entropy < 1`` averages ``H_sample`` over a random subset of tokens while ``H_batch``
    always uses every token. In eval mode the loss is a 0-dim zero.

    Under ``torch.distributed`` (decided at each call) the batch entropy is that of the code distribution
    averaged over the tokens of every rank: each rank's mean distribution is weighted by its number of
    tokens and all-reduced, and the backward all-reduces its gradient, so that with DistributedDataParallel
    (which averages gradients) the entropy term trains as on the concatenated batch. ``H_sample`` and the
    commitment stay per-rank means, as any data-parallel loss. Every rank must run its training forwards
    (a rank whose tokens are all masked out still takes part).

    Args:
        dim: input feature size. Default: ``log2(codebook_size) * num_codebooks``.
        codebook_size: codes per codebook, a power of 2 (at least one of ``dim``, ``codebook_size``).
            Default: ``2 ** dim``.
        entropy_loss_weight: weight of the entropy term.
        commitment_loss_weight: weight of the commitment MSE.
        diversity_gamma: weight of the batch entropy inside the entropy term.
        straight_through_activation: module applied to the input before the straight-through estimator.
        num_codebooks: groups of ``K`` bits; the entropies are taken per group.
        keep_num_codebooks_dim: keep a trailing codebook axis on the indices. Default: ``num_codebooks > 1``.
        codebook_scale: code values ``+-codebook_scale`` (residual LFQ halves it per layer).
        frac_per_sample_entropy: fraction of tokens, in ``(0, 1]``, averaged for the per-sample entropy.
        has_projections: Linear ``project_in`` / ``project_out``. Default: ``dim != K * num_codebooks``.
        projection_has_bias: bias of the projections.
        soft_clamp_input_value: if given, ``tanh(x / v) * v`` after ``project_in`` (``v >= codebook_scale``).
        cosine_sim_project_in: ``project_in`` is a :class:`CosineSimLinear`.
        cosine_sim_project_in_scale: its scale. Default: ``codebook_scale``.
        channel_first: input is ``(b, d, ...)``. Default: True exactly for inputs of 4 or more dimensions.
        experimental_softplus_entropy_loss: entropy term becomes ``softplus(term + entropy_loss_offset)``.
        entropy_loss_offset: the shift above.
        spherical: BSQ: l2-normalise inputs and codes per group (times ``codebook_scale``).
        force_quantization_f32: quantize and compute the losses in float32 (float64 inputs stay float64)
            with autocast disabled.
        orthogonal_rotation: rotate each group by a fixed random orthogonal matrix (buffer ``orthogonal_rot``).

    Shape:
        - Input: ``(b, n, dim)``, ``(b, dim)``, images ``(b, dim, h, w)``, video ``(b, dim, t, h, w)``
          (channel-first by default from 4 dimensions on), or ``(b, dim, n)`` with ``channel_first=True``.
          ``mask``: ``(b, n)`` (or ``(b, *spatial)``) bool, True for tokens that count in the losses.
        - Output: ``Return(quantized, indices, entropy_aux_loss)``: ``quantized`` of the input's shape and
          dtype; int64 ``indices`` ``(b, n)`` / ``(b, h, w)`` / ``(b, t, h, w)``, with a trailing
          ``num_codebooks`` axis when ``keep_num_codebooks_dim``; a 0-dim loss. With
          ``return_loss_breakdown=True``: ``(Return, LossBreakdown(per_sample_entropy, batch_entropy,
          commitment))``.

    Example::

        >>> quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
        >>> image_feats = torch.randn(1, 16, 32, 32)
        >>> quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
        >>> quantized.shape, indices.shape, entropy_aux_loss.shape
        (torch.Size([1, 16, 32, 32]), torch.Size([1, 32, 32]), torch.Size([]))
        >>> assert (quantized == quantizer.indices_to_codes(indices)).all()
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module = nn.Identity(),
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        args = dict(locals())
        check_arguments(args, **_ARGUMENTS)
        _check_scales(args)
        dim, codebook_size, codebook_dim, num_codebooks = _sizes(dim, codebook_size, num_codebooks)
        codebook_dims = codebook_dim * num_codebooks
        has_projections = dim != codebook_dims if has_projections is None else has_projections
        if not has_projections and dim != codebook_dims:
            raise ValueError(
                "has_projections=False needs dim == log2(codebook_size) * num_codebooks = "
                f"{codebook_dims}, got dim={dim}"
            )
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError(
                f"keep_num_codebooks_dim must be True when num_codebooks > 1, got num_codebooks={num_codebooks}"
            )
        if not callable(straight_through_activation):
            raise TypeError(
                f"straight_through_activation must be a callable module, got {straight_through_activation!r}"
            )
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(
                f"soft_clamp_input_value must be >= codebook_scale={codebook_scale}, got {soft_clamp_input_value}"
            )

        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.has_projections = has_projections
        self.activation = straight_through_activation
        for name in _STORED_OPTIONS:
            value = args[name]
            setattr(self, name, float(value) if type(value) in (int, float) else value)
        self._build_projections(has_projections, dim, codebook_dims, args)

        if self.orthogonal_rotation:
            self.register_buffer("orthogonal_rot", nn.init.orthogonal_(torch.empty(codebook_dim, codebook_dim)))
        self.register_buffer("mask", bit_weights(codebook_dim))  # weight of each bit; the only state_dict key
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)  # carries the module's float dtype

    def _build_projections(self, has_projections: bool, dim: int, codebook_dims: int, args: dict) -> None:
        if not has_projections:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
            return
        bias = args["projection_has_bias"]
        if args["cosine_sim_project_in"]:
            scale = args["cosine_sim_project_in_scale"]
            scale = args["codebook_scale"] if scale is None else scale
            self.project_in = CosineSimLinear(dim, codebook_dims, scale=scale)
        else:
            self.project_in = nn.Linear(dim, codebook_dims, bias=bias)
        self.project_out = nn.Linear(codebook_dims, dim, bias=bias)

    @property
    def dtype(self) -> torch.dtype:
        """Float dtype of the module's codes (float32 unless the module was cast)."""
        return self.zero.dtype

    @property
    def codebook(self) -> Tensor:
        """Every code ``(codebook_size, codebook_dim)``, values ``+-codebook_scale``, in index order (built on
        each read; not l2-normalised, even with ``spherical``: the raw code values)."""
        if self.codebook_size > CODEBOOK_MAX_CODES:
            raise RuntimeError(
                f"codebook would enumerate {self.codebook_size} codes (limit {CODEBOOK_MAX_CODES}); "
                "decode the indices you need with indices_to_codes instead"
            )
        indices = torch.arange(self.codebook_size, device=self.mask.device)
        return self.bits_to_codes(index_to_bits(indices, self.mask).to(self.dtype))

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """Bits (0/1) -> code values ``+-codebook_scale``."""
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def _maybe_l2norm(self, t: Tensor) -> Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    def _codes_from_bits(self, bits: Tensor, dtype: torch.dtype) -> Tensor:
        """Bool bits ``(..., K)`` -> quantized values ``(..., K)`` as the forward returns them (pre-rotation)."""
        scale = self.codebook_scale  # two kernels and no copy from the host: a fill, then the negated scale
        return self._maybe_l2norm(torch.full_like(bits, scale, dtype=dtype).where(bits, -scale))

    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return at_least_float32(dtype) if self.force_quantization_f32 else dtype

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Indices as the forward returns them -> the output the forward gave for them (in eval mode).

        Args:
            indices: int indices ``(b, ...)`` (with a trailing codebook axis when ``keep_num_codebooks_dim``).
            project_out: apply ``project_out`` (else return codes of size ``codebook_dim * num_codebooks``).

        Returns:
            ``(b, ..., d)``, or channel-first ``(b, d, ...)`` for image/video indices (or per ``channel_first``).

        Raises:
            TypeError: ``indices`` is not an integer tensor (floating point and bool are refused).
            ValueError: a value lies outside ``[0, codebook_size)``.
        """
        indices = check_code_indices("indices", indices, self.codebook_size)
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self._codes_from_bits(index_to_bits(indices, self.mask), self._compute_dtype(self.dtype))
        if self.orthogonal_rotation:
            codes = codes @ as_dtype(self.orthogonal_rot.t(), codes.dtype)
        codes = as_dtype(codes.flatten(-2), self.dtype)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1) if transpose else codes

    # losses

    def _bit_logits(self, h: Tensor, inv_temperature) -> Tensor:
        """Per-bit logits ``4 * inv_temperature * s * x_k`` of the softmax over corners (``s`` a code value)."""
        code_value = self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale
        return h.flatten(0, 1) * (4 * code_value * inv_temperature)

    def _entropy_terms(self, h: Tensor, token_mask: Tensor | None, inv_temperature) -> tuple[Tensor, Tensor]:
        bit_logits = self._bit_logits(h, inv_temperature)  # (b n) c k
        num_tokens = bit_logits.shape[0]
        weights = token_weights(token_mask, num_tokens, dtype=bit_logits.dtype, device=bit_logits.device)
        sample_weights = weights
        if self.frac_per_sample_entropy < 1:
            subset = sample_token_subset(token_mask, num_tokens, self.frac_per_sample_entropy, bit_logits.device)
            sample_weights = token_weights(subset, num_tokens, dtype=bit_logits.dtype, device=bit_logits.device)
        sample_entropy = per_sample_entropy(bit_logits, sample_weights)
        reduce_mean = None
        if should_sync(None):  # the batch distribution is averaged over the tokens of every rank (differentiably)
            count = token_mask.sum() if token_mask is not None else torch.full((), num_tokens, device=h.device)
            reduce_mean = partial(mean_over_ranks, count=count)
        batch_entropy = code_entropy(bit_logits, weights, reduce_mean=reduce_mean).mean()
        return sample_entropy, batch_entropy

    def _commitment(self, h: Tensor, quantized: Tensor, token_mask: Tensor | None) -> Tensor:
        per_token = (h - quantized.detach()).square().flatten(-2).mean(-1).flatten()
        return (per_token * token_weights(token_mask, per_token.shape[0], dtype=h.dtype, device=h.device)).sum()

    def _aux_losses(
        self, h: Tensor, quantized: Tensor, token_mask: Tensor | None, inv_temperature, need_entropies: bool
    ) -> tuple[Tensor, LossBreakdown]:
        zero = h.new_zeros(())
        if not self.training:
            return zero, LossBreakdown(zero, zero, zero)
        sample_entropy = batch_entropy = entropy_loss = zero
        if self.entropy_loss_weight > 0 or need_entropies:
            sample_entropy, batch_entropy = self._entropy_terms(h, token_mask, inv_temperature)
            entropy_loss = sample_entropy - _scaled(batch_entropy, self.diversity_gamma)
            if self.experimental_softplus_entropy_loss:
                entropy_loss = F.softplus(entropy_loss + self.entropy_loss_offset)
        aux_loss = entropy_loss * self.entropy_loss_weight
        commitment = zero
        if self.commitment_loss_weight > 0:  # a zero term would add nothing but kernels
            commitment = self._commitment(h, quantized, token_mask)
            aux_loss = aux_loss + commitment * self.commitment_loss_weight
        return aux_loss, LossBreakdown(sample_entropy, batch_entropy, commitment)

    # forward

    def forward(
        self,
        x: Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: Tensor | None = None,
    ):
        """Quantize ``x``; returns ``Return(quantized, indices, entropy_aux_loss)`` (see the class docstring)."""
        parsed = parse_input(x, dim=self.dim, channel_first=self.channel_first, mask=mask)
        if not isinstance(inv_temperature, Tensor):
            inv_temperature = check_float("inv_temperature", inv_temperature, minimum=0.0)
        layout, token_mask = parsed.layout, None if parsed.mask is None else parsed.mask.flatten()

        tokens = project(self.project_in, parsed.tokens)
        if self.soft_clamp_input_value is not None:
            tokens = (tokens / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value

        context = torch.autocast(tokens.device.type, enabled=False) if self.force_quantization_f32 else nullcontext()
        with context:
            h = as_dtype(tokens, self._compute_dtype(tokens.dtype))
            h = h.unflatten(-1, (self.num_codebooks, self.codebook_dim))
            if self.orthogonal_rotation:
                h = h @ as_dtype(self.orthogonal_rot, h.dtype)
            h = self._maybe_l2norm(h)

            bits = h > 0
            indices = bits_to_index(bits, self.mask)  # b n c
            health.observe(self, indices, self.codebook_size, mask=token_mask)  # training only, see core/health
            quantized = self._codes_from_bits(bits, h.dtype)
            out = straight_through(self.activation(h), quantized) if self.training else quantized
            aux_loss, breakdown = self._aux_losses(h, quantized, token_mask, inv_temperature, return_loss_breakdown)

            if self.orthogonal_rotation:
                out = out @ as_dtype(self.orthogonal_rot.t(), out.dtype)
            out = as_dtype(out.flatten(-2), tokens.dtype)

        out = as_dtype(layout.from_tokens(project(self.project_out, out)), x.dtype)
        indices = layout.indices_from_tokens(indices)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)

        ret = Return(out, indices, aux_loss)
        return (ret, breakdown) if return_loss_breakdown else ret
