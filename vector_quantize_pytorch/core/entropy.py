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
  is bounded by ``CODE_CHUNK_BUDGET`` and ``TABLE_BUDGET`` whatever ``K``; time is about ``3 n 2^K``
  multiply-adds (``4 n 2^K`` with a hook), as a ``2^(K/2) x 2^(K/2)`` product over all codes at once
  would take, without holding the ``2^K`` result.
* Beyond ``EXACT_CODE_ENTROPY_MAX_BITS`` bits that time is too long; then the bits are split into groups
  of at most ``BOUND_GROUP_MAX_BITS`` and the group entropies are summed (BSQ's grouped estimate). By
  subadditivity of entropy, ``H(X_1, ..., X_m) <= H(X_1) + ... + H(X_m)``, so this is an upper bound of
  the exact batch entropy, equal to it when the groups are independent under the batch distribution.

The module constants are read when a function is called, so they can be changed (or monkeypatched).

Entropies are exact: ``-sum p log p`` with ``0 log 0 = 0`` (the log's argument is clamped at the
dtype's smallest normal number, which only matters for ``p = 0``). The reference library instead
computes ``-sum p * log(max(p, 1e-5))``, which undercounts codes of probability below ``1e-5``; the two
agree when every probability is above ``1e-5``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .radix import all_bit_patterns

EXACT_CODE_ENTROPY_MAX_BITS = 24  # exact batch entropy up to 2^24 codes per codebook (time ~ 3 n 2^K)
BOUND_GROUP_MAX_BITS = 16  # bit-group size of the grouped upper bound used beyond that
CODE_CHUNK_BUDGET = 2**18  # elements (codebooks x codes) of one chunk of the mean distribution: 1 MB in float32
TABLE_BUDGET = 2**17  # elements of one token chunk's two per-bit-product tables: 512 KB in float32


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, ``-sum p log p`` over ``dim`` with ``0 log 0 = 0`` (finite gradient at 0)."""
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * probs.clamp(min=tiny).log()).sum(dim=dim)


def _entropy_and_grad(probs: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`entropy` ``(c,)`` of ``(c, ...)`` probabilities and its derivative ``-(log p + 1)`` (with the same
    clamped log, so at ``p = 0`` it is the derivative at ``tiny``), holding one extra copy of ``probs``."""
    tiny = torch.finfo(probs.dtype).tiny
    log_probs = probs.clamp(min=tiny).log_()
    value = -torch.einsum("cm,cm->c", probs.flatten(1), log_probs.flatten(1))
    return value, log_probs.add_(1.0).neg_()


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


def _bit_probs(bit_logits: Tensor) -> Tensor:
    """``(..., h)`` logits -> ``(..., h, 2)`` probabilities of each bit being 0 and 1."""
    return torch.stack([torch.sigmoid(-bit_logits), torch.sigmoid(bit_logits)], dim=-1)


def _pattern_products(bit_probs: Tensor) -> Tensor:
    """``(..., h, 2)`` per-bit probabilities -> ``(..., 2^h)`` products over the bits of every pattern.

    Neighbouring tables are paired level by level (all pairs of a level in one multiplication), so the
    ``2^h`` products take about ``log2(h)`` operations; a table left without a partner covers the highest
    bits of its level and is multiplied in at the end.
    """
    tables, unpaired = bit_probs, []
    while tables.shape[-2] > 1:
        if tables.shape[-2] % 2:
            unpaired.append(tables[..., -1, :])
            tables = tables[..., :-1, :]
        tables = (tables[..., 1::2, :, None] * tables[..., 0::2, None, :]).flatten(-2)
    table = tables[..., 0, :] if tables.shape[-2] else bit_probs.new_ones(*bit_probs.shape[:-2], 1)
    for high in reversed(unpaired):
        table = (high[..., :, None] * table[..., None, :]).flatten(-2)
    return table


def bit_product_table(bit_logits: Tensor) -> Tensor:
    """Each token's probability of every ``h``-bit pattern, as a product of per-bit Bernoullis.

    Shape: ``(n, c, h)`` -> ``(n, c, 2^h)``; entry ``i`` is the probability of the bits of ``i`` with
    logit ``k`` giving bit ``k`` (weight ``2^k``).
    """
    return _pattern_products(_bit_probs(bit_logits))


def _scaled_bit_product_table(bit_logits: Tensor, scale: Tensor) -> Tensor:
    """``bit_product_table(bit_logits) * scale`` (``scale`` ``(n, 1 or c, 1)``), the scale folded into the
    first bit's two probabilities rather than multiplied into all ``2^h`` products."""
    if bit_logits.shape[-1] == 0:
        return scale.expand(*bit_logits.shape[:-1], 1)
    bit_probs = _bit_probs(bit_logits)
    bit_probs[..., 0, :] *= scale
    return _pattern_products(bit_probs)


def _weighted_grad_to_logits(weighted: Tensor, bit_logits: Tensor, patterns: Tensor) -> Tensor:
    """Chain rule through :func:`bit_product_table`: ``d table_i / d l_k = table_i * (bit_k(i) - p_k)``, given
    ``weighted = d loss / d table * table``."""
    return weighted @ patterns - torch.sigmoid(bit_logits) * weighted.sum(dim=-1, keepdim=True)


class CodeChunking(NamedTuple):
    """How the ``2^K`` codes of the batch mean are split into chunks, and the tokens into chunks.

    Bits ``[0, low_bits)`` and ``[low_bits, low_bits + mid_bits)`` vary inside a chunk (every pattern of
    them is in it); the remaining ``top_bits`` are fixed and spell the chunk's number, so chunk ``j`` holds
    the codes ``j * 2^(low_bits + mid_bits)`` to ``(j + 1) * 2^(low_bits + mid_bits) - 1``, in order.
    """

    low_bits: int
    mid_bits: int
    top_bits: int
    token_chunk: int  # tokens whose probability tables are built at once

    @property
    def num_chunks(self) -> int:
        return 2**self.top_bits

    @classmethod
    def plan(cls, num_codebooks: int, num_bits: int) -> CodeChunking:
        """Square-ish chunks of at most ``CODE_CHUNK_BUDGET`` elements, tables of at most ``TABLE_BUDGET``."""
        budget_bits = max(0, (CODE_CHUNK_BUDGET // num_codebooks).bit_length() - 1)
        low_bits = min(num_bits // 2, budget_bits // 2)
        mid_bits = min(num_bits - low_bits, budget_bits - low_bits)
        token_chunk = max(1, TABLE_BUDGET // (num_codebooks * (2**low_bits + 2**mid_bits)))
        return cls(low_bits, mid_bits, num_bits - low_bits - mid_bits, token_chunk)


def _top_bits_of_chunk(chunking: CodeChunking, chunk: int, like: Tensor) -> Tensor:
    """``(top_bits,)`` 0/1 values of the fixed top bits of chunk ``chunk`` (least significant first)."""
    bits = [float((chunk >> k) & 1) for k in range(chunking.top_bits)]
    return torch.tensor(bits, dtype=like.dtype, device=like.device)


def _chunk_tables(logits: Tensor, w: Tensor, chunking: CodeChunking, top_bits: Tensor) -> tuple[Tensor, Tensor]:
    """A token chunk's probabilities of the chunk's low patterns ``(t, c, 2^low)``, and of its high patterns
    (mid bits varying, top bits fixed) times the token weights ``w`` ``(t, 1, 1)``, ``(t, c, 2^mid)``: the
    weighted probability of code ``(mid, low)`` of the chunk is ``high[mid] * low[low]``."""
    low_end, mid_end = chunking.low_bits, chunking.low_bits + chunking.mid_bits
    low = bit_product_table(logits[..., :low_end])
    scale = w
    if chunking.top_bits:
        signs = 2 * top_bits - 1  # probability of bit k being as in the chunk number: sigmoid(+-l_k)
        scale = torch.sigmoid(logits[..., mid_end:] * signs).prod(dim=-1, keepdim=True) * w
    return low, _scaled_bit_product_table(logits[..., low_end:mid_end], scale)


def _chunk_mean(bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, chunk: int) -> Tensor:
    """Weighted batch mean of the codes of one chunk, ``(c, 2^mid, 2^low)``, accumulated over token chunks."""
    num_tokens, num_codebooks, _ = bit_logits.shape
    top_bits = _top_bits_of_chunk(chunking, chunk, bit_logits)
    dist = bit_logits.new_zeros(num_codebooks, 2**chunking.mid_bits, 2**chunking.low_bits)
    for start in range(0, num_tokens, chunking.token_chunk):
        rows = slice(start, start + chunking.token_chunk)
        low, high = _chunk_tables(bit_logits[rows], weights[rows, None, None], chunking, top_bits)
        dist.baddbmm_(high.permute(1, 2, 0), low.transpose(0, 1))  # c j i += sum_t high * low
    return dist


def _add_chunk_grad(
    grad_logits: Tensor, bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, chunk: int, grad_dist: Tensor
) -> None:
    """Add to ``grad_logits`` ``(n, c, K)`` the gradient that ``grad_dist`` ``(c, 2^mid, 2^low)`` on one chunk's
    batch mean sends to the bit logits, streaming over token chunks (the forward's factorisation, reversed)."""
    low_end, mid_end = chunking.low_bits, chunking.low_bits + chunking.mid_bits
    like = {"device": bit_logits.device, "dtype": bit_logits.dtype}
    low_patterns, mid_patterns = all_bit_patterns(low_end, **like), all_bit_patterns(chunking.mid_bits, **like)
    top_bits = _top_bits_of_chunk(chunking, chunk, bit_logits)
    for start in range(0, bit_logits.shape[0], chunking.token_chunk):
        rows = slice(start, start + chunking.token_chunk)
        logits = bit_logits[rows]
        low, high = _chunk_tables(logits, weights[rows, None, None], chunking, top_bits)
        # d loss / d table * table, for both tables (the weights are in `high`)
        weighted_low = torch.bmm(high.transpose(0, 1), grad_dist).transpose(0, 1).mul_(low)  # (t, c, 2^low)
        weighted_high = torch.bmm(low.transpose(0, 1), grad_dist.transpose(1, 2)).transpose(0, 1).mul_(high)
        grad = grad_logits[rows]
        grad[..., :low_end] += _weighted_grad_to_logits(weighted_low, logits[..., :low_end], low_patterns)
        grad[..., low_end:mid_end] += _weighted_grad_to_logits(
            weighted_high, logits[..., low_end:mid_end], mid_patterns
        )
        if chunking.top_bits:
            # the top bits scale the whole high table: d high_j / d l_k = high_j * (bit_k - p_k)
            total = weighted_high.sum(dim=-1, keepdim=True)
            grad[..., mid_end:] += total * (top_bits - torch.sigmoid(logits[..., mid_end:]))


class _LocalCodeEntropy(torch.autograd.Function):
    """``(n, c, K)`` bit logits, ``(n,)`` weights -> ``(c,)`` exact batch entropies, streamed over chunks of
    codes. ``dH / dp = -(log p + 1)`` is known as soon as a chunk's mean is, so the gradient of the entropy
    with respect to the bit logits is accumulated during the forward (one more pass over the tokens per
    chunk) and the backward only scales it: no chunk is recomputed."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, needs_grad: bool) -> Tensor:
        num_codebooks = bit_logits.shape[1]
        total = bit_logits.new_zeros(num_codebooks)
        grad_logits = torch.zeros_like(bit_logits, memory_format=torch.contiguous_format) if needs_grad else None
        with torch.autocast(bit_logits.device.type, enabled=False):
            for chunk in range(chunking.num_chunks):
                chunk_entropy, grad_dist = _entropy_and_grad(_chunk_mean(bit_logits, weights, chunking, chunk))
                total += chunk_entropy
                if needs_grad:
                    _add_chunk_grad(grad_logits, bit_logits, weights, chunking, chunk, grad_dist)
                del grad_dist  # before the next chunk's mean is allocated
        ctx.save_for_backward(grad_logits)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy: Tensor):
        (grad_logits,) = ctx.saved_tensors
        return grad_logits * grad_entropy.to(grad_logits.dtype)[None, :, None], None, None, None


class _ChunkMean(torch.autograd.Function):
    """``(n, c, K)`` bit logits, ``(n,)`` weights -> ``(c, codes of the chunk)`` batch mean of one chunk of
    codes. The backward streams over the tokens too: its memory is that of the forward."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, chunk: int) -> Tensor:
        with torch.autocast(bit_logits.device.type, enabled=False):
            dist = _chunk_mean(bit_logits, weights, chunking, chunk)
        ctx.save_for_backward(bit_logits, weights)
        ctx.chunking, ctx.chunk = chunking, chunk
        return dist.flatten(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dist: Tensor):
        bit_logits, weights = ctx.saved_tensors
        chunking = ctx.chunking
        grad_dist = grad_dist.to(bit_logits.dtype).reshape(-1, 2**chunking.mid_bits, 2**chunking.low_bits)
        grad_logits = torch.zeros_like(bit_logits, memory_format=torch.contiguous_format)
        with torch.autocast(bit_logits.device.type, enabled=False):
            _add_chunk_grad(grad_logits, bit_logits, weights, chunking, ctx.chunk, grad_dist)
        return grad_logits, None, None, None


class _RecomputedChunkEntropy(torch.autograd.Function):
    """Entropy ``(c,)`` of one chunk of the (reduced) batch mean that keeps no copy of the chunk: the backward
    recomputes the chunk from the bit logits (and ``reduce_mean``) to form ``dH / dp = -(log p + 1)``."""

    @staticmethod
    def forward(ctx, dist, bit_logits, weights, chunking: CodeChunking, chunk: int, reduce_mean) -> Tensor:
        ctx.save_for_backward(bit_logits, weights)
        ctx.chunking, ctx.chunk, ctx.reduce_mean = chunking, chunk, reduce_mean
        return entropy(dist)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy: Tensor):
        bit_logits, weights = ctx.saved_tensors
        with torch.autocast(bit_logits.device.type, enabled=False):
            dist = ctx.reduce_mean(_chunk_mean(bit_logits, weights, ctx.chunking, ctx.chunk).flatten(1))
            grad_dist = _entropy_and_grad(dist)[1].mul_(grad_entropy[:, None].to(dist.dtype))
        return grad_dist, None, None, None, None, None


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
    chunking = CodeChunking.plan(num_codebooks, num_bits)
    chunks = [_ChunkMean.apply(bit_logits, weights, chunking, chunk) for chunk in range(chunking.num_chunks)]
    return torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]


def exact_code_entropy(
    bit_logits: Tensor, weights: Tensor, reduce_mean: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Exact entropy of the batch-mean distribution over all ``2^K`` codes, streamed over chunks of codes.

    Memory stays within ``CODE_CHUNK_BUDGET`` and ``TABLE_BUDGET`` (plus the inputs) whatever ``K``. Without
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
    chunking = CodeChunking.plan(bit_logits.shape[1], bit_logits.shape[2])
    if reduce_mean is None:
        needs_grad = torch.is_grad_enabled() and bit_logits.requires_grad
        return _LocalCodeEntropy.apply(bit_logits, weights, chunking, needs_grad)
    if chunking.num_chunks == 1:
        return entropy(reduce_mean(_ChunkMean.apply(bit_logits, weights, chunking, 0)))
    total = None
    for chunk in range(chunking.num_chunks):
        reduced = reduce_mean(_ChunkMean.apply(bit_logits, weights, chunking, chunk))
        chunk_entropy = _RecomputedChunkEntropy.apply(reduced, bit_logits, weights, chunking, chunk, reduce_mean)
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
    weights = weights.to(bit_logits.dtype)
    total = None
    for group in bit_groups(bit_logits.shape[-1], max_exact_bits, group_bits):
        group_entropy = exact_code_entropy(bit_logits[..., group], weights, reduce_mean)
        total = group_entropy if total is None else total + group_entropy
    return total
