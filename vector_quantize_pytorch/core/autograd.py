"""The package's hand-written autograd functions, all in one place.

Each one computes what a few lines of ordinary autograd would, with a backward written out by hand because
that saves a whole pass over the data, the memory of saved intermediates, or many operators (kernel launches
on an accelerator). Each has a test against the plain-autograd computation it replaces (values and
gradients, tests/core/test_autograd.py), and benchmarks/README.md records what it saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .code_chunks import (
    CodeChunking,
    chunk_grad,
    chunk_mean,
    entropy_and_grad,
    mid_patterns_of,
    shannon_entropy,
    top_bits_of_chunk,
)
from .tensors import as_dtype, at_least_float32

__all__ = [
    "ChunkMean",
    "CommitmentAndQuantizationLoss",
    "LocalCodeEntropy",
    "QuantizeWithCommitment",
    "RecomputedChunkEntropy",
    "RotationTrick",
    "floor_ste",
    "rotation_trick_grad",
    "round_ste",
]


# ------------------------------------------------------------------ straight-through rounding


class _ValueStraightThrough(torch.autograd.Function):
    """``op(x)`` forward (an elementwise rounding), identity backward: one operation each way."""

    @staticmethod
    def forward(ctx, x: Tensor, op) -> Tensor:
        return op(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` with a straight-through (identity) gradient; the value is exactly ``round(x)``."""
    return _ValueStraightThrough.apply(x, torch.round)


def floor_ste(x: Tensor) -> Tensor:
    """``floor(x)`` with a straight-through (identity) gradient; the value is exactly ``floor(x)``."""
    return _ValueStraightThrough.apply(x, torch.floor)


# ------------------------------------------------------------------ rotation trick


def _antipodal_axis(x: Tensor, inv_x: Tensor) -> Tensor:
    """``e_j - u_j u`` for ``u = x/|x|`` and ``j`` the smaller in magnitude of its first two coordinates:
    orthogonal to ``u``, of length ``sqrt(1 - u_j^2) >= sqrt(1/2)``, the reflection axis for opposite ``u``
    and ``v``. Only two coordinates are compared, so choosing ``j`` costs no pass over the whole input."""
    axis = x[..., :2].abs().argmin(dim=-1, keepdim=True)
    u_j = x.gather(-1, axis) * inv_x
    t = x * (u_j * inv_x).neg()
    return t.scatter_add_(-1, axis, torch.ones_like(u_j))


