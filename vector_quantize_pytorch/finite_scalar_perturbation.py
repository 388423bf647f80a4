"""Finite scalar perturbation (FSP): bin a CDF-squashed latent, and in training perturb it inside a bin's width.

https://arxiv.org/abs/2602.17133
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .core.estimators import straight_through
from .core.layout import parse_input
from .core.radix import MAX_CODEBOOK_SIZE, digits_to_index, index_to_digits, radix_basis
from .core.validate import (
    check_bool,
    check_choice,
    check_code_indices,
    check_float,
    check_int,
    check_int_sequence,
)

__all__ = ["FSP", "VectorNorm", "batch_stats", "build_cdf_act", "CDF_ACTIVATIONS"]

# Standard deviation of a uniform variable on [0, 1]: bin centres (k + 1/2) / L are standardised by it.
UNIFORM_STD = 1 / math.sqrt(12)

# ----- CDF activations: R -> [0, 1], and their inverses (0, 1) -> R ----------------------------------------


def _tanh_cdf(z: Tensor) -> Tensor:
    # (tanh(z) + 1) / 2 written as sigmoid(2z): the sum cancels below zero and loses the lower tail's digits
    return torch.sigmoid(2.0 * z)


def _tanh_inverse_cdf(p: Tensor) -> Tensor:
    # atanh(2p - 1) as logit(p) / 2: 2p - 1 cancels for small p
    return torch.logit(p) / 2.0


def _normal_cdf(z: Tensor) -> Tensor:
    # in float64: (1 + erf(z / sqrt 2)) / 2 cancels below zero, and float32 ndtr/ndtri lose the lower tail's
    # digits (a round trip off by 1e-2 at z = -5); the float32 result is then exact to its last bit
    return torch.special.ndtr(z.double()).to(z.dtype)


def _normal_inverse_cdf(p: Tensor) -> Tensor:
    return torch.special.ndtri(p.double()).to(p.dtype)


def _laplace_cdf(z: Tensor) -> Tensor:
    return 0.5 + 0.5 * torch.sign(z) * -torch.expm1(-z.abs())


def _laplace_inverse_cdf(p: Tensor) -> Tensor:
    centred = p - 0.5
    return -torch.sign(centred) * torch.log1p(-2.0 * centred.abs())


def _cauchy_cdf(z: Tensor) -> Tensor:
    return torch.atan(z) / math.pi + 0.5


def _cauchy_inverse_cdf(p: Tensor) -> Tensor:
    return torch.tan(math.pi * (p - 0.5))


CDF_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "tanh": (_tanh_cdf, _tanh_inverse_cdf),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (_normal_cdf, _normal_inverse_cdf),
    "laplace": (_laplace_cdf, _laplace_inverse_cdf),
    "cauchy": (_cauchy_cdf, _cauchy_inverse_cdf),
}


def build_cdf_act(act_name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(cdf, inverse_cdf)`` of a named activation (one of :data:`CDF_ACTIVATIONS`)."""
    check_choice("act_name", act_name, CDF_ACTIVATIONS)
    return CDF_ACTIVATIONS[act_name]


# ----- VectorNorm: keeps the batch statistics of the latents near targets ------------------------------------


