"""Gradient estimators: how the gradient of the quantized output reaches the encoder.

Every estimator returns a tensor whose forward value is exactly the quantized ``q`` (bit for bit, so that
decoding indices reproduces the training output) while its backward routes gradients as the method says.
DiVeQ is the exception: its forward value is a noisy point on the segment direction, as the method defines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attach_gradient(value: Tensor, path: Tensor) -> Tensor:
    """Forward value ``value``; gradient of ``path``. Exact because ``path - path.detach()`` is zero."""
    return value.detach() + (path - path.detach())


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Straight-through estimator (Bengio et al. 2013; VQ-VAE): d out / d x = identity."""
    return attach_gradient(q, x)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and bfloat16 inputs, float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def _row_dot(a: Tensor, b: Tensor, scratch: Tensor | None) -> Tensor:
    """``(a * b).sum(-1, keepdim=True)``, the product written into ``scratch`` when one is given."""
    product = a * b if scratch is None else torch.mul(a, b, out=scratch)
    return product.sum(-1, keepdim=True)


def rotation_trick_grad(x: Tensor, q: Tensor, grad: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick's input gradient ``lambda * R^T g`` row by row (see :func:`rotation_trick`).

    With ``u = x/|x|``, ``v = q/|q|``, ``s = u + v``, ``R = I - 2 w w^T + 2 v u^T`` and ``w = s/|s|``::

        R^T g = g - 2 s (s.g) / |s|^2 + 2 u (v.g)

    a few row reductions and one fused pass ``a g + b s + c x``; ``R`` itself is never built, and only two
    temporaries of the input's size are allocated (``s``, which becomes the result, and one product
    buffer). When ``u`` and ``v`` are opposite (``|s|`` below ``10 eps``), ``w`` is instead the unit vector
    along ``e_j - u_j u``, ``e_j`` the first coordinate axis (the second if ``|u_1| > 0.9``: at most one
    coordinate of a unit vector exceeds 0.9, so ``e_j - u_j u`` has length ``m = sqrt(1 - u_j^2) >= 0.43``)::

        R^T g = g - 2 (w.g) / m e_j + 2 u ((w.g) u_j / m + v.g),     w.g = (g_j - u_j (u.g)) / m

    When ``|x| < eps`` the result is ``g`` (straight-through). Computed in float32 (float64 for float64
    inputs); returned in that dtype. ``R`` and ``lambda`` are constants: when ``grad`` requires grad (a
    double backward), the result is differentiable in ``grad`` (out-of-place arithmetic, no buffers).

    Shape:
        - x, q, grad: ``(..., d)`` (broadcastable to one shape)
        - output: ``(..., d)``
    """
    dtype = _compute_dtype(x.dtype)
    x, q, g = x.detach().to(dtype), q.detach().to(dtype), grad.to(dtype)
    x, q, g = torch.broadcast_tensors(x, q, g)
    x_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    degenerate = x_norm < eps
    inv_x = torch.where(degenerate, torch.zeros_like(x_norm), 1.0 / x_norm.clamp(min=eps))
    inv_q = 1.0 / q_norm.clamp(min=eps)
    scale = torch.where(degenerate, torch.ones_like(x_norm), q_norm * inv_x)

    differentiable = torch.is_grad_enabled() and g.requires_grad
    s = torch.mul(x, inv_x).addcmul_(q, inv_q)  # u + v
    s_sq = torch.linalg.vector_norm(s, dim=-1, keepdim=True).square()
    # one product buffer for both row dots in eager mode; compiled code fuses the products into the sums instead
    # (and dynamo refuses an out= tensor that is not contiguous, as empty_like(s) is for a strided input)
    scratch = (
        None
        if differentiable or torch.compiler.is_compiling()
        else torch.empty(s.shape, dtype=s.dtype, device=s.device)
    )
    u_dot_g = _row_dot(x, g, scratch) * inv_x
    v_dot_g = _row_dot(q, g, scratch) * inv_q
    antipodal = (s_sq < (10 * eps) ** 2) & ~degenerate

    # the axis e_j used by antipodal rows
    d = x.shape[-1]
    j = (x[..., :1] * inv_x).abs().gt(0.9).long() if d > 1 else torch.zeros_like(x_norm, dtype=torch.long)
    u_j = x.gather(-1, j) * inv_x
    m = (1.0 - u_j * u_j).clamp(min=0.0).sqrt().clamp(min=eps)
    w_dot_g = (g.gather(-1, j) - u_j * u_dot_g) / m

    # R^T g = g + s_coef s + u_coef u + axis_coef e_j, then times lambda (= scale)
    zero = torch.zeros_like(s_sq)
    s_dot_g = u_dot_g + v_dot_g
    s_coef = torch.where(antipodal | degenerate, zero, -2.0 * s_dot_g / s_sq.clamp(min=eps * eps))
    u_coef = 2.0 * torch.where(antipodal, w_dot_g * u_j / m + v_dot_g, v_dot_g)
    axis_coef = torch.where(antipodal, -2.0 * w_dot_g / m, zero)
    if differentiable:
        out = g + s * s_coef + x * (u_coef * inv_x)
        return out.scatter_add(-1, j, axis_coef) * scale
    out = s.mul_(s_coef * scale).addcmul_(g, scale).addcmul_(x, u_coef * inv_x * scale)
    return out.scatter_add_(-1, j, axis_coef * scale)


class _RotationTrick(torch.autograd.Function):
    """Forward ``q``; backward ``lambda R^T g`` in closed form, from ``x`` and ``q`` only (nothing else saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, q)
        ctx.eps = eps
        return q.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, q = ctx.saved_tensors
        return rotation_trick_grad(x, q, grad, ctx.eps).to(x.dtype), None, None


