"""Code search: nearest, top-k and Gumbel-sampled codes, in bounded memory.

All functions take a batch of codebooks: inputs ``x`` of shape ``(c, N, d)`` are searched in codes of shape
``(c, K, d)`` (``c`` independent codebooks, e.g. one per head). The ``N x K`` score matrix is never built
whole: tokens are processed in chunks and, for huge codebooks, codes too, keeping a running best. The scores
of one chunk are exactly the scores the unchunked matrix would hold, and ties resolve to the lowest code
index, so the result equals a brute-force argmin over the whole matrix.

Euclidean scores are ``2 x.e - ||e||^2`` (the ``||x||^2`` term is the same for every code of a token and does
not change which code is nearest); the nearest-code search uses half of it, ``x.e - ||e||^2 / 2``, which one
``addmm`` computes with the bias folded in. Cosine scores are ``x.e`` on l2-normalised vectors. Row maxima
come from :func:`first_max`: on a CPU a blocked maximum for rows of 2048 codes or more, up to twice as fast as
``max``, and ``max`` itself for shorter rows and on accelerators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .policy import chunk_policy
from .tracing import is_exporting

# Codes are split into chunks only when fewer tokens than this would fit beside all of them: taller chunks
# keep the matrix products efficient (256 to 512 was fastest with 2^16 and 2^18 codes).
MIN_TOKEN_CHUNK = 256


def balanced_chunk(total: int, largest: int) -> int:
    """The size of ``ceil(total / largest)`` nearly equal chunks covering ``total``: never a tiny last chunk.

    Matrix-product libraries compute products of a few rows (measured here: under about 16) with other
    kernels, in another summation order, than taller ones, so a short last chunk could score a near-tie
    differently from an unchunked search. Equal chunks keep every chunk at least half the largest, so with
    budgets of tall chunks (every :mod:`~vector_quantize_pytorch.core.policy` budget) the indices do not
    depend on the budget; the tests check it.
    """
    if total <= largest:
        return max(1, total)
    num_chunks = -(-total // largest)
    return -(-total // num_chunks)


def chunk_sizes(num_tokens: int, num_codes: int, max_scores: int) -> tuple[int, int]:
    """(token chunk, code chunk) so that one chunk of scores holds at most ``max_scores`` values.

    Codes are split only when fewer than ``MIN_TOKEN_CHUNK`` tokens would fit beside all of them; both are
    split into chunks of nearly equal size (:func:`balanced_chunk`).
    """
    code_chunk = balanced_chunk(num_codes, max(1, max_scores // MIN_TOKEN_CHUNK))
    token_chunk = balanced_chunk(num_tokens, max(1, max_scores // code_chunk))
    return token_chunk, code_chunk


def squared_norms(codes: Tensor) -> Tensor:
    """``(c, K, d)`` -> ``(c, K)`` squared l2 norms, squaring at most the policy's ``norm_values`` values at a
    time so the temporary stays flat in K (each row is reduced exactly as in one call, so the result does not
    depend on the chunking)."""
    c, num_codes, d = codes.shape
    chunk = max(1, chunk_policy(codes.device).norm_values // max(1, c * d))
    if chunk >= num_codes:
        return codes.pow(2).sum(-1)
    return torch.cat([part.pow(2).sum(-1) for part in codes.split(chunk, dim=1)], dim=1)


def _scores_into(buffer: Tensor | None, x: Tensor, codes: Tensor, bias: Tensor | None) -> Tensor:
    """``x.e + bias`` for tokens ``(c, n, d)`` and codes ``(c, k, d)`` as ``(c, n, k)``: one matrix product per
    codebook (``addmm`` / ``mm`` for a single codebook, ``baddbmm`` / ``bmm`` otherwise), the bias added by
    the product itself, written into ``buffer`` (flat, large enough) when one is given."""
    c, n, k = x.shape[0], x.shape[1], codes.shape[1]
    if c == 1:
        out2d = None if buffer is None else buffer[: n * k].view(n, k)
        if bias is None:
            out2d = torch.mm(x[0], codes[0].t(), out=out2d)
        else:
            out2d = torch.addmm(bias[0], x[0], codes[0].t(), out=out2d)
        return out2d.unsqueeze(0)
    out3d = None if buffer is None else buffer[: c * n * k].view(c, n, k)
    if bias is None:
        return torch.bmm(x, codes.transpose(1, 2), out=out3d)
    return torch.baddbmm(bias.unsqueeze(1), x, codes.transpose(1, 2), out=out3d)


def _score_bias(codes: Tensor, code_sq_norms: Tensor | None) -> Tensor:
    """``-||e||^2 / 2`` per code: ``x.e - ||e||^2 / 2`` is half the Euclidean score ``2 x.e - ||e||^2`` (exactly:
    halving is exact in floating point) and has the same argmax."""
    norms = squared_norms(codes) if code_sq_norms is None else code_sq_norms
    return (norms if norms.dtype == codes.dtype else norms.to(codes.dtype)) * -0.5


def _block_size(num_codes: int) -> int:
    """Block width of :func:`first_max` for rows of ``num_codes`` scores; 0 means a plain ``max`` is faster.

    Measured with torch 2.13 on one CPU thread, chunks of 2^20 scores: blocks win from 2048 codes on (0.85x
    the time of ``max`` at 2048, 0.6x at 8192, 0.45x at 16384); below, the gather and the small per-row
    reductions of the blocked path cost more than they save (1.5x ``max`` at 256 codes, 1.1x at 1024)."""
    if num_codes >= 8192:
        return 128
    if num_codes >= 2048:
        return 64
    return 0


def first_max(scores: Tensor, blocked: bool = True) -> tuple[Tensor, Tensor]:
    """Largest value of every row and the index of its first occurrence, like ``scores.max(-1)``.

    With ``blocked=False``, or rows under 2048 values (:func:`_block_size`), this is ``scores.max(-1)``
    itself, one kernel on an accelerator. For longer rows on a CPU:

    ``max`` and ``argmax`` read a row one value at a time; ``amax`` is vectorised and several times faster.
    So the rows are cut into blocks of ``B`` values: the block maxima come from ``amax``, the first block holding
    the row's maximum from an argmax over the (``B`` times fewer) block maxima, and the position inside that
    block from an argmax over its ``B`` values. The first block holding the maximum holds its first
    occurrence, so ties resolve to the lowest index exactly as ``argmax`` does (a NaN counts as the maximum,
    as there).

    Shape:
        - scores: ``(..., K)``
        - output: values ``(...)``, indices ``(...)`` int64
    """
    num_codes = scores.shape[-1]
    block = _block_size(num_codes) if blocked else 0
    if block == 0:
        return scores.max(-1)
    whole = num_codes - num_codes % block
    block_max = scores[..., :whole].unflatten(-1, (whole // block, block)).amax(-1)
    if whole < num_codes:  # the last, shorter block
        block_max = torch.cat((block_max, scores[..., whole:].amax(-1, keepdim=True)), dim=-1)
    values, best_block = block_max.max(-1)
    start = best_block.unsqueeze(-1) * block
    positions = start + torch.arange(block, device=scores.device)
    if whole < num_codes:  # past the end of the shorter last block: the last score again, after its first occurrence
        positions.clamp_(max=num_codes - 1)
    offset = scores.gather(-1, positions).argmax(-1, keepdim=True)
    return values, (start + offset).squeeze(-1)


@torch.no_grad()
def nearest_codes(
    x: Tensor,
    codes: Tensor,
    *,
    cosine: bool = False,
    code_sq_norms: Tensor | None = None,
    max_scores: int | None = None,
) -> Tensor:
    """Index of the nearest code for every token.

    Euclidean: the argmax of ``x.e - ||e||^2 / 2`` (``code_sq_norms`` may give ``||e||^2``, or any
    per-code offset ``s`` to score ``2 x.e - s``); cosine: the argmax of ``x.e``. A chunk costs one matrix
    product with the bias folded in (``addmm``, or ``baddbmm`` for several codebooks), written into one
    scores buffer reused by every chunk, and one :func:`first_max`. ``max_scores`` (default: the device's
    :func:`~vector_quantize_pytorch.core.policy.chunk_policy` ``search_scores``) bounds the scores held at
    once over all ``c`` codebooks. No gradient is tracked.

    Shape:
        - x: ``(c, N, d)``, codes: ``(c, K, d)``, code_sq_norms: ``(c, K)``
        - output: ``(c, N)`` int64
    """
    c, num_tokens, _ = x.shape
    num_codes = codes.shape[1]
    policy = chunk_policy(x.device)
    bias = None if cosine else _score_bias(codes, code_sq_norms)
    budget = max(1, (max_scores or policy.search_scores) // c)
    exporting = is_exporting()  # a program for any number of tokens: chunk the codes only
    token_chunk, code_chunk = chunk_sizes(1 if exporting else num_tokens, num_codes, budget)
    token_chunk = num_tokens if exporting else token_chunk
    if token_chunk >= num_tokens and code_chunk >= num_codes:  # one chunk: no buffer to reuse
        return first_max(_scores_into(None, x, codes, bias), policy.blocked_max)[1]
    buffer = torch.empty(c * token_chunk * code_chunk, device=x.device, dtype=x.dtype)

    out = []
    for start in [0] if exporting else range(0, num_tokens, token_chunk):
        xs = x[:, start : start + token_chunk]
        if code_chunk >= num_codes:
            out.append(first_max(_scores_into(buffer, xs, codes, bias), policy.blocked_max)[1])
            continue
        best_score = best_index = None
        for code_start in range(0, num_codes, code_chunk):
            cs = codes[:, code_start : code_start + code_chunk]
            cb = None if bias is None else bias[:, code_start : code_start + code_chunk]
            score, index = first_max(_scores_into(buffer, xs, cs, cb), policy.blocked_max)
            index = index + code_start
            if best_score is None:
                best_score, best_index = score, index
                continue
            # strictly greater: an equal score in a later chunk keeps the earlier (lower) code index
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_index = torch.where(better, index, best_index)
        out.append(best_index)
    if not out:
        return torch.empty(c, 0, dtype=torch.long, device=x.device)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def distance_logits(x: Tensor, codes: Tensor, *, cosine: bool = False, eps: float = 1e-8) -> Tensor:
    """Logits over codes: ``x.e`` (cosine) or ``-||x - e||`` (Euclidean, the distance itself, not squared).

    This builds the full ``(c, N, K)`` matrix; it serves the losses that need it (cross-entropy commitment,
    codebook diversity, Gumbel straight-through), never the plain nearest-code search.

    Shape:
        - x: ``(c, N, d)``, codes: ``(c, K, d)``
        - output: ``(c, N, K)``
    """
    if cosine:
        return torch.bmm(x, codes.transpose(1, 2))
    sq = x.pow(2).sum(-1, keepdim=True) + squared_norms(codes).unsqueeze(1)
    sq = torch.baddbmm(sq, x, codes.transpose(1, 2), alpha=-2.0)
    return -sq.clamp(min=eps).sqrt()


def _chunked_logits(x: Tensor, codes: Tensor, cosine: bool, max_scores: int | None):
    """Yield ``(token_start, logits chunk)`` over token chunks (all codes at once)."""
    num_tokens, num_codes = x.shape[1], codes.shape[1]
    budget = max_scores or chunk_policy(x.device).logit_scores
    token_chunk = balanced_chunk(num_tokens, max(1, budget // max(1, num_codes)))
    for start in range(0, num_tokens, token_chunk):
        yield start, distance_logits(x[:, start : start + token_chunk], codes, cosine=cosine)


def topk_codes(
    x: Tensor, codes: Tensor, k: int, *, cosine: bool = False, max_scores: int | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest codes of every token, nearest first, with their distance logits.

    The first is exactly :func:`nearest_codes`' choice (the same arithmetic, so near-ties and ties rank the
    same: ``topk=1`` quantizes as the plain search does); the other ``k - 1`` follow by distance logit.

    Shape:
        - x: ``(c, N, d)``, codes: ``(c, K, d)``
        - output: logits ``(c, N, k)``, indices ``(c, N, k)`` int64
    """
    nearest = nearest_codes(x, codes, cosine=cosine).unsqueeze(-1)  # (c, N, 1)
    values, indices = [], []
    for start, logits in _chunked_logits(x, codes, cosine, max_scores):
        chosen = nearest[:, start : start + logits.shape[1]]
        if k > 1:
            others = logits.scatter(-1, chosen, float("-inf")).topk(k - 1, dim=-1).indices
            chosen = torch.cat((chosen, others), dim=-1)
        values.append(logits.gather(-1, chosen))
        indices.append(chosen)
    return torch.cat(values, dim=1), torch.cat(indices, dim=1)


