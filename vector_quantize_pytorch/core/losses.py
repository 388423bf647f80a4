"""Auxiliary losses of the codebook quantizers.

Every loss takes an optional ``valid`` mask over tokens: masked or padded positions (and non-finite rows)
never contribute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions where ``valid`` is True (0 if none).

    Shape:
        - values: ``(c, N)``, valid: ``(c, N)`` bool or None
        - output: ``()``
    """
    if valid is None:
        return values.mean()
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def commitment_loss(x: Tensor, q: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean squared error between codebook-space inputs and their codes (``q`` detached by the caller
    unless the codebook learns from this loss).

    Shape:
        - x, q: ``(c, N, d)``, valid: ``(c, N)``
        - output: ``()``
    """
    if valid is None:
        return F.mse_loss(x, q)
    # an invalid row is replaced by its code: its difference is exactly 0 and no NaN reaches a gradient
    x = torch.where(valid.unsqueeze(-1), x, q)
    num_values = (valid.sum() * x.shape[-1]).clamp(min=1)
    return F.mse_loss(x, q, reduction="sum") / num_values


def cross_entropy_to_codes(logits: Tensor, indices: Tensor) -> Tensor:
    """Cross-entropy of distance logits against target code indices, averaged over the targets that are not -1
    (ignored); 0 when every target is ignored (``F.cross_entropy``'s mean would be 0/0 = NaN).

    Shape:
        - logits: ``(c, N, K)``, indices: ``(c, N)``
        - output: ``()``
    """
    targets = indices.reshape(-1)
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=-1, reduction="sum")
    return summed / (targets != -1).sum().clamp(min=1)


def clamped_entropy(prob: Tensor, eps: float = 1e-5, dim: int = -1) -> Tensor:
    """``-sum p log max(p, eps)``: the entropy in nats, except that probabilities below ``eps`` count as ``eps``
    inside the log, so they count less than in the exact
    :func:`~vector_quantize_pytorch.core.entropy.shannon_entropy`. The codebook diversity loss uses it."""
    return -(prob * prob.clamp(min=eps).log()).sum(dim=dim)


def codebook_diversity_loss(logits: Tensor, temperature: float, valid: Tensor | None = None) -> Tensor:
    """Negative entropy of the code distribution averaged over all (valid) tokens of a codebook,
    averaged over codebooks. Minimising it spreads usage over the codebook.

    Shape:
        - logits: ``(c, N, K)``, valid: ``(c, N)``
        - output: ``()``
    """
    prob = (logits * temperature).softmax(dim=-1)
    if valid is None:
        avg_prob = prob.mean(dim=1)
    else:
        weights = valid.to(prob.dtype).unsqueeze(-1)
        avg_prob = (prob * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return -clamped_entropy(avg_prob).mean()


def orthogonal_loss(codes: Tensor, used: Tensor | None = None) -> Tensor:
    """Orthogonality regulariser of Shin et al. 2021 (arXiv 2112.00384, eq. 2): mean squared cosine
    similarity between the codes of a codebook, minus its value ``1/n`` for perfectly orthogonal codes,
    averaged over codebooks. ``used`` restricts it to a subset of the codes (fixed shapes, no ``unique``).

    Shape:
        - codes: ``(c, n, d)``, used: ``(c, n)`` bool or None
        - output: ``()``
    """
    normed = F.normalize(codes, dim=-1)
    cosine_sq = torch.bmm(normed, normed.transpose(1, 2)).pow(2)
    if used is None:
        n = codes.shape[1]
        return cosine_sq.sum(dim=(1, 2)).mean() / n**2 - 1.0 / n
    w = used.to(cosine_sq.dtype)
    n = w.sum(dim=-1).clamp(min=1.0)
    pair_sum = (cosine_sq * w.unsqueeze(1) * w.unsqueeze(2)).sum(dim=(1, 2))
    return (pair_sum / n**2 - 1.0 / n).mean()