def rotation_trick_grad(x: Tensor, q: Tensor, grad: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick's input gradient ``lambda R^T g`` row by row (see :func:`rotation_trick`).

    With ``u = x/|x|``, ``v = q/|q|``, ``R = I - 2 w w^T + 2 v u^T`` and ``w = s/|s|`` for ``s = u + v``::

        R^T g = g - 2 s (s.g) / |s|^2 + 2 u (v.g)

    a handful of row dot products and one fused pass ``g + a s + b x``; ``R`` itself is never built. When
    ``u`` and ``v`` are opposite (``|s|`` below ``10 eps``), ``s`` is replaced by any vector orthogonal to
    ``u`` (the same formula then is a 180 degree rotation in the plane of ``u`` and ``s``): ``e_j - u_j u``,
    with ``e_j`` the axis of the smaller of ``u``'s first two coordinates, so its length is at least
    ``sqrt(1/2)``.
    When ``|x| < eps`` the result is ``g`` (straight-through). Computed in float32 (float64 for float64
    inputs) and returned in that dtype. ``R`` and ``lambda`` are constants: when ``grad`` requires grad (a
    double backward), the result is differentiable in ``grad``.

    Shape:
        - x, q, grad: ``(..., d)`` (broadcastable to one shape)
        - output: ``(..., d)``
    """
    dtype = at_least_float32(x.dtype)
    x, q, g = (as_dtype(t, dtype) for t in (x.detach(), q.detach(), grad))
    if not x.shape == q.shape == g.shape:
        x, q, g = torch.broadcast_tensors(x, q, g)
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    inv_x = x_norm.clamp(min=eps).reciprocal()
    inv_q = q_norm.clamp(min=eps).reciprocal()

    s = torch.mul(x, inv_x).addcmul_(q, inv_q)  # u + v
    antipodal = torch.linalg.vecdot(s, s, dim=-1).unsqueeze(-1) < (10 * eps) ** 2
    if x.shape[-1] > 1:
        s = torch.where(antipodal, _antipodal_axis(x, inv_x), s)

    s_sq = torch.linalg.vecdot(s, s, dim=-1).unsqueeze(-1).clamp(min=eps * eps)
    s_coef = torch.linalg.vecdot(s, g, dim=-1).unsqueeze(-1).div(s_sq).mul(-2.0)
    x_coef = torch.linalg.vecdot(q, g, dim=-1).unsqueeze(-1).mul(inv_q * inv_x * 2.0)
    out = g.addcmul(s, s_coef).addcmul_(x, x_coef).mul_(q_norm * inv_x)
    return torch.where(x_norm < eps, g, out)


class RotationTrick(torch.autograd.Function):
    """Forward ``q``; backward :func:`rotation_trick_grad`, from ``x`` and ``q`` only (nothing else saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, q)
        ctx.eps = eps
        return q.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, q = ctx.saved_tensors
        return as_dtype(rotation_trick_grad(x, q, grad, ctx.eps), x.dtype), None, None


# ------------------------------------------------------------------ commitment losses


class QuantizeWithCommitment(torch.autograd.Function):
    r"""SimVQ's output and loss in one autograd node, saving only ``x`` and ``q``.

    Forward: ``out = q`` and ``loss = (mse(q, sg(x)) + beta mse(sg(q), x)) w`` over the valid tokens (all when
    ``valid`` is None). Backward, with ``M`` the number of valid elements and ``d = q - x`` (zero on invalid
    tokens)::

        dq = (2 w / M) g_loss d
        dx = G(g_out) - (2 beta w / M) g_loss d        (G: the estimator's input gradient)

    the gradients of the separate loss terms and estimator, from one difference tensor ``d`` (which becomes
    ``dq`` in place) instead of one per loss term and gradient, with the input's two gradients summed in place.

    Shape:
        - x, q: ``(N, d)``, valid: ``(N,)`` bool or None
        - output: ``(N, d)``, ``()``
    """

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, valid: Tensor | None, beta: float, weight: float, estimator_grad):
        ctx.save_for_backward(x, q, valid)
        ctx.beta, ctx.weight, ctx.estimator_grad = beta, weight, estimator_grad
        ctx.set_materialize_grads(False)
        ctx.count = _valid_count(x, valid)
        if valid is None:
            mse = F.mse_loss(q, x) if x.numel() else x.new_zeros(())
        else:
            mse = F.mse_loss(_valid_rows(x, q, valid), q, reduction="sum") / ctx.count
        return q.clone(), (mse + mse * beta) * weight

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_loss: Tensor | None):
        x, q, valid = ctx.saved_tensors
        needs_x, needs_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        differentiable = torch.is_grad_enabled()  # a double backward: no in-place arithmetic
        grad_x = grad_q = None
        if needs_x and grad_out is not None:
            grad_x = as_dtype(ctx.estimator_grad(x, q, grad_out), x.dtype)
        if grad_loss is None:
            return grad_x, grad_q, None, None, None, None
        diff = _valid_difference(q, x, valid)
        coef = grad_loss * (2.0 * ctx.weight / ctx.count)
        if needs_x:
            if grad_x is None:
                grad_x = diff * (-ctx.beta * coef)
            elif differentiable or grad_x is grad_out:  # never write into the incoming gradient
                grad_x = torch.addcmul(grad_x, diff, coef, value=-ctx.beta)
            else:
                grad_x = grad_x.addcmul_(diff, coef, value=-ctx.beta)
        if needs_q:
            grad_q = diff * coef if differentiable else diff.mul_(coef)
        return grad_x, grad_q, None, None, None, None


def _valid_rows(x: Tensor, q: Tensor, valid: Tensor) -> Tensor:
    """``x`` with the rows that ``valid`` leaves out replaced by ``q``'s: their difference is exactly 0, and no
    NaN of an invalid row gets through."""
    return torch.where(valid.unsqueeze(-1), x, q)


def _valid_difference(q: Tensor, x: Tensor, valid: Tensor | None) -> Tensor:
    """``q - x``, zero on the rows that ``valid`` leaves out."""
    return q - (x if valid is None else _valid_rows(x, q, valid))


def _valid_count(x: Tensor, valid: Tensor | None) -> Tensor | int:
    """Number of elements of the valid rows of ``x``, at least 1."""
    if valid is None:
        return max(x.numel(), 1)
    return (valid.sum() * x.shape[-1]).clamp(min=1)


class CommitmentAndQuantizationLoss(torch.autograd.Function):
    """``wc MSE(sg(x), o) + wq MSE(sg(o), x)`` between the projected codes ``o`` and the input ``x``, over the
    elements whose error is finite, in one pass (LatentQuantize's training loss).

    Both terms share the error ``e = o - x``: the forward is ``(wc + wq) sum(e^2) / m`` and the gradients are
    ``2 wc e / m`` for ``o`` and ``-2 wq e / m`` for ``x``, with ``m`` the number of finite errors (at least 1).
    An element whose error is NaN or infinite (a non-finite input or code) is left out of both terms and gets
    exactly zero gradient.

    Shape:
        - projected, x: ``(N, dim)``
        - output: ``()`` float32
    """

    @staticmethod
    def forward(ctx, projected: Tensor, x: Tensor, commitment_weight: Tensor, quantization_weight: Tensor) -> Tensor:
        if projected.stride() != x.stride():
            # elementwise arithmetic over two memory layouts is several times slower than over one
            x = torch.empty_like(projected, dtype=x.dtype).copy_(x)
        error = as_dtype(projected, torch.float32) - as_dtype(x, torch.float32)
        # float arithmetic rather than comparisons (bool outputs are slow on CPU): e - e is 0 for a finite e and
        # NaN for NaN and +-Inf, so this is 1 exactly where the error is not finite
        non_finite = (error - error).nan_to_num_(nan=1.0)
        error = error.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        # counted in float64 (exact up to 2**53) and rounded to float32 once
        count = (error.numel() - non_finite.sum(dtype=torch.float64)).clamp(min=1).float()
        ctx.save_for_backward(error, count)
        ctx.weights = (commitment_weight, quantization_weight)
        ctx.dtypes = (projected.dtype, x.dtype)
        flat = error.flatten()
        return (commitment_weight + quantization_weight) * torch.dot(flat, flat) / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        error, count = ctx.saved_tensors
        commitment_weight, quantization_weight = ctx.weights
        needs = ctx.needs_input_grad
        scale = 2 * grad / count
        grad_projected = grad_x = None
        if needs[0]:
            grad_projected = as_dtype(error * (scale * commitment_weight), ctx.dtypes[0])
        if needs[1]:
            grad_x = as_dtype(error * (scale * -quantization_weight), ctx.dtypes[1])
        return grad_projected, grad_x, None, None