def gumbel_noise_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    u = torch.rand(t.shape, device=t.device, dtype=t.dtype, generator=generator)
    neg_log_u = -torch.log(u.clamp(min=1e-20))
    return -torch.log(neg_log_u.clamp(min=1e-20))


def sample_codes(
    x: Tensor, codes: Tensor, temperature: float, *, cosine: bool = False, max_scores: int | None = None
) -> Tensor:
    """Gumbel-max sample of a code per token from ``softmax(logits / temperature)``.

    Shape:
        - x: ``(c, N, d)``, codes: ``(c, K, d)``
        - output: ``(c, N)`` int64
    """
    out = []
    for _, logits in _chunked_logits(x, codes, cosine, max_scores):
        out.append((logits / temperature + gumbel_noise_like(logits)).argmax(-1))
    return torch.cat(out, dim=1)


def gather_codes(codes: Tensor, indices: Tensor) -> Tensor:
    """Look codes up by index (an embedding lookup, never a one-hot matmul).

    Shape:
        - codes: ``(c, K, d)``, indices: ``(c, *idx)`` int64 in ``[0, K)``
        - output: ``(c, *idx, d)``
    """
    c, num_codes, d = codes.shape
    if c == 1:
        return F.embedding(indices, codes[0])
    offsets = torch.arange(c, device=indices.device).view(c, *([1] * (indices.ndim - 1))) * num_codes
    return F.embedding(indices + offsets, codes.reshape(c * num_codes, d))


