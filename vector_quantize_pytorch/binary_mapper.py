"""Binary mapper: sample independent bits from logits and hand out the code they spell as a one-hot.

Proposed by François Fleuret as a more stable alternative to a VAE bottleneck, https://arxiv.org/abs/2510.17558.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.estimators import attach_gradient
from .core.validate import check_bool, check_code_indices, check_float, check_int

__all__ = ["BinaryMapper", "binary_entropy"]

NAT = math.log(2)  # one bit, in nats
# Indices are int64 bit patterns.
MAX_BITS = 62


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of independent Bernoulli(sigmoid(logits)) bits, summed over the last axis.

    Written as ``-(p log sigmoid(l) + (1 - p) log sigmoid(-l))``, whose float32 rounding the auxiliary loss
    ``bits ln 2 - H - threshold`` keeps (it cancels most of ``H``'s digits, so the last bits of ``H`` show);
    :func:`~vector_quantize_pytorch.core.entropy.bernoulli_entropy` is the same quantity computed without the
    ``1 - p`` cancellation, for LFQ's large logits."""
    prob = logits.sigmoid()
    return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(dim=-1)


def bits_to_indices(bits: Tensor) -> Tensor:
    """``(..., bits)`` 0/1 -> int64 ``(...)``; bit ``i`` has place value ``2**i``."""
    place_values = 2 ** torch.arange(bits.shape[-1], device=bits.device)
    return (bits.long() * place_values).sum(-1)


def indices_to_bits(indices: Tensor, num_bits: int) -> Tensor:
    """int ``(...)`` -> bool ``(..., num_bits)``, least significant bit first."""
    shifts = torch.arange(num_bits, device=indices.device)
    return (indices.long().unsqueeze(-1) >> shifts) & 1 == 1


def code_probabilities(logits: Tensor) -> Tensor:
    """``(..., bits)`` logits -> ``(..., 2**bits)`` probability of every code under independent bits.

    Built as the outer product of the per-bit distributions ``(1 - p_i, p_i)``, one bit at a time with the
    new bit as the more significant digit, so code ``c`` gets ``prod_i p_i^{c_i} (1 - p_i)^{1 - c_i}``.
    That is exact and costs ``O(2**bits)`` per token, without a ``(2**bits, bits)`` code table.
    """
    bit_probs = torch.stack((torch.sigmoid(-logits), torch.sigmoid(logits)), dim=-1)  # (..., bits, 2)
    probs = bit_probs[..., 0, :]
    for i in range(1, logits.shape[-1]):
        probs = (bit_probs[..., i, :, None] * probs.unsqueeze(-2)).flatten(-2)
    return probs


