"""Entropy terms of lookup-free quantization (LFQ, MAGVIT-v2 arXiv 2310.05737; BSQ arXiv 2406.07548).

A token ``x`` in ``R^K`` gets a soft assignment over the ``2^K`` corners ``c`` of the cube ``{-s, +s}^K``:

    q(c | x) = softmax_c(2 * tau * <x, c>)          (tau = inverse temperature)

Every corner has the same norm, so the softmax factorises into one Bernoulli per bit: flipping bit ``k``
from ``-s`` to ``+s`` adds ``4 * tau * s * x_k`` to the logit and nothing else, hence

    q(c | x) = prod_k p_k^{b_k} (1 - p_k)^{1 - b_k},    p_k = sigmoid(l_k),   l_k = 4 * tau * s * x_k,

with ``b_k = 1`` where ``c_k = +s``. Everything below works from these per-bit logits ``l`` (shape
``(n, c, K)``: tokens, codebooks, bits) and never forms the ``n x 2^K`` matrix.

* Per-sample entropy ``H(q(. | x))`` is a sum of ``K`` binary entropies: O(K) per token, exact.
* Batch ("codebook") entropy ``H(mean_x q(. | x))`` does not factorise, but it is a sum over codes of
  ``-p_i log p_i``, so it can be streamed over chunks of codes without ever holding all ``2^K`` mean
  probabilities. A chunk is the set of codes whose top bits equal the chunk's number; its codes split
  into ``low`` and ``mid`` bits, and a token's probability of code ``(mid, low)`` of the chunk is the
  product ``P_top * P_mid[mid] * P_low[low]`` of per-bit products. The chunk's batch mean is therefore
  one matrix product ``(P_top P_mid)^T diag(w) P_low`` accumulated over chunks of tokens. The gradient
  needs ``dH / dp_i = -(log p_i + 1)`` for every code, known once the chunk's mean is: it is sent back
  through the same factorisation (two more products per token chunk) during the forward, chunk by chunk,
  and the backward only scales it. With a ``reduce_mean`` hook (an all-reduce over data-parallel ranks)
  the chunk's mean must first go through the hook, so the backward recomputes each chunk instead. Memory
  is bounded whatever ``K`` by the budgets ``entropy_codes`` (codes of a chunk) and ``entropy_table``
  (elements of a token chunk's tables) of :func:`~vector_quantize_pytorch.core.policy.chunk_policy`,
  chosen per device type: about ``2 * entropy_codes + 2 * entropy_table`` elements at once (a chunk's mean
  and its gradient, a token chunk's tables and theirs) besides tensors of the logits' size. Time is about
  ``3 n 2^K`` multiply-adds (``4 n 2^K`` with a hook), as a ``2^(K/2) x 2^(K/2)`` product over all codes at
  once would take, without holding the ``2^K`` result. When every token fits in one chunk the gradient
  pass reuses the mean's tables, and when there are as many low as mid bits both tables come from one
  product tree: with an accelerator's budgets a whole step of the entropy is then about fifty operators.
* Beyond ``EXACT_CODE_ENTROPY_MAX_BITS`` bits that time is too long; then the bits are split into groups
  of at most ``BOUND_GROUP_MAX_BITS`` and the group entropies are summed (BSQ's grouped estimate). By
  subadditivity of entropy, ``H(X_1, ..., X_m) <= H(X_1) + ... + H(X_m)``, so this is an upper bound of
  the exact batch entropy, equal to it when the groups are independent under the batch distribution.

The module constants and the chunk policy are read when a function is called, so they can be changed (or
monkeypatched; :func:`~vector_quantize_pytorch.core.policy.use_chunk_policy` for the budgets).

Entropies are exact (:func:`shannon_entropy`): ``-sum p log p`` with ``0 log 0 = 0`` (the log's argument is
clamped at the dtype's smallest normal number, which only matters for ``p = 0``). Clamping at ``1e-5`` instead
(:func:`~vector_quantize_pytorch.core.losses.clamped_entropy`) would undercount codes of probability below
``1e-5``, of which a batch entropy over ``2^K`` codes has many.

The streamed chunks are :mod:`~vector_quantize_pytorch.core.code_chunks`; the autograd functions that send
their gradients back are in :mod:`~vector_quantize_pytorch.core.autograd`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import ChunkMean, LocalCodeEntropy, RecomputedChunkEntropy
from .code_chunks import CodeChunking, bit_product_table, shannon_entropy
from .tensors import as_dtype

__all__ = [
    "BOUND_GROUP_MAX_BITS",
    "EXACT_CODE_ENTROPY_MAX_BITS",
    "CodeChunking",
    "bernoulli_entropy",
    "bit_groups",
    "bit_product_table",
    "code_entropy",
    "exact_code_entropy",
    "mean_code_distribution",
    "per_sample_entropy",
    "shannon_entropy",
    "token_weights",
]

EXACT_CODE_ENTROPY_MAX_BITS = 24  # exact batch entropy up to 2^24 codes per codebook (time ~ 3 n 2^K)
BOUND_GROUP_MAX_BITS = 16  # bit-group size of the grouped upper bound used beyond that


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


def mean_code_distribution(bit_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Exact weighted mean over tokens of each token's distribution over all ``2^K`` codes.

    This materialises all ``2^K`` probabilities (it is for inspection and tests); :func:`code_entropy`
    never holds more than one chunk of them.

    Args:
        bit_logits: ``(n, c, K)`` per-bit logits.
        weights: ``(n,)`` token weights summing to 1; None for a plain mean.

    Returns:
        ``(c, 2^K)``; code ``i`` has bit ``k`` (weight ``2^k``) set where logit ``k`` says +1.
        Differentiable in ``bit_logits``.
    """
    num_tokens, num_codebooks, num_bits = bit_logits.shape
    if weights is None:
        weights = token_weights(None, num_tokens, dtype=bit_logits.dtype, device=bit_logits.device)
    weights = weights.to(bit_logits.dtype)
    chunking = CodeChunking.plan(num_codebooks, num_bits, bit_logits.device)
    chunks = [ChunkMean.apply(bit_logits, weights, chunking, chunk) for chunk in range(chunking.num_chunks)]
    return torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]


