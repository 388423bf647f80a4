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

Entropies are exact: ``-sum p log p`` with ``0 log 0 = 0`` (the log's argument is clamped at the
dtype's smallest normal number, which only matters for ``p = 0``). The reference library instead
computes ``-sum p * log(max(p, 1e-5))``, which undercounts codes of probability below ``1e-5``; the two
agree when every probability is above ``1e-5``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .policy import chunk_policy
from .radix import all_bit_patterns
from .tensors import as_dtype

EXACT_CODE_ENTROPY_MAX_BITS = 24  # exact batch entropy up to 2^24 codes per codebook (time ~ 3 n 2^K)
BOUND_GROUP_MAX_BITS = 16  # bit-group size of the grouped upper bound used beyond that


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, ``-sum p log p`` over ``dim`` with ``0 log 0 = 0`` (finite gradient at 0)."""
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * probs.clamp(min=tiny).log()).sum(dim=dim)


def _entropy_and_grad(probs: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`entropy` ``(c,)`` of ``(c, ...)`` probabilities and its derivative ``-(log p + 1)`` (with the same
    clamped log, so at ``p = 0`` it is the derivative at ``tiny``), holding one extra copy of ``probs``."""
    tiny = torch.finfo(probs.dtype).tiny
    neg_log_probs = probs.clamp(min=tiny).log_().neg_()
    return torch.einsum("c...,c...->c", probs, neg_log_probs), neg_log_probs.sub_(1.0)


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
    return torch.stack([bit_logits.neg(), bit_logits], dim=-1).sigmoid_()


def _pattern_products(bit_probs: Tensor) -> Tensor:
    """``(..., h, 2)`` per-bit probabilities -> ``(..., 2^h)`` products over the bits of every pattern.

    Neighbouring tables are paired level by level (all pairs of a level in one multiplication), so the
    ``2^h`` products take about ``log2(h)`` multiplications; a table left without a partner covers the
    highest bits of its level and is multiplied in at the end. A level is four operators (the tables viewed
    as pairs, split into lower and upper tables, the upper one turned into a column, their outer product),
    and a level's ``(pairs, size, size)`` products are the next level's tables without a copy.
    """
    batch = bit_probs.shape[:-2]
    count, size = bit_probs.shape[-2], 2
    tables, unpaired = bit_probs, []  # tables: (..., count, size), possibly as (..., count, root, root)
    while count > 1:
        if count % 2:
            tables = tables.reshape(*batch, count, size)
            unpaired.append(tables[..., -1, :])
            tables, count = tables[..., :-1, :], count - 1
        low, high = tables.reshape(*batch, count // 2, 2, size).split(1, dim=-2)  # (..., pairs, 1, size) each
        tables = high.transpose(-1, -2) * low  # (..., pairs, size, size): pattern high * size + low
        count, size = count // 2, size * size
    table = tables.reshape(*batch, size) if count else bit_probs.new_ones(*batch, 1)
    for high in reversed(unpaired):
        table = (high[..., :, None] * table[..., None, :]).flatten(-2)
    return table


def bit_product_table(bit_logits: Tensor) -> Tensor:
    """Each token's probability of every ``h``-bit pattern, as a product of per-bit Bernoullis.

    Shape: ``(n, c, h)`` -> ``(n, c, 2^h)``; entry ``i`` is the probability of the bits of ``i`` with
    logit ``k`` giving bit ``k`` (weight ``2^k``).
    """
    return _pattern_products(_bit_probs(bit_logits))


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
    def plan(cls, num_codebooks: int, num_bits: int, device: torch.device | str | None = None) -> CodeChunking:
        """Square-ish chunks of at most ``entropy_codes`` elements and tables of at most ``entropy_table``,
        the budgets of :func:`~vector_quantize_pytorch.core.policy.chunk_policy` for ``device``."""
        policy = chunk_policy(device)
        budget_bits = max(0, (policy.entropy_codes // num_codebooks).bit_length() - 1)
        low_bits = min(num_bits // 2, budget_bits // 2)
        mid_bits = min(num_bits - low_bits, budget_bits - low_bits)
        token_chunk = max(1, policy.entropy_table // (num_codebooks * (2**low_bits + 2**mid_bits)))
        return cls(low_bits, mid_bits, num_bits - low_bits - mid_bits, token_chunk)


def _top_bits_of_chunk(chunking: CodeChunking, chunk: int, like: Tensor) -> Tensor | None:
    """``(top_bits,)`` 0/1 values of the fixed top bits of chunk ``chunk`` (least significant first), made on
    ``like``'s device (no copy from the host); None without top bits."""
    if not chunking.top_bits:
        return None
    shifts = torch.arange(chunking.top_bits, device=like.device)
    return torch.bitwise_right_shift(chunk, shifts).bitwise_and_(1).to(like.dtype)


def _mid_patterns(chunking: CodeChunking, like: Tensor) -> Tensor:
    """``(2^mid, mid)`` bits of every mid pattern; the low patterns are its corner ``[:2^low, :low]``
    (``mid_bits >= low_bits``)."""
    return all_bit_patterns(chunking.mid_bits, device=like.device, dtype=like.dtype)


class _Tables(NamedTuple):
    """A token chunk's factor tables: ``low`` ``(c, t, 2^low)`` lists each token's probabilities of the
    chunk's low patterns, ``high`` ``(c, t, 2^mid)`` those of its mid patterns with the top bits as in the
    chunk's number, times the token weight, so that the weighted probability of code ``(mid, low)`` of the
    chunk is ``high[mid] * low[low]``. With as many low as mid bits ``h`` both come from one pattern-product
    tree: they are ``both`` ``(2, c, t, 2^h)`` (contiguous halves, for ``bmm``'s ``out=``), made from the low
    and mid bit logits ``pair_logits`` ``(2, c, t, h)``; else these two are None."""

    low: Tensor
    high: Tensor
    both: Tensor | None = None
    pair_logits: Tensor | None = None


def _token_tables(logits: Tensor, w: Tensor, chunking: CodeChunking, top_bits: Tensor | None) -> _Tables:
    """The tables of a token chunk from its logits ``(c, t, K)`` and token weights ``w`` ``(1, t, 1)``."""
    low_bits, mid_bits = chunking.low_bits, chunking.mid_bits
    scale = w
    if top_bits is not None:
        signs = 2 * top_bits - 1  # probability of bit k being as in the chunk number: sigmoid(+-l_k)
        scale = torch.sigmoid(logits[..., low_bits + mid_bits :] * signs).prod(dim=-1, keepdim=True) * w
        logits = logits[..., : low_bits + mid_bits]
    if not mid_bits:  # (then there are no low bits either)
        shape = (*logits.shape[:-1], 1)
        return _Tables(logits.new_ones(shape), scale.expand(shape))
    # the scale is folded into the first mid bit's two probabilities, not into all 2^mid products
    if low_bits == mid_bits:
        pair_logits = logits.unflatten(-1, (2, low_bits)).permute(2, 0, 1, 3)
        probs = _bit_probs(pair_logits)  # (2, c, t, h, 2), contiguous
        probs[1, ..., 0, :].mul_(scale)
        both = _pattern_products(probs)
        return _Tables(*both.unbind(0), both, pair_logits)
    probs = _bit_probs(logits)
    probs[..., low_bits, :].mul_(scale)
    return _Tables(_pattern_products(probs[..., :low_bits, :]), _pattern_products(probs[..., low_bits:, :]))


def _token_chunks(logits: Tensor, w: Tensor, token_chunk: int) -> Iterator[tuple[Tensor, Tensor, slice]]:
    """``(logits (c, t, K), w (1, t, 1), rows)`` of each chunk of tokens; all tokens as they are (no slicing)
    when they fit in one chunk."""
    if token_chunk >= logits.shape[1]:
        yield logits, w, slice(None)
        return
    for start in range(0, logits.shape[1], token_chunk):
        rows = slice(start, start + token_chunk)
        yield logits[:, rows], w[:, rows], rows


def _chunk_mean(
    logits: Tensor, w: Tensor, chunking: CodeChunking, top_bits: Tensor | None
) -> tuple[Tensor, _Tables | None]:
    """Weighted batch mean of the codes of one chunk, ``(c, 2^mid, 2^low)``, accumulated over token chunks,
    and the tables when every token is in one chunk (the gradient pass then uses them instead of new ones)."""
    dist = None
    for chunk_logits, chunk_w, rows in _token_chunks(logits, w, chunking.token_chunk):
        tables = _token_tables(chunk_logits, chunk_w, chunking, top_bits)
        if dist is None:
            dist = torch.bmm(tables.high.mT, tables.low)  # c j i = sum_t high * low
        else:
            dist.baddbmm_(tables.high.mT, tables.low)
        if rows == slice(None):
            return dist, tables
        del tables  # before the next token chunk's are built
    return dist, None


def _token_chunk_grad(
    logits: Tensor,
    tables: _Tables,
    grad_dist: Tensor,
    mid_patterns: Tensor,
    chunking: CodeChunking,
    top_bits: Tensor | None,
) -> Tensor:
    """The gradient ``(c, t, K)`` that ``grad_dist`` ``(c, 2^mid, 2^low)`` on a chunk's mean sends to the bit
    logits ``(c, t, K)`` of one token chunk, whose tables are ``tables``.

    Chain rule through the tables: ``d table_i / d l_k = table_i * (bit_k(i) - p_k)``, summed over the
    table's patterns ``i`` with ``weighted_i = d loss / d table_i * table_i``. The top bits scale the whole
    high table, so theirs is ``sum_j weighted_high_j * (bit_k - p_k)``.
    """
    low_bits, mid_end = chunking.low_bits, chunking.low_bits + chunking.mid_bits
    if tables.both is not None:
        weighted = torch.empty_like(tables.both)  # (2, c, t, 2^h): d loss / d table * table, low and high
        weighted_low, weighted_high = weighted.unbind(0)
        torch.bmm(tables.high, grad_dist, out=weighted_low)
        torch.bmm(tables.low, grad_dist.mT, out=weighted_high)
        weighted.mul_(tables.both)
        total = weighted.sum(dim=-1, keepdim=True)
        grad = (weighted @ mid_patterns).sub_(torch.sigmoid(tables.pair_logits) * total)  # (2, c, t, h)
        grad = grad.permute(1, 2, 0, 3).reshape(*logits.shape[:-1], mid_end)
        if top_bits is None:
            return grad
        total_high = total[1]
    else:
        weighted_low = torch.bmm(tables.high, grad_dist).mul_(tables.low)
        weighted_high = torch.bmm(tables.low, grad_dist.mT).mul_(tables.high)
        probs = torch.sigmoid(logits if top_bits is None else logits[..., :mid_end])  # the low and mid bits
        total_low, total_high = weighted_low.sum(dim=-1, keepdim=True), weighted_high.sum(dim=-1, keepdim=True)
        low_patterns = mid_patterns[: 2**low_bits, :low_bits]
        grad_low = (weighted_low @ low_patterns).sub_(probs[..., :low_bits] * total_low)
        grad_high = (weighted_high @ mid_patterns).sub_(probs[..., low_bits:] * total_high)
        grad = torch.cat([grad_low, grad_high], dim=-1)
        if top_bits is None:
            return grad
    top_grad = total_high * (top_bits - torch.sigmoid(logits[..., mid_end:]))
    return torch.cat([grad, top_grad], dim=-1)


def _chunk_grad(
    grad: Tensor | None,
    logits: Tensor,
    w: Tensor,
    chunking: CodeChunking,
    top_bits: Tensor | None,
    grad_dist: Tensor,
    mid_patterns: Tensor,
    tables: _Tables | None = None,
) -> Tensor:
    """Add to ``grad`` ``(c, n, K)`` (None: zeros) the gradient that ``grad_dist`` ``(c, 2^mid, 2^low)`` on one
    chunk's batch mean sends to the bit logits ``(c, n, K)``, streaming over token chunks (the forward's
    factorisation, reversed); ``mid_patterns``: :func:`_mid_patterns`; ``tables``: those of all the tokens, when
    they are one chunk. Returns ``grad``."""
    for chunk_logits, chunk_w, rows in _token_chunks(logits, w, chunking.token_chunk):
        chunk_tables = _token_tables(chunk_logits, chunk_w, chunking, top_bits) if tables is None else tables
        part = _token_chunk_grad(chunk_logits, chunk_tables, grad_dist, mid_patterns, chunking, top_bits)
        del chunk_tables  # before the next token chunk's are built
        if grad is None and rows == slice(None):
            return part  # one token chunk: nothing to add it to
        if grad is None:
            grad = logits.new_zeros(logits.shape)
        grad[:, rows].add_(part)
    return grad


class _LocalCodeEntropy(torch.autograd.Function):
    """``(n, c, K)`` bit logits, ``(n,)`` weights -> ``(c,)`` exact batch entropies, streamed over chunks of
    codes. ``dH / dp = -(log p + 1)`` is known as soon as a chunk's mean is, so the gradient of the entropy
    with respect to the bit logits is accumulated during the forward (one more pass over the tokens per
    chunk, reusing the mean's tables when every token is in one chunk) and the backward only scales it: no
    chunk is recomputed."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, needs_grad: bool) -> Tensor:
        logits, w = bit_logits.transpose(0, 1), weights.view(1, -1, 1)  # codebooks first, the batch of bmm
        total = grad = None
        mid_patterns = _mid_patterns(chunking, bit_logits) if needs_grad else None
        with torch.autocast(bit_logits.device.type, enabled=False):
            for chunk in range(chunking.num_chunks):
                top_bits = _top_bits_of_chunk(chunking, chunk, bit_logits)
                dist, tables = _chunk_mean(logits, w, chunking, top_bits)
                chunk_entropy, grad_dist = _entropy_and_grad(dist)
                del dist  # before the gradient pass allocates
                total = chunk_entropy if total is None else total + chunk_entropy
                if needs_grad:
                    grad = _chunk_grad(grad, logits, w, chunking, top_bits, grad_dist, mid_patterns, tables)
                del grad_dist, tables  # before the next chunk's mean is allocated
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * as_dtype(grad_entropy, grad.dtype).view(-1, 1, 1)).transpose(0, 1), None, None, None


class _ChunkMean(torch.autograd.Function):
    """``(n, c, K)`` bit logits, ``(n,)`` weights -> ``(c, codes of the chunk)`` batch mean of one chunk of
    codes. The backward streams over the tokens too: its memory is that of the forward."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, chunk: int) -> Tensor:
        with torch.autocast(bit_logits.device.type, enabled=False):
            top_bits = _top_bits_of_chunk(chunking, chunk, bit_logits)
            dist, _ = _chunk_mean(bit_logits.transpose(0, 1), weights.view(1, -1, 1), chunking, top_bits)
        ctx.save_for_backward(bit_logits, weights)
        ctx.chunking, ctx.chunk = chunking, chunk
        return dist.flatten(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dist: Tensor):
        bit_logits, weights = ctx.saved_tensors
        chunking = ctx.chunking
        grad_dist = grad_dist.to(bit_logits.dtype).reshape(-1, 2**chunking.mid_bits, 2**chunking.low_bits)
        with torch.autocast(bit_logits.device.type, enabled=False):
            top_bits = _top_bits_of_chunk(chunking, ctx.chunk, bit_logits)
            logits, w = bit_logits.transpose(0, 1), weights.view(1, -1, 1)
            grad = _chunk_grad(None, logits, w, chunking, top_bits, grad_dist, _mid_patterns(chunking, logits))
        return grad.transpose(0, 1), None, None, None


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
        chunking = ctx.chunking
        with torch.autocast(bit_logits.device.type, enabled=False):
            top_bits = _top_bits_of_chunk(chunking, ctx.chunk, bit_logits)
            logits, w = bit_logits.transpose(0, 1), weights.view(1, -1, 1)
            dist = ctx.reduce_mean(_chunk_mean(logits, w, chunking, top_bits)[0].flatten(1))
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
    chunking = CodeChunking.plan(num_codebooks, num_bits, bit_logits.device)
    chunks = [_ChunkMean.apply(bit_logits, weights, chunking, chunk) for chunk in range(chunking.num_chunks)]
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
    weights = as_dtype(weights, bit_logits.dtype)
    groups = bit_groups(bit_logits.shape[-1], max_exact_bits, group_bits)
    if len(groups) == 1:
        return exact_code_entropy(bit_logits, weights, reduce_mean)
    total = None
    for group in groups:
        group_entropy = exact_code_entropy(bit_logits[..., group], weights, reduce_mean)
        total = group_entropy if total is None else total + group_entropy
    return total
