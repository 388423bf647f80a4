"""Code search: nearest, top-k and Gumbel-sampled codes, in bounded memory.

All functions take a batch of codebooks: inputs ``x`` of shape ``(c, N, d)`` are searched in codes of shape
``(c, K, d)`` (``c`` independent codebooks, e.g. one per head). The ``N x K`` score matrix is never built
whole: tokens are processed in chunks and, for huge codebooks, codes too, keeping a running best. The scores
of one chunk are exactly the scores the unchunked matrix would hold, and ties resolve to the lowest code
index, so the result equals a brute-force argmin over the whole matrix.

Euclidean scores are ``2 x.e - ||e||^2``: the ``||x||^2`` term is the same for every code of a token and
does not change which code is nearest. Cosine scores are ``x.e`` on l2-normalised vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest number of scores held at once (float32: 32 MiB). Chosen by measurement on a 2-core CPU:
# larger chunks gave no speed-up for codebooks of 2^10 to 2^16 codes (benchmarks/README.md).
MAX_CHUNK_SCORES = 2**23
MIN_TOKEN_CHUNK = 256


def chunk_sizes(num_tokens: int, num_codes: int, max_scores: int = MAX_CHUNK_SCORES) -> tuple[int, int]:
    """(token chunk, code chunk) so that one chunk of scores holds at most ``max_scores`` values."""
    code_chunk = min(num_codes, max(1, max_scores // MIN_TOKEN_CHUNK))
    token_chunk = max(1, min(num_tokens, max_scores // code_chunk))
    return token_chunk, code_chunk


def squared_norms(codes: Tensor) -> Tensor:
    """``(c, K, d)`` -> ``(c, K)`` squared l2 norms."""
    return codes.pow(2).sum(-1)


def _scores(x: Tensor, codes: Tensor, code_sq_norms: Tensor | None) -> Tensor:
    """``(c, n, d), (c, k, d) -> (c, n, k)``: larger is nearer."""
    codes_t = codes.transpose(1, 2)
    if code_sq_norms is None:
        return torch.bmm(x, codes_t)
    return torch.baddbmm(code_sq_norms.unsqueeze(1), x, codes_t, beta=-1.0, alpha=2.0)


def nearest_codes(
    x: Tensor,
    codes: Tensor,
    *,
    cosine: bool = False,
    code_sq_norms: Tensor | None = None,
    max_scores: int | None = None,
) -> Tensor:
    """Index of the nearest code for every token.

    Shape:
        - x: ``(c, N, d)``, codes: ``(c, K, d)``
        - output: ``(c, N)`` int64
    """
    c, num_tokens, _ = x.shape
    num_codes = codes.shape[1]
    if not cosine and code_sq_norms is None:
        code_sq_norms = squared_norms(codes)
    token_chunk, code_chunk = chunk_sizes(num_tokens, num_codes, max_scores or MAX_CHUNK_SCORES)

    if token_chunk >= num_tokens and code_chunk >= num_codes:
        return _scores(x, codes, None if cosine else code_sq_norms).argmax(-1)

    out = []
    for start in range(0, num_tokens, token_chunk):
        xs = x[:, start : start + token_chunk]
        best_score = best_index = None
        for code_start in range(0, num_codes, code_chunk):
            cs = codes[:, code_start : code_start + code_chunk]
            norms = None if cosine else code_sq_norms[:, code_start : code_start + code_chunk]
            score, index = _scores(xs, cs, norms).max(-1)
            index = index + code_start
            if best_score is None:
                best_score, best_index = score, index
                continue
            # strictly greater: an equal score in a later chunk keeps the earlier (lower) code index
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_index = torch.where(better, index, best_index)
        out.append(best_index)
    return torch.cat(out, dim=1)


def distance_logits(x: Tensor, codes: Tensor, *, cosine: bool = False, eps: float = 1e-8) -> Tensor:
    """Logits over codes as the reference defines them: ``x.e`` (cosine) or ``-||x - e||`` (Euclidean).

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
    token_chunk = max(1, min(num_tokens, (max_scores or MAX_CHUNK_SCORES) // max(1, num_codes)))
    for start in range(0, num_tokens, token_chunk):
        yield start, distance_logits(x[:, start : start + token_chunk], codes, cosine=cosine)


def topk_codes(
    x: Tensor, codes: Tensor, k: int, *, cosine: bool = False, max_scores: int | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest codes of every token, nearest first, with their distance logits.

    Shape:
        - x: ``(c, N, d)``, codes: ``(c, K, d)``
        - output: logits ``(c, N, k)``, indices ``(c, N, k)`` int64
    """
    values, indices = [], []
    for _, logits in _chunked_logits(x, codes, cosine, max_scores):
        top = logits.topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
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
