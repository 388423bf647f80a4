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

from .tensors import as_dtype, at_least_float32, detached


def attach_gradient(value: Tensor, path: Tensor) -> Tensor:
    """Forward value ``value``; gradient of ``path``. Exact because ``path - path.detach()`` is zero."""
    return value.detach() + (path - path.detach())


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Straight-through estimator (Bengio et al. 2013; VQ-VAE): d out / d x = identity."""
    return attach_gradient(q, x)


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
        return as_dtype(rotation_trick_grad(x, q, grad, ctx.eps), x.dtype), None, None


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
        return detached(q).clone()
    return _RotationTrick.apply(x, detached(q), eps)


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
