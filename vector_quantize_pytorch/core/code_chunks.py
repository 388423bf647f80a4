"""Probabilities of bit codes, streamed over chunks of codes and of tokens (the machinery of
:mod:`~vector_quantize_pytorch.core.entropy`'s batch entropy).

A token's probability of a ``K``-bit code is a product of per-bit Bernoullis. A chunk of codes fixes the top
bits and lets the ``low`` and ``mid`` bits vary, so the batch mean over a chunk is one matrix product of two
per-token tables, accumulated over chunks of tokens, and the gradient of anything computed from that mean goes
back through the same factorisation. Nothing here holds more than one chunk of codes and one chunk of tokens'
tables at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .policy import chunk_policy
from .radix import all_bit_patterns


def shannon_entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, ``-sum p log p`` over ``dim`` with ``0 log 0 = 0`` (finite gradient at 0)."""
    tiny = torch.finfo(probs.dtype).tiny
    return -(probs * probs.clamp(min=tiny).log()).sum(dim=dim)


def entropy_and_grad(probs: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`shannon_entropy` ``(c,)`` of ``(c, ...)`` probabilities and its derivative ``-(log p + 1)`` (with the
    same clamped log, so at ``p = 0`` it is the derivative at ``tiny``), holding one extra copy of ``probs``."""
    tiny = torch.finfo(probs.dtype).tiny
    neg_log_probs = probs.clamp(min=tiny).log_().neg_()
    return torch.einsum("c...,c...->c", probs, neg_log_probs), neg_log_probs.sub_(1.0)


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


def top_bits_of_chunk(chunking: CodeChunking, chunk: int, like: Tensor) -> Tensor | None:
    """``(top_bits,)`` 0/1 values of the fixed top bits of chunk ``chunk`` (least significant first), made on
    ``like``'s device (no copy from the host); None without top bits."""
    if not chunking.top_bits:
        return None
    shifts = torch.arange(chunking.top_bits, device=like.device)
    return torch.bitwise_right_shift(chunk, shifts).bitwise_and_(1).to(like.dtype)


def mid_patterns_of(chunking: CodeChunking, like: Tensor) -> Tensor:
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


def chunk_mean(
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


def chunk_grad(
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
    factorisation, reversed); ``mid_patterns``: :func:`mid_patterns_of`; ``tables``: those of all the tokens, when
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
