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

from .autograd import RotationTrick, rotation_trick_grad
from .tensors import detached

__all__ = [
    "attach_gradient",
    "directional_reparam",
    "gumbel_straight_through",
    "rotation_trick",
    "rotation_trick_grad",
    "straight_through",
    "synchronized_update",
]


def attach_gradient(value: Tensor, path: Tensor) -> Tensor:
    """Forward value ``value``; gradient of ``path``. Exact because ``path - path.detach()`` is zero."""
    return detached(value) + (path - path.detach())


def straight_through(x: Tensor, q: Tensor, *, grad_to_q: bool = False) -> Tensor:
    """Straight-through estimator (Bengio et al. 2013; VQ-VAE): d out / d x = identity.

    The forward value is exactly ``q`` for finite ``x`` (``x - x`` is zero; a non-finite ``x`` gives NaN), so
    decoding the indices reproduces it. ``q`` is a constant unless ``grad_to_q``, where the gradient reaches it
    unchanged as well.

    Shape:
        - x, q: ``(...)``, the same shape
        - output: ``(...)``
    """
    if grad_to_q:
        return q + (x - x.detach())
    return attach_gradient(q, x)


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

    A hand-written autograd function (:class:`~vector_quantize_pytorch.core.autograd.RotationTrick`): the
    forward only copies ``q``, saves ``x`` and ``q`` (tensors the caller keeps anyway) and the backward computes
    ``lambda R^T g`` directly (in float32, float64 for float64 inputs). ``q`` receives no gradient.

    Shape:
        - x, q: ``(..., d)``
        - output: ``(..., d)`` in ``q``'s dtype
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return detached(q).clone()
    return RotationTrick.apply(x, detached(q), eps)


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