def rotation_trick(x: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Rotation trick (Fifty et al. 2024, arXiv 2410.06424, section 4.2).

    The output is ``lambda * R x`` with ``R`` the rotation taking ``x/|x|`` to ``q/|q|`` and
    ``lambda = |q| / |x|``, both treated as constants, so the forward value is ``q`` and the gradient
    is ``lambda * R^T g``. In closed Householder form, with ``u = x/|x|``, ``v = q/|q|`` and
    ``w = (u + v)/|u + v|``::

        R = I - 2 w w^T + 2 v u^T

    When ``u = -v`` (input and code point in opposite directions), ``w`` is undefined; any unit ``w``
    orthogonal to ``u`` then gives the 180 degree rotation in the plane of ``u`` and ``w``, which we use.
    When ``|x| = 0`` the gradient falls back to the straight-through identity.

    A custom autograd function: the forward only copies ``q``, saves ``x`` and ``q`` (tensors the caller
    keeps anyway) and the backward computes ``lambda R^T g`` directly (in float32, float64 for float64
    inputs). ``q`` receives no gradient.

    Shape:
        - x, q: ``(..., d)``
        - output: ``(..., d)`` in ``q``'s dtype
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q.detach().clone()
    return _RotationTrick.apply(x, q.detach(), eps)


def gumbel_straight_through(one_hot: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """Gumbel-softmax straight-through (Jang et al. 2017): hard one-hot forward, ``softmax(logits/T)``
    gradient.

    Shape:
        - one_hot, logits: ``(..., K)``
        - output: ``(..., K)``
    """
    soft = (logits / temperature).softmax(dim=-1)
    return one_hot + (soft - soft.detach())


def directional_reparam(x: Tensor, q: Tensor, noise_variance: float = 5e-3) -> Tensor:
    """DiVeQ directional reparameterisation: ``x + unit(q - x + noise) * |q - x|``.

    The direction (with Gaussian noise of the given variance) is a constant; the distance ``|q - x|``
    carries gradients to both the input and a learnable codebook.

    Shape:
        - x, q: ``(..., d)``
        - output: ``(..., d)``
    """
    error = q - x
    noisy = error.detach() + math.sqrt(noise_variance) * torch.randn_like(error)
    direction = F.normalize(noisy, dim=-1)
    return x + direction * error.norm(dim=-1, keepdim=True)


def synchronized_update(out: Tensor, q: Tensor, v: float) -> Tensor:
    """vqtorch's synchronized update (Huh et al. 2023, eq. 21): the decoder's gradient also reaches the
    codebook, scaled by ``v``. The forward value is unchanged.

    Shape:
        - out, q: ``(..., d)``
    """
    return out + v * (q - q.detach())