class TokenConditionedCodes:
    """One codebook per token: the codes of token ``i`` are ``transform(codes, condition[i])``, as in QINCo's
    implicit neural codebook (Huijben et al. 2024), where the condition is what earlier residual layers chose.

    Called on codes ``(c, K, d)`` it returns every token's codebook ``(c, b, n, K, d)`` (the protocol of
    ``VectorQuantize(codebook_transform_fn=...)``); :meth:`nearest` searches them a chunk of tokens at a time,
    and :meth:`gather` recomputes only the chosen (token, code) pairs, with gradients to ``transform``.

    Args:
        transform: ``(codes (..., d), condition (..., d_c)) -> (..., d)``, broadcasting its arguments.
        condition: ``(b, n, d_c)`` per-token conditions.

    Shape:
        - nearest: rows ``(1, b * n, d)``, codes ``(1, K, d)`` -> ``(1, b * n)``
        - gather: codes ``(1, K, d)``, indices ``(1, b * n)`` -> ``(1, b * n, d)``
    """

    def __init__(self, transform, condition: Tensor):
        self.transform = transform
        self.condition = condition

    def __call__(self, codes: Tensor) -> Tensor:
        b, n, d_c = self.condition.shape
        return self.transform(codes[:, None, None], self.condition.reshape(1, b, n, 1, d_c))

    @torch.no_grad()
    def nearest(self, rows: Tensor, codes: Tensor) -> Tensor:
        (num_codes, d), condition = codes.shape[1:], self.condition.reshape(-1, self.condition.shape[-1])
        chunk = max(1, chunk_policy(codes.device).logit_scores // (num_codes * d))
        nearest = []
        for start in range(0, rows.shape[1], chunk):
            token_codes = self.transform(codes[0].unsqueeze(0), condition[start : start + chunk].unsqueeze(1))
            distances = (token_codes - rows[0, start : start + chunk].unsqueeze(1)).pow(2).sum(-1)
            nearest.append(distances.argmin(-1))
        return torch.cat(nearest).unsqueeze(0)

    def gather(self, codes: Tensor, indices: Tensor) -> Tensor:
        condition = self.condition.reshape(-1, self.condition.shape[-1])
        return self.transform(F.embedding(indices[0], codes[0]), condition).unsqueeze(0)

    @classmethod
    def materialized(cls, codebook_transform_fn, b: int, n: int) -> _MaterializedCodes:
        """Any ``codes (c, K, d) -> (c, b, n, K, d)`` function, whose per-token codebooks are built whole."""
        return _MaterializedCodes(codebook_transform_fn, b, n)


class _MaterializedCodes:
    def __init__(self, codebook_transform_fn, b: int, n: int):
        self.fn, self.shape = codebook_transform_fn, (b, n)

    def _codes(self, codes: Tensor) -> Tensor:
        token_codes = self.fn(codes)  # (c, b, n, K, d)
        return token_codes.reshape(codes.shape[0], self.shape[0] * self.shape[1], *token_codes.shape[-2:])

    @torch.no_grad()
    def nearest(self, rows: Tensor, codes: Tensor) -> Tensor:
        return (self._codes(codes) - rows.unsqueeze(2)).pow(2).sum(-1).argmin(-1)

    def gather(self, codes: Tensor, indices: Tensor) -> Tensor:
        token_codes = self._codes(codes)
        picked = indices[..., None, None].expand(*indices.shape, 1, token_codes.shape[-1])
        return token_codes.gather(2, picked).squeeze(2)
