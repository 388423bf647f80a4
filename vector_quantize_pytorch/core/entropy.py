"""Entropy terms of lookup-free quantization (LFQ, MAGVIT-v2 arXiv 2310.05737; BSQ arXiv 2406.07548).

A token ``x`` in ``R^K`` gets a soft assignment over the ``2^K`` corners ``c`` of the cube ``{-s, +s}^K``:

    q(c | x) = softmax_c(2 * tau * <x, c>)          (tau = inverse temperature)

Every corner has the same norm, so the softmax factorises into one Bernoulli per bit: flipping bit ``k``
from ``-s`` to ``+s`` adds ``4 * tau * s * x_k`` to the logit and nothing else, hence

    q(c | x) = prod_k p_k^{b_k} (1 - p_k)^{1 - b_k},    p_k = sigmoid(l_k),   l_k = 4 * tau * s * x_k,

with ``b_k = 1`` where ``c_k = +s``. Everything below works from these per-bit logits ``l`` (shape
``(n, c, K)``: tokens, codebooks, bits) and never forms the ``n x 2^K`` matrix.

* Per-sample entropy ``H(q(. | x))`` is a sum of ``K`` binary entropies: O(K) per token, exact.
* Batch ("codebook") entropy ``H(mean_x q(. | x))`` does not factorise, but the mean distribution is
  cheap exactly: split the bits into a low and a high half; each token's probability of a code is the
  product of its low-half and high-half probabilities, so the batch mean over all ``2^K`` codes is one
  matrix product ``P_low^T diag(w) P_high`` of two ``n x 2^(K/2)`` tables. It is computed in chunks of
  tokens with an analytic, chunked backward, so memory stays bounded by ``TABLE_BUDGET`` plus the
  ``2^K`` result.
* Beyond ``EXACT_CODE_ENTROPY_MAX_BITS`` bits the ``2^K`` result itself is too large; then the bits are
  split into groups of at most ``BOUND_GROUP_MAX_BITS`` and the group entropies are summed (BSQ's
  grouped estimate). By subadditivity of entropy, ``H(X_1, ..., X_m) <= H(X_1) + ... + H(X_m)``, so this
  is an upper bound of the exact batch entropy, equal to it when the groups are independent under the
  batch distribution.

Entropies are exact: ``-sum p log p`` with ``0 log 0 = 0``. The reference library instead computes
``-sum p * log(max(p, 1e-5))``, which undercounts codes of probability below ``1e-5``; the two agree when
every probability is above ``1e-5``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .radix import all_bit_patterns

EXACT_CODE_ENTROPY_MAX_BITS = 24  # exact batch entropy up to 2^24 codes per codebook (a 64 MB distribution)
BOUND_GROUP_MAX_BITS = 16  # bit-group size of the grouped upper bound used beyond that
TABLE_BUDGET = 2**22  # elements of one chunk's per-half probability table (16 MB in float32)


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, ``-sum p log p`` over ``dim`` with ``0 log 0 = 0`` (finite gradient at 0)."""
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * probs.clamp(min=tiny).log()).sum(dim=dim)


def bernoulli_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of ``Bernoulli(sigmoid(logits))``, elementwise.

    Written as ``p * softplus(-l) + (1 - p) * softplus(l)``: both terms are accurate (no cancellation)
    for large ``|l|``, where the entropy is tiny.
    """
    return torch.sigmoid(logits) * F.softplus(-logits) + torch.sigmoid(-logits) * F.softplus(logits)


def token_weights(mask: Tensor | None, num_tokens: int, *, dtype: torch.dtype, device) -> Tensor:
    """Weights ``(n,)`` of a mean over the tokens where ``mask`` is True (all tokens when None).

    They sum to 1, or are all 0 when the mask excludes every token (then every mean below is 0).
    """
    if mask is None:
        return torch.full((num_tokens,), 1.0 / max(num_tokens, 1), dtype=dtype, device=device)
    weights = mask.to(dtype)
    return weights / weights.sum().clamp(min=1.0)


def per_sample_entropy(bit_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over tokens (and codebooks) of the entropy of each token's distribution over the ``2^K`` codes.

    Args:
        bit_logits: ``(n, c, K)`` per-bit logits ``l = 4 * tau * s * x``.
        weights: ``(n,)`` token weights summing to 1 (see :func:`token_weights`); None for a plain mean.

    Returns:
        A 0-dim tensor: ``sum_n w_n * mean_c sum_k H(sigmoid(l_nck))``.
    """
    per_token = bernoulli_entropy(bit_logits).sum(dim=-1).mean(dim=-1)
    if weights is None:
        return per_token.mean()
    return (per_token * weights).sum()