def batch_stats(batch: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-feature mean, variance (unbiased; biased for a single row), skewness and excess kurtosis of ``(N, d)``."""
    if batch.shape[0] == 0:  # no rows: the statistics are undefined
        undefined = batch.new_full(batch.shape[1:], math.nan)
        return undefined, undefined, undefined, undefined
    correction = 1 if batch.shape[0] > 1 else 0
    variance, mean = torch.var_mean(batch, dim=0, correction=correction)
    standardised = (batch - mean) / variance.sqrt().clamp_min(eps)
    skewness = standardised.pow(3).mean(dim=0)
    kurtosis = standardised.pow(4).mean(dim=0) - 3.0
    return mean, variance, skewness, kurtosis


# (target, weight) of mean, variance, skewness and kurtosis for every preset; the variance targets are the
# variances of the logistic-type distributions whose CDF is the matching activation (tanh: pi^2 / 12).
VECTOR_NORM_PRESETS = {
    "none": dict(l1_weight=0.0, l2_weight=0.0, l3_weight=0.0, l4_weight=0.0),
    "var": dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
    "kurt": dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_weight=0.06, l4_weight=0.05),
    "var_tanh": dict(l1_target=0.0, l1_weight=0.1, l2_target=0.8225, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
    "var_sigmoid": dict(l1_target=0.0, l1_weight=0.1, l2_target=3.29, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
    "var_laplace": dict(l1_target=0.0, l1_weight=0.1, l2_target=2.0, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
}


class VectorNorm(nn.Module):
    r"""Regulariser on the batch statistics of ``(N, d)`` latents:
    :math:`\sum_k w_k \cdot \mathrm{mean}_d (s_k - t_k)^2` over mean, variance, skewness and excess kurtosis
    :math:`s_k` with targets :math:`t_k`. Terms with zero weight are left out (so they cannot bring in NaN).

    Returns ``(loss (), {"mean", "variance", "skewness", "kurtosis"} each (d,))``.
    """

    def __init__(
        self,
        l1_target: float = 0.0,
        l1_weight: float = 0.1,
        l2_target: float = 1.0,
        l2_weight: float = 0.07,
        l3_target: float = 0.0,
        l3_weight: float = 0.06,
        l4_target: float = 0.0,
        l4_weight: float = 0.05,
        eps: float = 1e-8,
    ):
        super().__init__()
        self.l1_target, self.l1_weight = check_float("l1_target", l1_target), check_float("l1_weight", l1_weight)
        self.l2_target, self.l2_weight = check_float("l2_target", l2_target), check_float("l2_weight", l2_weight)
        self.l3_target, self.l3_weight = check_float("l3_target", l3_target), check_float("l3_weight", l3_weight)
        self.l4_target, self.l4_weight = check_float("l4_target", l4_target), check_float("l4_weight", l4_weight)
        self.eps = check_float("eps", eps, minimum=0.0)

    @classmethod
    def build(cls, name: str) -> VectorNorm:
        """One of the presets ``none``, ``var``, ``kurt``, ``var_tanh``, ``var_sigmoid``, ``var_laplace``."""
        check_choice("vector_norm", name, VECTOR_NORM_PRESETS)
        return cls(**VECTOR_NORM_PRESETS[name])

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mean, variance, skewness, kurtosis = batch_stats(z, self.eps)
        terms = (
            (mean, self.l1_target, self.l1_weight),
            (variance, self.l2_target, self.l2_weight),
            (skewness, self.l3_target, self.l3_weight),
            (kurtosis, self.l4_target, self.l4_weight),
        )
        loss = z.new_zeros(())
        for stat, target, weight in terms:
            if weight != 0.0 and z.shape[0] > 0:  # an empty batch has no statistics to regularise
                loss = loss + (stat - target).pow(2).mean() * weight
        return loss, {"mean": mean, "variance": variance, "skewness": skewness, "kurtosis": kurtosis}


# ----- FSP ------------------------------------------------------------------------------------------------------


class FSP(nn.Module):
    r"""Finite scalar perturbation (https://arxiv.org/abs/2602.17133): a finite scalar quantizer whose
    latents are squashed to :math:`[0, 1]` by a CDF and binned, with a stochastic perturbation in training.

    Each projected latent :math:`z` becomes :math:`a = F(z) \in [0, 1]` (``act_name`` picks the CDF
    :math:`F`), falls in bin :math:`k = \lfloor a L \rfloor` of :math:`L` equal bins, and is represented by
    the bin centre :math:`(k + 1/2) / L` (straight-through). In training, each element is replaced with
    probability ``1 - quantize_rate`` by a perturbed value :math:`a + u`, :math:`u \sim U(-1/2L, 1/2L)`
    (one proposal: if it leaves :math:`(0, 1)` the element takes :math:`a` itself). The result is mapped back
    by :math:`F^{-1}` (``need_inv_act=True``, straight-through) or standardised as :math:`(q - 1/2) \sqrt{12}`.
    A :class:`VectorNorm` preset regularises the batch statistics of the projected latents. The index of a
    token is the mixed-radix number :math:`\sum_i k_i \prod_{j<i} L_j`.

    Args:
        levels: number of bins per latent dimension; ``codebook_size = prod(levels)``.
        dim: input feature size; defaults to ``len(levels)``, otherwise Linear projections in and out.
        channel_first: the input's features are on axis 1 (``(b, dim, ...)``); otherwise on the last axis.
        projection_has_bias: the projections have biases.
        act_name: CDF activation: ``tanh``, ``sigmoid``, ``normal``, ``laplace`` or ``cauchy``.
        quantize_rate: in training, the probability that an element keeps its bin centre, in [0, 1].
        need_inv_act: map codes back through the inverse CDF instead of standardising them.
        vector_norm: regulariser preset: ``none``, ``var``, ``kurt``, ``var_tanh``, ``var_sigmoid``, ``var_laplace``.

    Shape:
        - Input: ``(..., dim)``, or ``(b, dim, ...)`` with ``channel_first``; at least 2 axes.
        - Output: ``(q, indices, norm_loss, info)``: ``q`` has the input's shape and dtype, ``indices`` are
          int32 over the token axes (``(b, n)``, ``(b, h, w)``, ...), ``norm_loss`` is a scalar and ``info``
          holds ``level_indices`` (token axes + ``(len(levels),)``, float), ``norm_info`` (the batch
          statistics) and, in training with ``quantize_rate < 1``, ``p_accept_prob`` (share of proposals
          that stayed in (0, 1)).

    Example::

        >>> fsp = FSP(levels=[8, 5, 5], dim=16).eval()
        >>> x = torch.randn(2, 10, 16)
        >>> q, indices, norm_loss, info = fsp(x)
        >>> q.shape, indices.shape, indices.dtype
        (torch.Size([2, 10, 16]), torch.Size([2, 10]), torch.int32)
        >>> torch.equal(fsp.indices_to_codes(indices), q)
        True
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        channel_first: bool = False,
        projection_has_bias: bool = True,
        act_name: str = "tanh",
        quantize_rate: float = 0.0,
        need_inv_act: bool = False,
        vector_norm: str = "var_tanh",
    ):
        super().__init__()
        levels = check_int_sequence("levels", levels, minimum=1)
        dim = len(levels) if dim is None else check_int("dim", dim, minimum=1)
        channel_first = check_bool("channel_first", channel_first)
        projection_has_bias = check_bool("projection_has_bias", projection_has_bias)
        cdf, inverse_cdf = build_cdf_act(act_name)
        quantize_rate = check_float("quantize_rate", quantize_rate, minimum=0.0, maximum=1.0)
        need_inv_act = check_bool("need_inv_act", need_inv_act)
        check_choice("vector_norm", vector_norm, VECTOR_NORM_PRESETS)
        codebook_size = math.prod(levels)
        if codebook_size > MAX_CODEBOOK_SIZE:
            raise ValueError(f"levels must multiply to at most 2**31 - 1 (int32 indices), got {levels}")

        self.codebook_dim = len(levels)
        self.dim = dim
        self.channel_first = channel_first
        self.codebook_size = codebook_size
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", radix_basis(levels).to(torch.int32), persistent=False)
        self._longest_level = max(levels)

        self.has_projections = dim != self.codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(dim, self.codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.codebook_dim, dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

        self.act_name = act_name
        self.act_func, self.inv_act_func = cdf, inverse_cdf
        self.need_inv_act = need_inv_act
        self.quantize_rate = quantize_rate
        self.vector_norm = VectorNorm.build(vector_norm)

    def extra_repr(self) -> str:
        return (
            f"levels={self._levels.tolist()}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"act_name={self.act_name!r}, need_inv_act={self.need_inv_act}, quantize_rate={self.quantize_rate}"
        )

    # ----- bins and indices ------------------------------------------------------------------------------------

    def quantize_act_value(self, act_z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """``[0, 1]`` values -> (bin centres, straight-through; float bin indices, detached)."""
        levels = self._levels.to(act_z.dtype)
        level_indices = torch.minimum((act_z.detach().clamp_max(1.0 - eps) * levels).floor(), levels - 1)
        centres = (level_indices + 0.5) / levels
        return straight_through(act_z, centres), level_indices

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        """``(..., codebook_dim)`` bin indices -> int32 code indices ``(...)``."""
        return digits_to_index(level_indices, self._basis, torch.int32)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """``(...)`` code indices -> ``(..., codebook_dim)`` bin indices (integers, at least int32)."""
        level_indices = index_to_digits(indices, self._basis, self._levels)
        return level_indices.to(torch.promote_types(indices.dtype, torch.int32))

    def indices_to_act_value(self, indices: Tensor) -> Tensor:
        """``(...)`` code indices -> ``(..., codebook_dim)`` bin centres in [0, 1] (float32)."""
        levels = self._levels.float()
        return (self.indices_to_level_indices(indices).float() + 0.5) / levels

    def _act_to_latent(self, act_value: Tensor, eps: float) -> Tensor:
        if self.need_inv_act:
            return self.inv_act_func(act_value.clamp(eps, 1.0 - eps))
        return (act_value - 0.5) / UNIFORM_STD

    def _inverse_cdf_at_centres(self, level_indices: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        """Inverse CDF of the bin centres of ``(..., codebook_dim)`` bin indices, looked up in a per-bin table:
        a transcendental function evaluated elementwise may differ in the last bit with the tensor's layout
        (vectorised or scalar code paths), and forward and :meth:`indices_to_codes` must agree exactly."""
        levels = self._levels.to(dtype)
        longest = int(self._longest_level)
        bins = torch.arange(longest, device=levels.device, dtype=dtype)
        table = self._act_to_latent((bins + 0.5) / levels.unsqueeze(-1), eps)  # (codebook_dim, longest)
        slots = level_indices.long() + torch.arange(self.codebook_dim, device=levels.device) * longest
        return table.flatten()[slots]

    def indices_to_codes(self, indices: Tensor, eps: float = 1e-6) -> Tensor:
        """``(...)`` integer code indices -> the output they stand for: ``(..., dim)``, or ``(b, dim, ...)`` when
        ``channel_first``. ``eps`` clamps bin centres before the inverse CDF (``need_inv_act``). Values outside
        ``[0, codebook_size)`` raise a ``ValueError``."""
        indices = check_code_indices("indices", indices, self.codebook_size, min_ndim=1)
        if self.need_inv_act:
            latents = self._inverse_cdf_at_centres(self.indices_to_level_indices(indices), eps, torch.float32)
        else:
            latents = self._act_to_latent(self.indices_to_act_value(indices), eps)
        codes = self.project_out(latents)
        if self.channel_first and codes.ndim > 2:
            codes = codes.movedim(-1, 1)
        return codes

    # ----- forward -------------------------------------------------------------------------------------------

    def _perturb(self, act_z: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
        """Training-time perturbation: (new [0, 1] values, share of proposals accepted)."""
        half_bin = 1.0 / (self._levels.to(act_z.dtype) * 2)
        proposal = act_z + half_bin * (torch.rand_like(act_z) * 2.0 - 1.0)
        accepted = (proposal > 0.0) & (proposal < 1.0)
        perturbed = torch.where(accepted, proposal, act_z)
        use_perturbed = torch.rand_like(centres) > self.quantize_rate
        return torch.where(use_perturbed, perturbed, centres), accepted.float().mean()

    def forward(self, z: Tensor, eps: float | None = None) -> tuple[Tensor, Tensor, Tensor, dict]:
        parsed = parse_input(z, dim=self.dim, channel_first=self.channel_first, name="z")
        x, layout = z, parsed.layout
        if eps is not None:
            check_float("eps", eps, minimum=0.0)
        eps = eps or torch.finfo(x.dtype).eps  # default: the input dtype's resolution

        latents = self.project_in(parsed.tokens)
        latents = latents.to(torch.promote_types(latents.dtype, torch.float32))
        norm_loss, norm_info = self.vector_norm(latents.reshape(-1, self.codebook_dim))

        act_z = self.act_func(latents)
        act_q, level_indices = self.quantize_act_value(act_z, eps)
        info = {}
        perturbed = self.training and self.quantize_rate < 1.0
        if perturbed:
            act_q, info["p_accept_prob"] = self._perturb(act_z, act_q)

        if self.need_inv_act:
            if perturbed:
                values = self._act_to_latent(act_q.detach(), eps)
            else:  # bin centres: the very values indices_to_codes gives
                values = self._inverse_cdf_at_centres(level_indices, eps, latents.dtype)
            codes = straight_through(latents, values)
        else:
            codes = self._act_to_latent(act_q, eps)
        out = layout.from_tokens(self.project_out(codes.to(x.dtype))).to(x.dtype)

        indices = layout.indices_from_tokens(self.level_indices_to_indices(level_indices))
        info = {"level_indices": layout.indices_from_tokens(level_indices), "norm_info": norm_info, **info}
        return out, indices, norm_loss, info
