"""SimVQ: vector quantization with a frozen random codebook and a learned linear map of it."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import health
from .core.autograd import QuantizeWithCommitment, rotation_trick_grad
from .core.layout import parse_input
from .core.search import nearest_codes
from .core.tensors import as_dtype, as_float32
from .core.validate import check_bool, check_code_indices, check_float, check_int


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
    bounded memory and carries no gradient. The loss is also computed in eval mode
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

        # created after the frozen codes: the order of random draws fixes which module a seed gives
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
        frozen = self.frozen_codebook
        # a mixed-precision engine (FSDP's param_dtype) may have cast the transform's parameters, not the buffer
        # (a loop, not next() over a generator with a default, which torch.compile of torch 2.6 cannot trace)
        for weight in self.code_transform.parameters():
            if weight.is_floating_point():
                if weight.dtype != frozen.dtype:
                    frozen = frozen.to(weight.dtype)
                break
        with torch.autocast(self.frozen_codebook.device.type, enabled=False):
            codes = self.code_transform(frozen)
        if not isinstance(codes, Tensor) or codes.shape != (self.codebook_size, self.dim):
            got = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(
                f"codebook_transform must map the frozen codebook {tuple(self.frozen_codebook.shape)} to "
                f"(codebook_size, dim) = {(self.codebook_size, self.dim)}, got {got}"
            )
        return as_float32(codes)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes for indices as forward returns them: equal to the eval forward's output. Index -1 gives a
        zero vector; any other value outside ``[0, codebook_size)`` raises a ``ValueError``.

        Shape:
            - indices: ``(b, ...)`` int
            - output: ``(b, ..., dim)``, or ``(b, dim, ...)`` with ``channel_first``
        """
        idx = check_code_indices("indices", indices, self.codebook_size, allow_dropped=True).long()
        codes = F.embedding(idx.clamp(min=0), self.implicit_codebook())
        codes = torch.where((idx >= 0).unsqueeze(-1), codes, torch.zeros_like(codes))
        if self.channel_first and codes.ndim >= 3:
            codes = codes.movedim(-1, 1)
        return codes

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``mask`` (our extension; ``(b, n)`` bool for ``(b, n, d)`` tokens, True = kept) leaves the masked-out
        tokens out of the commitment loss and its gradients; they are still quantized."""
        parsed = parse_input(x, dim=self.dim, channel_first=self.channel_first, mask=mask)
        layout, (b, n, d) = parsed.layout, parsed.tokens.shape
        token_rows = as_float32(parsed.tokens.reshape(b * n, d))
        valid = None if parsed.mask is None else parsed.mask.reshape(b * n)

        codebook = self.implicit_codebook()  # (K, d)
        # the search tracks no gradient: no detached copies needed
        indices = nearest_codes(token_rows.unsqueeze(0), codebook.unsqueeze(0))[0]  # (N,)
        health.observe(self, indices, self.codebook_size, mask=valid)  # training only, see core/health
        quantized = F.embedding(indices, codebook)  # (N, d), differentiable in the transform

        out, loss = self._output_and_loss(token_rows, quantized, valid)
        out = layout.from_tokens(as_dtype(out.reshape(b, n, d), x.dtype))
        return out, layout.indices_from_tokens(indices.reshape(b, n)), loss

    def _output_and_loss(self, x: Tensor, quantized: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Output (forward value exactly ``q``; its gradient reaches the input only, by the rotation trick or
        straight through, never the transform) and ``(|sg(x) - q|^2 + beta |x - sg(q)|^2) * commitment_weight``
        as means over the elements of the valid tokens (all tokens when ``valid`` is None), in one autograd node
        (:class:`~vector_quantize_pytorch.core.autograd.QuantizeWithCommitment`)."""
        estimator_grad = rotation_trick_grad if self.rotation_trick else _straight_through_grad
        beta, weight = self.input_to_quantize_commit_loss_weight, self.commitment_weight
        return QuantizeWithCommitment.apply(x, quantized, valid, beta, weight, estimator_grad)


def _straight_through_grad(x: Tensor, q: Tensor, grad: Tensor) -> Tensor:
    """The straight-through estimator's input gradient: the output's gradient unchanged."""
    return grad


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