def exact_code_entropy(
    bit_logits: Tensor, weights: Tensor, reduce_mean: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Exact entropy of the batch-mean distribution over all ``2^K`` codes, streamed over chunks of codes.

    Memory stays within the ``entropy_codes`` and ``entropy_table`` budgets of the chunk policy for the
    logits' device (plus tensors of the logits' size) whatever ``K``. Without
    ``reduce_mean`` the gradient is formed during the forward (about ``3 n 2^K`` multiply-adds in all, and
    ``n 2^K`` without autograd). With it, each chunk's mean goes through it and the backward recomputes the
    chunk (``4 n 2^K``), unless the whole distribution is one chunk, which is then kept for the backward.

    Args:
        bit_logits: ``(n, c, K)`` per-bit logits.
        weights: ``(n,)`` token weights summing to 1, in the dtype of ``bit_logits``.
        reduce_mean: see :func:`code_entropy`; applied to each chunk ``(c, codes of the chunk)`` (in the
            forward, and again in the backward). None: this process's tokens.

    Returns:
        ``(c,)`` entropies in nats.
    """
    chunking = CodeChunking.plan(bit_logits.shape[1], bit_logits.shape[2], bit_logits.device)
    if reduce_mean is None:
        needs_grad = torch.is_grad_enabled() and bit_logits.requires_grad
        return LocalCodeEntropy.apply(bit_logits, weights, chunking, needs_grad)
    if chunking.num_chunks == 1:
        return shannon_entropy(reduce_mean(ChunkMean.apply(bit_logits, weights, chunking, 0)))
    total = None
    for chunk in range(chunking.num_chunks):
        reduced = reduce_mean(ChunkMean.apply(bit_logits, weights, chunking, chunk))
        chunk_entropy = RecomputedChunkEntropy.apply(reduced, bit_logits, weights, chunking, chunk, reduce_mean)
        total = chunk_entropy if total is None else total + chunk_entropy
    return total


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
    max_exact_bits: int | None = None,
    group_bits: int | None = None,
) -> Tensor:
    """Entropy of the batch-mean code distribution, per codebook: exact, or the grouped upper bound.

    With ``K <= max_exact_bits`` this is ``H(mean_n q(. | x_n))`` over all ``2^K`` codes, exactly. With
    more bits the bits are split into groups of at most ``group_bits`` and the exact entropies of the
    groups' mean distributions are summed: an upper bound of the exact value (subadditivity of entropy).
    Either way memory does not grow with ``K`` (see :func:`exact_code_entropy`).

    Args:
        bit_logits: ``(n, c, K)`` per-bit logits.
        weights: ``(n,)`` token weights summing to 1; None for a plain mean.
        reduce_mean: hook applied to the mean distribution before its entropy is taken, e.g. a
            differentiable all-reduce mean over data-parallel ranks. It gets the distribution one chunk of
            codes at a time, ``(c, codes of the chunk)``, so it must act on each code independently (as a
            mean over ranks does), and it is called again on each chunk in the backward (pass None when
            there is nothing to reduce: the fast path forms the gradient in the forward pass). None: this
            process's tokens only.
        max_exact_bits: largest ``K`` computed exactly; None: ``EXACT_CODE_ENTROPY_MAX_BITS`` at call time.
        group_bits: largest group of the bound; None: ``BOUND_GROUP_MAX_BITS`` at call time.

    Returns:
        ``(c,)`` entropies in nats.

    Example::

        >>> bit_logits = torch.randn(1024, 1, 10)  # 1024 tokens, one codebook of 2^10 codes
        >>> code_entropy(bit_logits).shape
        torch.Size([1])
    """
    max_exact_bits = EXACT_CODE_ENTROPY_MAX_BITS if max_exact_bits is None else max_exact_bits
    group_bits = BOUND_GROUP_MAX_BITS if group_bits is None else group_bits
    if weights is None:
        weights = token_weights(None, bit_logits.shape[0], dtype=bit_logits.dtype, device=bit_logits.device)
    weights = as_dtype(weights, bit_logits.dtype)
    groups = bit_groups(bit_logits.shape[-1], max_exact_bits, group_bits)
    if len(groups) == 1:
        return exact_code_entropy(bit_logits, weights, reduce_mean)
    total = None
    for group in groups:
        group_entropy = exact_code_entropy(bit_logits[..., group], weights, reduce_mean)
        total = group_entropy if total is None else total + group_entropy
    return total
