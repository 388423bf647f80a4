"""SimVQ: vector quantization with a frozen random codebook and a learned linear map of it."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import estimators, losses
from .core.layout import TokenLayout, check_mask
from .core.search import nearest_codes
from .core.tensors import as_dtype, as_float32
from .core.validate import check_bool, check_feature_size, check_float, check_input, check_int


def identity(t: Tensor) -> Tensor:
    return t


class SimVQ(nn.Module):
    r"""SimVQ (Zhu et al. 2025, "Addressing Representation Collapse in Vector Quantized Models with One
    Linear Layer", arXiv 2411.02038).

    The codebook is implicit: a frozen Gaussian matrix ``C`` (``K x f``, entries ``N(0, 1/f)``) mapped by a
    learned ``codebook_transform`` ``W`` (``Linear(f, dim, bias=False)`` by default, any ``nn.Module`` acting
    on the last axis allowed), so that every code moves whenever ``W`` learns and none is left dead. Each
    input vector is replaced by its nearest code of ``W(C)``::

        k_i = argmin_k |x_i - W(C)_k|^2,      q_i = W(C)_{k_i}
        loss = (|sg(x) - q|^2 + beta |x - sg(q)|^2) * commitment_weight

    with ``beta = input_to_quantize_commit_loss_weight`` (mean squared errors). The first term trains
    ``W``; gradients reach the input through the rotation trick (Fifty et al. 2024) or, with
    ``rotation_trick=False``, the straight-through estimator.

    ``W(C)`` is computed once per forward in float32 (autocast disabled); the nearest-code search works in
    bounded memory and carries no gradient. As in the reference, the loss is also computed in eval mode
    (it is then only a measurement: nothing is updated).

    Args:
        dim: input feature size (and code size).
        codebook_size: number of codes ``K``.
        codebook_transform: module mapping frozen codes ``(K, f)`` to codes ``(K, dim)`` (default
            ``Linear(f, dim, bias=False)``).
        init_fn: applied once to the frozen Gaussian codebook at construction; must return a ``(K, f)`` tensor.
        channel_first: inputs are ``(b, dim, ...)`` instead of ``(b, ..., dim)``.
        rotation_trick: rotation-trick gradient estimator (else straight-through).
        input_to_quantize_commit_loss_weight: weight ``beta`` of ``|x - sg(q)|^2``.
        commitment_weight: weight of the whole loss.
        frozen_codebook_dim: ``f``, the size of the frozen codes (default ``dim``).

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(b, n)`` int64, loss ``()``
        - input ``(b, ..., dim)`` -> ``(b, ..., dim)``, ``(b, ...)``; a single token ``(b, dim)`` -> ``(b,)``
        - ``channel_first=True``: ``(b, dim, ...)`` -> ``(b, dim, ...)``, ``(b, ...)``

    Returns:
        ``(quantized, indices, loss)``.

    Example::

        >>> sim_vq = SimVQ(dim=512, codebook_size=1024)
        >>> x = torch.randn(1, 1024, 512)
        >>> quantized, indices, loss = sim_vq(x)
        >>> quantized.shape, indices.shape
        (torch.Size([1, 1024, 512]), torch.Size([1, 1024]))
        >>> torch.equal(sim_vq.eval()(x)[0], sim_vq.indices_to_codes(indices))
        True
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: nn.Module | None = None,
        init_fn: Callable[[Tensor], Tensor] = identity,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
    ):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("codebook_size", codebook_size, minimum=1)
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError(f"codebook_transform must be an nn.Module or None, got {type(codebook_transform).__name__}")
        if not callable(init_fn):
            raise TypeError(f"init_fn must be a callable tensor -> tensor, got {type(init_fn).__name__}")
        check_bool("channel_first", channel_first)
        check_bool("rotation_trick", rotation_trick)
        check_float("input_to_quantize_commit_loss_weight", input_to_quantize_commit_loss_weight, minimum=0.0)
        check_float("commitment_weight", commitment_weight, minimum=0.0)
        if frozen_codebook_dim is not None:
            check_int("frozen_codebook_dim", frozen_codebook_dim, minimum=1)

        frozen_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        frozen = _initial_frozen_codebook(codebook_size, frozen_dim, init_fn)

        self.dim = dim
        self.codebook_dim = dim
        self.codebook_size = codebook_size
        self.frozen_codebook_dim = frozen_dim
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = float(input_to_quantize_commit_loss_weight)
        self.commitment_weight = float(commitment_weight)

        # created after the frozen codes so that one seed gives the reference's module
        if codebook_transform is None:
            codebook_transform = nn.Linear(frozen_dim, dim, bias=False)
        self.code_transform = codebook_transform
        self.register_buffer("frozen_codebook", frozen)

    # ------------------------------------------------------------------ codebook

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook ``W(C)``: ``(K, dim)`` float32, differentiable in the transform."""
        return self.implicit_codebook()

    def implicit_codebook(self) -> Tensor:
        """``codebook_transform(frozen_codebook)`` in float32 with autocast disabled.

        Shape:
            - output: ``(K, dim)``
        """
        with torch.autocast(self.frozen_codebook.device.type, enabled=False):
            codes = self.code_transform(self.frozen_codebook)
        if not isinstance(codes, Tensor) or codes.shape != (self.codebook_size, self.dim):
            got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(
                f"codebook_transform must map the frozen codebook {tuple(self.frozen_codebook.shape)} to "
                f"(codebook_size, dim) = {(self.codebook_size, self.dim)}, got {got}"
            )
        return as_float32(codes)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes for indices as forward returns them: equal to the eval forward's output. Index -1 gives a
        zero vector.

        Shape:
            - indices: ``(b, ...)`` int
            - output: ``(b, ..., dim)``, or ``(b, dim, ...)`` with ``channel_first``
        """
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError("indices must be an integer torch.Tensor")
        idx = indices.long()
        codes = F.embedding(idx.clamp(min=0), self.implicit_codebook())
        codes = torch.where((idx >= 0).unsqueeze(-1), codes, torch.zeros_like(codes))
        if self.channel_first and codes.ndim >= 3:
            codes = codes.movedim(-1, 1)
        return codes

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``mask`` (our extension; ``(b, n)`` bool for ``(b, n, d)`` tokens, True = kept) leaves the masked-out
        tokens out of the commitment loss and its gradients; they are still quantized."""
        layout = self._layout(x)
        tokens = layout.to_tokens(x)
        b, n, d = tokens.shape
        flat = as_float32(tokens.reshape(b * n, d))
        if mask is not None:
            mask = check_mask(mask, b, n).reshape(b * n)

        codebook = self.implicit_codebook()  # (K, d)
        # the search tracks no gradient: no detached copies needed
        indices = nearest_codes(flat.unsqueeze(0), codebook.unsqueeze(0))[0]  # (N,)
        quantized = F.embedding(indices, codebook)  # (N, d), differentiable in the transform

        if mask is None:
            out, loss = self._output_and_loss(flat, quantized)
        else:
            out, loss = self._masked_output_and_loss(flat, quantized, mask)
        out = layout.from_tokens(as_dtype(out.reshape(b, n, d), x.dtype))
        return out, layout.indices_from_tokens(indices.reshape(b, n)), loss

    def _layout(self, x: Tensor) -> TokenLayout:
        check_input("x", x)
        layout = TokenLayout.of(x, channel_first=self.channel_first)
        if layout.single_token or not self.channel_first:
            check_feature_size("x", x, -1, self.dim, "(b, ..., dim)")
        else:
            check_feature_size("x", x, 1, self.dim, "(b, dim, ...)")
        return layout

    def _commitment_loss(self, flat: Tensor, quantized: Tensor) -> Tensor:
        """``(|sg(x) - q|^2 + beta |x - sg(q)|^2) * commitment_weight`` as means over all elements."""
        codebook_term = _mean_squared_error(quantized, flat.detach())
        input_term = _mean_squared_error(flat, quantized.detach())
        return (codebook_term + input_term * self.input_to_quantize_commit_loss_weight) * self.commitment_weight

    def _masked_output_and_loss(self, flat: Tensor, quantized: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The output and the commitment loss over the kept tokens only (means over their elements)."""
        if torch.is_grad_enabled() and flat.requires_grad:
            estimator = estimators.rotation_trick if self.rotation_trick else estimators.straight_through
            out = estimator(flat, quantized.detach())
        else:
            out = quantized.detach()
        valid = mask.unsqueeze(0)  # (1, N): one codebook
        codebook_term = losses.commitment_loss(flat.detach().unsqueeze(0), quantized.unsqueeze(0), valid)
        input_term = losses.commitment_loss(flat.unsqueeze(0), quantized.detach().unsqueeze(0), valid)
        return out, (codebook_term + input_term * self.input_to_quantize_commit_loss_weight) * self.commitment_weight

    def _output_and_loss(self, flat: Tensor, quantized: Tensor) -> tuple[Tensor, Tensor]:
        """Output (forward value exactly ``q``; its gradient reaches the input only, never the transform) and
        commitment loss. With gradients to the input, one autograd function computes both (see
        :class:`_QuantizeWithCommitment`)."""
        if not (torch.is_grad_enabled() and flat.requires_grad):
            return quantized.detach(), self._commitment_loss(flat, quantized)
        return _QuantizeWithCommitment.apply(
            flat, quantized, self.input_to_quantize_commit_loss_weight, self.commitment_weight, self.rotation_trick
        )


