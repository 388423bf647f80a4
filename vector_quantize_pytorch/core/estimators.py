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


def _orthogonal_unit(u: Tensor) -> Tensor:
    """A unit vector orthogonal to each unit row ``u``: the coordinate axis least aligned with ``u``,
    with its ``u`` component removed."""
    axis = u.abs().argmin(dim=-1, keepdim=True)
    e = torch.zeros_like(u).scatter_(-1, axis, 1.0)
    v = e - (e * u).sum(-1, keepdim=True) * u
    return F.normalize(v, dim=-1)


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

    Shape:
        - x, q: ``(..., d)``
        - output: ``(..., d)``
    """
    xd, qd = x.detach().float(), q.detach().float()
    x_norm = xd.norm(dim=-1, keepdim=True)
    q_norm = qd.norm(dim=-1, keepdim=True)
    degenerate = x_norm < eps
    u = torch.where(degenerate, torch.zeros_like(xd), xd / x_norm.clamp(min=eps))
    v = torch.where(degenerate, torch.zeros_like(qd), qd / q_norm.clamp(min=eps))
    s = u + v
    s_norm = s.norm(dim=-1, keepdim=True)
    w = torch.where(s_norm < eps * 10, _orthogonal_unit(u), s / s_norm.clamp(min=eps))
    w = torch.where(degenerate, torch.zeros_like(w), w)
    scale = torch.where(degenerate, torch.ones_like(x_norm), q_norm / x_norm.clamp(min=eps))

    xf = x.float()
    rotated = xf - 2 * (xf * w).sum(-1, keepdim=True) * w + 2 * (xf * u).sum(-1, keepdim=True) * v
    return attach_gradient(q, (rotated * scale).to(q.dtype))


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