def bit_product_table(bit_logits: Tensor) -> Tensor:
    """Each token's probability of every ``h``-bit pattern, as a product of per-bit Bernoullis.

    Shape: ``(n, c, h)`` -> ``(n, c, 2^h)``; entry ``i`` is the probability of the bits of ``i`` with
    logit ``k`` giving bit ``k`` (weight ``2^k``).
    """
    bit_probs = torch.stack([torch.sigmoid(-bit_logits), torch.sigmoid(bit_logits)], dim=-1)  # (n, c, h, 2)
    table = bit_logits.new_ones(*bit_logits.shape[:-1], 1)
    for k in range(bit_logits.shape[-1]):
        table = (bit_probs[..., k, :, None] * table[..., None, :]).flatten(-2)
    return table


def _table_grad_to_logits(grad_table: Tensor, table: Tensor, bit_logits: Tensor, patterns: Tensor) -> Tensor:
    """Chain rule through :func:`bit_product_table`: ``d table_i / d l_k = table_i * (bit_k(i) - p_k)``."""
    weighted = grad_table * table
    return weighted @ patterns - torch.sigmoid(bit_logits) * weighted.sum(dim=-1, keepdim=True)


def _chunk_tokens(num_codebooks: int, table_width: int) -> int:
    return max(1, TABLE_BUDGET // (num_codebooks * table_width))


class _MeanCodeDistribution(torch.autograd.Function):
    """``(n, c, K)`` bit logits, ``(n,)`` weights -> ``(c, 2^(K - K//2), 2^(K//2))`` weighted mean of the
    per-token code distributions, indexed ``[c, high bits, low bits]``. Chunked over tokens both ways."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, weights: Tensor) -> Tensor:
        num_tokens, num_codebooks, num_bits = bit_logits.shape
        low_bits = num_bits // 2
        chunk = _chunk_tokens(num_codebooks, 2 ** (num_bits - low_bits))
        dist = bit_logits.new_zeros(num_codebooks, 2 ** (num_bits - low_bits), 2**low_bits)
        with torch.autocast(bit_logits.device.type, enabled=False):
            for start in range(0, num_tokens, chunk):
                logits, w = bit_logits[start : start + chunk], weights[start : start + chunk, None, None]
                low = bit_product_table(logits[..., :low_bits]) * w  # (n, c, I)
                high = bit_product_table(logits[..., low_bits:])  # (n, c, J)
                dist.baddbmm_(high.permute(1, 2, 0), low.transpose(0, 1))  # c j i += sum_n high * low
        ctx.save_for_backward(bit_logits, weights)
        return dist

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dist: Tensor):
        bit_logits, weights = ctx.saved_tensors
        num_tokens, num_codebooks, num_bits = bit_logits.shape
        low_bits = num_bits // 2
        chunk = _chunk_tokens(num_codebooks, 2 ** (num_bits - low_bits))
        grad_logits = torch.empty_like(bit_logits)
        low_patterns = all_bit_patterns(low_bits, device=bit_logits.device, dtype=bit_logits.dtype)
        high_patterns = all_bit_patterns(num_bits - low_bits, device=bit_logits.device, dtype=bit_logits.dtype)
        grad_dist = grad_dist.to(bit_logits.dtype)
        with torch.autocast(bit_logits.device.type, enabled=False):
            for start in range(0, num_tokens, chunk):
                logits, w = bit_logits[start : start + chunk], weights[start : start + chunk, None, None]
                low_logits, high_logits = logits[..., :low_bits], logits[..., low_bits:]
                low, high = bit_product_table(low_logits), bit_product_table(high_logits)
                grad_low = torch.bmm(high.transpose(0, 1), grad_dist).transpose(0, 1) * w  # (n, c, I)
                grad_high = torch.bmm(low.transpose(0, 1), grad_dist.transpose(1, 2)).transpose(0, 1) * w
                rows = slice(start, start + chunk)
                grad_logits[rows, :, :low_bits] = _table_grad_to_logits(grad_low, low, low_logits, low_patterns)
                grad_logits[rows, :, low_bits:] = _table_grad_to_logits(grad_high, high, high_logits, high_patterns)
        return grad_logits, None


def mean_code_distribution(bit_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Exact weighted mean over tokens of each token's distribution over all ``2^K`` codes.

    Args:
        bit_logits: ``(n, c, K)`` per-bit logits.
        weights: ``(n,)`` token weights summing to 1; None for a plain mean.

    Returns:
        ``(c, 2^K)``; code ``i`` has bit ``k`` (weight ``2^k``) set where logit ``k`` says +1.
        Differentiable in ``bit_logits``. Memory: ``2^K`` per codebook plus a ``TABLE_BUDGET`` chunk.
    """
    num_tokens = bit_logits.shape[0]
    if weights is None:
        weights = token_weights(None, num_tokens, dtype=bit_logits.dtype, device=bit_logits.device)
    dist = _MeanCodeDistribution.apply(bit_logits, weights.to(bit_logits.dtype))
    return dist.flatten(1)


def bit_groups(num_bits: int, max_exact_bits: int, group_bits: int) -> list[slice]:
    """The bit ranges whose code entropies are summed: all bits at once when ``num_bits <= max_exact_bits``,
    else ``ceil(num_bits / group_bits)`` near-equal groups."""
    if num_bits <= max_exact_bits:
        return [slice(0, num_bits)]
    num_groups = -(-num_bits // group_bits)
    bounds = [round(g * num_bits / num_groups) for g in range(num_groups + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def code_entropy(
    bit_logits: Tensor,
    weights: Tensor | None = None,
    *,
    reduce_mean: Callable[[Tensor], Tensor] | None = None,
    max_exact_bits: int = EXACT_CODE_ENTROPY_MAX_BITS,
    group_bits: int = BOUND_GROUP_MAX_BITS,
) -> Tensor:
    """Entropy of the batch-mean code distribution, per codebook: exact, or the grouped upper bound.

    With ``K <= max_exact_bits`` this is ``H(mean_n q(. | x_n))`` over all ``2^K`` codes, exactly. With
    more bits the bits are split into groups of at most ``group_bits`` and the exact entropies of the
    groups' mean distributions are summed: an upper bound of the exact value (subadditivity of entropy).

    Args:
        bit_logits: ``(n, c, K)`` per-bit logits.
        weights: ``(n,)`` token weights summing to 1; None for a plain mean.
        reduce_mean: hook applied to every mean distribution ``(c, 2^k)`` before its entropy is taken, e.g.
            a differentiable all-reduce mean over data-parallel ranks. None: this process's tokens only.
        max_exact_bits: largest ``K`` computed exactly.
        group_bits: largest group of the bound.

    Returns:
        ``(c,)`` entropies in nats.
    """
    total = None
    for group in bit_groups(bit_logits.shape[-1], max_exact_bits, group_bits):
        dist = mean_code_distribution(bit_logits[..., group], weights)
        if reduce_mean is not None:
            dist = reduce_mean(dist)
        group_entropy = entropy(dist)
        total = group_entropy if total is None else total + group_entropy
    return total