# ------------------------------------------------------------------ batch code entropy (LFQ)


class LocalCodeEntropy(torch.autograd.Function):
    """``(n, c, K)`` bit logits, ``(n,)`` weights -> ``(c,)`` exact batch entropies, streamed over chunks of
    codes. ``dH / dp = -(log p + 1)`` is known as soon as a chunk's mean is, so the gradient of the entropy
    with respect to the bit logits is accumulated during the forward (one more pass over the tokens per
    chunk, reusing the mean's tables when every token is in one chunk) and the backward only scales it: no
    chunk is recomputed."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, needs_grad: bool) -> Tensor:
        logits, w = bit_logits.transpose(0, 1), weights.view(1, -1, 1)  # codebooks first, the batch of bmm
        total = grad = None
        mid_patterns = mid_patterns_of(chunking, bit_logits) if needs_grad else None
        with torch.autocast(bit_logits.device.type, enabled=False):
            for chunk in range(chunking.num_chunks):
                top_bits = top_bits_of_chunk(chunking, chunk, bit_logits)
                dist, tables = chunk_mean(logits, w, chunking, top_bits)
                chunk_entropy, grad_dist = entropy_and_grad(dist)
                del dist  # before the gradient pass allocates
                total = chunk_entropy if total is None else total + chunk_entropy
                if needs_grad:
                    grad = chunk_grad(grad, logits, w, chunking, top_bits, grad_dist, mid_patterns, tables)
                del grad_dist, tables  # before the next chunk's mean is allocated
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * as_dtype(grad_entropy, grad.dtype).view(-1, 1, 1)).transpose(0, 1), None, None, None


class ChunkMean(torch.autograd.Function):
    """``(n, c, K)`` bit logits, ``(n,)`` weights -> ``(c, codes of the chunk)`` batch mean of one chunk of
    codes. The backward streams over the tokens too: its memory is that of the forward."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, weights: Tensor, chunking: CodeChunking, chunk: int) -> Tensor:
        with torch.autocast(bit_logits.device.type, enabled=False):
            top_bits = top_bits_of_chunk(chunking, chunk, bit_logits)
            dist, _ = chunk_mean(bit_logits.transpose(0, 1), weights.view(1, -1, 1), chunking, top_bits)
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
            top_bits = top_bits_of_chunk(chunking, ctx.chunk, bit_logits)
            logits, w = bit_logits.transpose(0, 1), weights.view(1, -1, 1)
            grad = chunk_grad(None, logits, w, chunking, top_bits, grad_dist, mid_patterns_of(chunking, logits))
        return grad.transpose(0, 1), None, None, None


class RecomputedChunkEntropy(torch.autograd.Function):
    """Entropy ``(c,)`` of one chunk of the (reduced) batch mean that keeps no copy of the chunk: the backward
    recomputes the chunk from the bit logits (and ``reduce_mean``) to form ``dH / dp = -(log p + 1)``."""

    @staticmethod
    def forward(ctx, dist, bit_logits, weights, chunking: CodeChunking, chunk: int, reduce_mean) -> Tensor:
        ctx.save_for_backward(bit_logits, weights)
        ctx.chunking, ctx.chunk, ctx.reduce_mean = chunking, chunk, reduce_mean
        return shannon_entropy(dist)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy: Tensor):
        bit_logits, weights = ctx.saved_tensors
        chunking = ctx.chunking
        with torch.autocast(bit_logits.device.type, enabled=False):
            top_bits = top_bits_of_chunk(chunking, ctx.chunk, bit_logits)
            logits, w = bit_logits.transpose(0, 1), weights.view(1, -1, 1)
            dist = ctx.reduce_mean(chunk_mean(logits, w, chunking, top_bits)[0].flatten(1))
            grad_dist = entropy_and_grad(dist)[1].mul_(grad_entropy[:, None].to(dist.dtype))
        return grad_dist, None, None, None, None, None
