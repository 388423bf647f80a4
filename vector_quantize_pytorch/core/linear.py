"""A linear map of token matrices whose backward uses the fast matrix-product orientations on CPU.

Quantizers project many tokens to and from a few latent features (``(tokens, 16) -> (tokens, 3)`` and back).
For a projection out of few features, autograd's backward of ``F.linear`` computes the weight gradient as
``grad^T @ input`` and the input gradient as ``grad @ weight``: products whose results have only a handful of
columns, a shape that BLAS handles up to four times slower than the same product written the other way round
(``(input^T @ grad)^T``, ``(weight^T @ grad^T)^T``). :func:`token_linear` gives the same forward values as
``F.linear``, bit for bit, and takes each gradient in the faster orientation; :func:`token_linear_grads` is
that backward on its own, for autograd functions that apply a linear map inside (LatentQuantize's loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

__all__ = ["is_plain_linear", "project", "token_linear", "token_linear_grads", "transposed_copy"]


def transposed_copy(matrix: Tensor) -> Tensor:
    """``matrix.t().contiguous()``, copied as a 3-d permute: on CPU two to three times faster than the 2-d
    transpose copy for a matrix with one short side, like ``(3, 4096)`` or ``(4096, 3)``.

    Shape:
        - matrix: ``(m, n)``
        - output: ``(n, m)``, contiguous
    """
    return matrix.unsqueeze(0).transpose(1, 2).contiguous().squeeze(0)


def token_linear_grads(
    grad: Tensor, tokens: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``tokens @ weight^T + bias`` for the upstream ``grad``, each product in the faster orientation.

    With fewer input than output features, ``(weight^T grad^T)^T`` (copied to rows) and ``(tokens^T grad)^T`` (a
    transposed view) instead of autograd's ``grad @ weight`` and ``grad^T @ tokens``.

    Args:
        grad: the gradient of the output.
        tokens: the inputs of the forward.
        weight: ``(out_features, in_features)``.
        needs: which of ``(tokens, weight, bias)`` need a gradient; the others get ``None``.

    Shape:
        - grad: ``(N, out_features)``, tokens: ``(N, in_features)``
        - output: ``(N, in_features)``, ``(out_features, in_features)``, ``(out_features,)``
    """
    few_inputs = weight.shape[1] < weight.shape[0]
    grad_tokens = grad_weight = grad_bias = None
    if needs[0]:
        grad_tokens = transposed_copy(torch.mm(weight.t(), grad.t())) if few_inputs else torch.mm(grad, weight)
    if needs[1]:
        grad_weight = torch.mm(tokens.t(), grad).t() if few_inputs else torch.mm(grad.t(), tokens)
    if needs[2]:
        grad_bias = grad.sum(0)
    return grad_tokens, grad_weight, grad_bias


class _TokenLinear(torch.autograd.Function):
    """``tokens @ weight^T + bias`` with the backward of :func:`token_linear_grads`."""

    @staticmethod
    def forward(ctx, tokens: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(tokens, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.mm(tokens, weight.t())
        return torch.addmm(bias, tokens, weight.t())

    @staticmethod
    def backward(ctx, grad: Tensor):
        tokens, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return token_linear_grads(grad, tokens, weight, (needs[0], needs[1], ctx.has_bias and needs[2]))


def token_linear(tokens: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` on a matrix of tokens, with a faster backward when it maps few features to more.

    The forward is the same ``addmm`` as ``F.linear`` (bit for bit); the gradients are the same products,
    computed in the orientation BLAS is fast at (see the module docstring), so they agree with autograd's up
    to rounding. Where autograd's orientations are already the fast ones (at least as many input features as
    output features), and under autocast, with mixed dtypes, other than 2-d tokens or without autograd, it
    simply calls ``F.linear``.

    Args:
        tokens: the inputs, one token per row.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or ``None``.

    Shape:
        - tokens: ``(N, in_features)``
        - output: ``(N, out_features)``

    Example::

        >>> project_out = nn.Linear(3, 16)
        >>> token_linear(torch.randn(4096, 3), project_out.weight, project_out.bias).shape
        torch.Size([4096, 16])
    """
    plain = (
        not torch.is_grad_enabled()
        or weight.shape[1] >= weight.shape[0]  # autograd's orientations are the fast ones already
        or tokens.ndim != 2
        or torch.is_autocast_enabled(tokens.device.type)
        or tokens.dtype != weight.dtype
        or (bias is not None and bias.dtype != weight.dtype)
    )
    if plain:
        return F.linear(tokens, weight, bias)
    return _TokenLinear.apply(tokens, weight, bias)


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (not a subclass) whose call would run no hook (its own or a global one), so that its
    weight and bias can be used directly."""
    return type(module) is nn.Linear and not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )


def project(projection: nn.Module, tokens: Tensor) -> Tensor:
    """``projection(tokens)`` for a projection (``nn.Linear``, ``nn.Identity``, any module) on the last axis.

    A plain ``nn.Linear`` without hooks goes through :func:`token_linear` on the rows of ``tokens``: the same
    forward values, a faster backward when it maps few features to many. Anything else is called as a module
    (so its hooks run).

    Shape:
        - tokens: ``(..., in_features)``
        - output: ``(..., out_features)``
    """
    flat_rows_are_a_view = tokens.ndim == 2 or tokens.is_contiguous()
    if not is_plain_linear(projection) or not torch.is_grad_enabled() or not flat_rows_are_a_view:
        return projection(tokens)
    rows = tokens.reshape(-1, tokens.shape[-1])
    out_features = projection.weight.shape[0]
    return token_linear(rows, projection.weight, projection.bias).reshape(*tokens.shape[:-1], out_features)