class BinaryMapper(nn.Module):
    r"""Binary mapper (Fleuret 2025, https://arxiv.org/abs/2510.17558): ``bits`` logits per token are
    sampled as independent Bernoulli bits and the resulting code (bit ``i`` has place value :math:`2^i`) is
    returned as a one-hot over :math:`2^{bits}` codes.

    With ``straight_through`` the one-hot carries the gradient of the soft distribution over codes,
    :math:`P(c) = \prod_i \sigma(l_i)^{c_i} \sigma(-l_i)^{1-c_i}` (computed from the untempered logits,
    forward value still exactly the one-hot). The auxiliary loss keeps the bits from collapsing:
    :math:`\mathrm{relu}(bits \cdot \ln 2 - H - \tau)`, with :math:`H` the entropy of the bits in nats and
    :math:`\tau` = ``kl_loss_threshold``: the KL divergence to uniform bits is allowed up to :math:`\tau`.

    Args:
        bits: bits per token; the one-hot has ``2**bits`` entries.
        kl_loss_threshold: free KL budget :math:`\tau` in nats (default one bit, :math:`\ln 2`).
        deterministic_on_eval: in eval mode take ``sigmoid(logits / T) > 0.5`` instead of sampling.

    Shape:
        - Input: logits ``(..., bits)``.
        - Output: ``(one_hot (..., 2**bits), aux_kl_loss)`` or, with ``return_indices``,
          ``(one_hot, indices (...) int64, aux_kl_loss)``. ``aux_kl_loss`` is a scalar, or ``(...)`` with
          ``reduce_aux_kl_loss=False``; zero when not computed. ``one_hot`` is float32 (float64 for float64 logits).

    Example::

        >>> mapper = BinaryMapper(bits=8)
        >>> logits = torch.randn(3, 4, 8)
        >>> one_hot, indices, aux_loss = mapper(logits, return_indices=True)
        >>> one_hot.shape, indices.shape, aux_loss.shape
        (torch.Size([3, 4, 256]), torch.Size([3, 4]), torch.Size([]))
        >>> mapper.log_prob(logits, indices=indices).shape
        torch.Size([3, 4])
    """

    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT, deterministic_on_eval: bool = False):
        super().__init__()
        self.bits = check_int("bits", bits, minimum=1, maximum=MAX_BITS)
        self.kl_loss_threshold = check_float("kl_loss_threshold", kl_loss_threshold)
        self.deterministic_on_eval = check_bool("deterministic_on_eval", deterministic_on_eval)
        self.num_codes = 2**self.bits

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, kl_loss_threshold={self.kl_loss_threshold}, "
            f"deterministic_on_eval={self.deterministic_on_eval}"
        )

    def _check_logits(self, logits) -> Tensor:
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError(f"logits must be a floating point tensor, got {getattr(logits, 'dtype', type(logits))}")
        if logits.ndim == 0 or logits.shape[-1] != self.bits:
            raise ValueError(f"logits must have bits = {self.bits} on the last axis, got shape {tuple(logits.shape)}")
        return logits

    def binary_entropy(self, logits: Tensor) -> Tensor:
        """Entropy in nats of the bits, summed over the last axis: ``(..., bits) -> (...)``."""
        return binary_entropy(logits)

    def calc_aux_loss(self, logits: Tensor, reduce_aux_kl_loss: bool = True) -> Tensor:
        """``relu(bits * ln 2 - H(bits) - kl_loss_threshold)``, averaged unless ``reduce_aux_kl_loss=False``."""
        logits = self._check_logits(logits)
        kl_to_uniform = self.bits * NAT - self.binary_entropy(logits.float())
        aux_kl_loss = F.relu(kl_to_uniform - self.kl_loss_threshold)
        return aux_kl_loss.mean() if reduce_aux_kl_loss else aux_kl_loss

    def log_prob(
        self, logits: Tensor, *, indices: Tensor | None = None, one_hot: Tensor | None = None, sum_bits: bool = True
    ) -> Tensor:
        """Log-probability of codes under the bits' distribution.

        Args:
            logits: ``(..., bits)``.
            indices: ``(...)`` integer codes, or
            one_hot: ``(..., 2**bits)`` (its argmax is the code); exactly one of the two.
            sum_bits: sum over bits ``(...)``, or per bit ``(..., bits)``.
        """
        logits = self._check_logits(logits)
        if (indices is None) == (one_hot is None):
            raise ValueError("log_prob needs exactly one of indices= or one_hot=")
        if one_hot is not None:
            indices = one_hot.argmax(dim=-1)
        else:  # values in [0, 2**bits): a ValueError otherwise
            indices = check_code_indices("indices", indices, self.num_codes, min_ndim=1)
        bits = indices_to_bits(indices, self.bits)
        log_probs = torch.where(bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(dim=-1) if sum_bits else log_probs

    def forward(
        self,
        logits: Tensor,
        temperature: float = 1.0,
        straight_through: bool | None = None,
        calc_aux_loss: bool | None = None,
        deterministic: bool | None = None,
        return_indices: bool = False,
        reduce_aux_kl_loss: bool = True,
    ):
        logits = self._check_logits(logits)
        if not isinstance(temperature, Tensor):
            check_float("temperature", temperature, minimum=0.0, min_exclusive=True)
        deterministic = self.deterministic_on_eval and not self.training if deterministic is None else deterministic
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss

        prob_for_sample = (logits / temperature).sigmoid()
        # a NaN logit gives bit 0 when sampled, as in deterministic mode (bernoulli would raise from inside)
        sampled_bits = prob_for_sample > 0.5 if deterministic else prob_for_sample.nan_to_num(0.0).bernoulli()
        indices = bits_to_indices(sampled_bits)
        out_dtype = torch.promote_types(logits.dtype, torch.float32)
        one_hot = F.one_hot(indices, self.num_codes).to(out_dtype)

        if calc_aux_loss:
            aux_kl_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss=reduce_aux_kl_loss)
        else:
            aux_kl_loss = torch.zeros((), device=logits.device)

        if straight_through:
            soft = code_probabilities(logits.to(out_dtype))
            one_hot = attach_gradient(one_hot, soft)  # exactly the one-hot forward, soft gradient

        if return_indices:
            return one_hot, indices, aux_kl_loss
        return one_hot, aux_kl_loss