class _QuantizeWithCommitment(torch.autograd.Function):
    r"""SimVQ's output and loss in one autograd node, saving only ``x`` and ``q``.

    Forward: ``out = q`` and ``loss = (mse(q, sg(x)) + beta mse(sg(q), x)) w``. Backward, with ``M`` the
    number of elements and ``d = q - x``::

        dq = (2 w / M) g_loss d
        dx = lambda R^T g_out - (2 beta w / M) g_loss d        (rotation trick; g_out when straight-through)

    the gradients of the separate loss terms and estimator, from one difference tensor ``d`` (which
    becomes ``dq`` in place) instead of one per loss term and gradient, with the input's two gradients
    summed in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, beta: float, weight: float, rotation: bool):
        ctx.save_for_backward(x, q)
        ctx.beta, ctx.weight, ctx.rotation = beta, weight, rotation
        ctx.set_materialize_grads(False)
        mse = _mean_squared_error(q, x)
        return q.clone(), (mse + mse * beta) * weight

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, grad_loss: Tensor | None):
        x, q = ctx.saved_tensors
        needs_x, needs_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        differentiable = torch.is_grad_enabled()  # a double backward: no in-place arithmetic
        grad_x = grad_q = None
        if needs_x and grad_out is not None:
            grad_x = estimators.rotation_trick_grad(x, q, grad_out) if ctx.rotation else grad_out
            grad_x = as_dtype(grad_x, x.dtype)
        if grad_loss is None:
            return grad_x, grad_q, None, None, None
        diff = q - x
        coef = grad_loss * (2.0 * ctx.weight / max(diff.numel(), 1))
        if needs_x:
            if grad_x is None:
                grad_x = diff * (-ctx.beta * coef)
            elif differentiable or grad_x is grad_out:  # never write into the incoming gradient
                grad_x = torch.addcmul(grad_x, diff, coef, value=-ctx.beta)
            else:
                grad_x = grad_x.addcmul_(diff, coef, value=-ctx.beta)
        if needs_q:
            grad_q = diff * coef if differentiable else diff.mul_(coef)
        return grad_x, grad_q, None, None, None


def _mean_squared_error(a: Tensor, b: Tensor) -> Tensor:
    """``F.mse_loss(a, b)``, but an exact zero for empty tensors instead of NaN (the mean of nothing).

    The test is on the (static) element count, so it is no host sync."""
    if a.numel() == 0:
        return (a - b).square().sum()
    return F.mse_loss(a, b)


def _initial_frozen_codebook(codebook_size: int, frozen_dim: int, init_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Gaussian codes with variance ``1 / frozen_dim`` per entry, passed through ``init_fn``."""
    codes = init_fn(torch.randn(codebook_size, frozen_dim) * frozen_dim**-0.5)
    if not isinstance(codes, Tensor) or codes.shape != (codebook_size, frozen_dim):
        got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(
            f"init_fn must return a tensor of shape (codebook_size, frozen_codebook_dim) = "
            f"{(codebook_size, frozen_dim)}, got {got}"
        )
    if not torch.is_floating_point(codes):
        raise TypeError(f"init_fn must return a floating point tensor, got dtype {codes.dtype}")
    return codes
