"""One residual stack and one grouping wrapper, shared by every Residual* and Grouped* quantizer.

A residual quantizer (SoundStream, Algorithm 1) quantizes its input with layer 1, the remainder with
layer 2, and so on; the output is the sum of the layers' codes. :class:`ResidualStack` holds the loop,
the projections at stack level, quantize dropout and decoding from indices; a family only says how one of
its layers quantizes a residual and how it turns indices back into codes.

Quantize dropout (SoundStream, EnCodec) trains the stack to work with its first few layers only: during
training a random cutoff layer is drawn and later layers are skipped (index -1, loss 0). By default one
cutoff per batch, the same on every distributed rank (the reference's semantics); with
``quantize_dropout_per_sample=True`` each sample draws its own cutoff, as DAC does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import distributed
from .layout import TokenLayout
from .validate import check_indices


def round_up_cutoff(cutoff: int, multiple_of: int) -> int:
    """Round a cutoff layer index up so that the number of kept layers is a multiple of ``multiple_of``."""
    if multiple_of == 1:
        return cutoff
    return math.ceil((cutoff + 1) / multiple_of) * multiple_of - 1


def frac_gradient(t: Tensor, frac: float) -> Tensor:
    """Forward value ``t``; only a fraction ``frac`` of the gradient passes."""
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()


class ResidualStack(nn.Module):
    """Base class: ``num_quantizers`` layers quantizing successive residuals of tokens ``(b, n, d)``.

    Subclasses build ``self.layers`` (an ``nn.ModuleList``), ``self.project_in`` / ``self.project_out``, call
    :meth:`_init_dropout`, and implement:

    - ``_quantize_layer(index, residual, mask, **kwargs) -> (quantized, indices, loss)`` on tokens
      ``(b, n, d)``, returning ``(b, n, d)``, ``(b, n)`` and a loss (``()``; ``None`` for loss-free layers);
    - ``_layer_codes(index, indices, previous) -> (b, n, d)`` codes for indices ``(b, n)`` in ``[0, K)``,
      where ``previous`` is the sum of the codes of the earlier layers (for implicit neural codebooks).
    """

    layers: nn.ModuleList

    def _init_dropout(self, quantize_dropout, cutoff_index, multiple_of, per_sample=False) -> None:
        num = len(self.layers)
        if not 0 <= cutoff_index < max(num, 1):
            raise ValueError(f"quantize_dropout_cutoff_index must be in [0, {num - 1}], got {cutoff_index}")
        if multiple_of < 1:
            raise ValueError(f"quantize_dropout_multiple_of must be >= 1, got {multiple_of}")
        self.quantize_dropout = bool(quantize_dropout) and num > 1
        self.quantize_dropout_cutoff_index = cutoff_index
        self.quantize_dropout_multiple_of = multiple_of
        self.quantize_dropout_per_sample = per_sample

    @property
    def num_quantizers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ dropout

    def _dropout_plan(self, batch: int, device, seed: int | None) -> tuple[Tensor, int]:
        """Draw the last kept layer of each sample: ``(b,)`` on ``device`` and, as a host int, the largest.

        The draw uses a CPU generator seeded by ``seed`` (agreed across ranks when distributed), so it never
        waits on the device.
        """
        generator = torch.Generator().manual_seed(distributed.shared_seed(seed))
        low, high = self.quantize_dropout_cutoff_index, self.num_quantizers
        count = batch if self.quantize_dropout_per_sample else 1
        cutoffs = torch.randint(low, high, (count,), generator=generator)
        m = self.quantize_dropout_multiple_of
        if m != 1:
            cutoffs = (torch.div(cutoffs + m, m, rounding_mode="floor") * m - 1).clamp(max=high - 1)
        return cutoffs.expand(batch).to(device), int(cutoffs.max())

    # ------------------------------------------------------------------ the residual loop

    def _residual_loop(
        self,
        x: Tensor,
        mask: Tensor | None,
        cutoffs: Tensor | None,
        last_layer: int | None = None,
        quant_grad_frac: float = 0.0,
        **layer_kwargs,
    ) -> tuple[Tensor, Tensor, list, list]:
        """Quantize ``x`` ``(b, n, d)`` layer by layer.

        Returns quantized ``(b, n, d)``, indices ``(b, n, q)``, per-layer losses (list) and, for every layer
        that ran, its residual input ``(b, n, d)`` with the mask it ran under (``(b, n)`` or None), for
        shared-codebook maintenance.
        """
        b, n, _ = x.shape
        residual = x
        quantized_out = None  # the running sum starts at the first layer's codes (0 + q_0 is q_0)
        all_indices, all_losses, residuals = [], [], []
        for index in range(self.num_quantizers):
            layer_mask = mask
            keep = None
            if last_layer is not None and index > last_layer:
                all_indices.append(None)
                all_losses.append(None)
                continue
            if cutoffs is not None and self.quantize_dropout_per_sample:
                keep = (cutoffs >= index).unsqueeze(-1).expand(b, n)
                layer_mask = keep if mask is None else (mask & keep)
            residuals.append((residual, layer_mask))
            previous = x.new_zeros(()).expand_as(x) if quantized_out is None else quantized_out
            quantized, indices, loss = self._quantize_layer(
                index, residual, layer_mask, previous=previous, **layer_kwargs
            )
            if keep is not None:
                quantized = quantized * keep.unsqueeze(-1).to(quantized.dtype)
                indices = torch.where(keep, indices, torch.full_like(indices, -1))
            residual = residual - frac_gradient(quantized, quant_grad_frac)
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)
        if quantized_out is None:
            quantized_out = torch.zeros_like(x)
        return quantized_out, self._stack_indices(all_indices, b, n, x.device), all_losses, residuals

    @staticmethod
    def _stack_indices(all_indices: list, b: int, n: int, device) -> Tensor:
        """Per-layer ``(b, n)`` indices -> ``(b, n, q)`` in the layers' index dtype; skipped layers are -1."""
        dtype = next((i.dtype for i in all_indices if i is not None), torch.long)
        filled = [torch.full((b, n), -1, dtype=dtype, device=device) if i is None else i.to(dtype) for i in all_indices]
        return torch.stack(filled, dim=-1)

    def _stack_losses(self, losses: list, reference: Tensor) -> Tensor:
        zero = torch.zeros((), device=reference.device, dtype=torch.float32)
        return torch.stack([zero if loss is None else loss.float().reshape(()) for loss in losses])

    # ------------------------------------------------------------------ decoding

    def _pad_indices(self, indices: Tensor) -> Tensor:
        q = indices.shape[-1]
        if q > self.num_quantizers:
            raise ValueError(f"indices have {q} layers, the stack has only {self.num_quantizers}")
        if q < self.num_quantizers:
            pad = torch.full((*indices.shape[:-1], self.num_quantizers - q), -1, dtype=indices.dtype)
            indices = torch.cat((indices, pad.to(indices.device)), dim=-1)
        return indices

    @staticmethod
    def _sum_in_layer_order(codes: Tensor) -> Tensor:
        """``(q, ...)`` codes summed one layer at a time from zero, in the order the forward adds them, so
        that decoding reproduces the forward's output bit for bit (``Tensor.sum`` may add in another order)."""
        total = torch.zeros_like(codes[0])
        for layer_codes in codes:
            total = total + layer_codes
        return total

    def _all_layer_codes(self, indices: Tensor) -> Tensor:
        """Every layer's codes for indices as forward returns them: ``(b, ..., q') -> (q, b, ..., d)``;
        index -1 and missing trailing layers give zero codes."""
        check_indices("indices", indices, min_ndim=2)
        lead = indices.shape[:-1]
        codes = self._codes_from_token_indices(indices.reshape(indices.shape[0], -1, indices.shape[-1]))
        return codes.reshape(self.num_quantizers, *lead, codes.shape[-1])

    def _codes_from_token_indices(self, indices: Tensor) -> Tensor:
        """``(b, n, q)`` indices -> ``(q, b, n, d)`` codes; index -1 gives a zero code."""
        indices = self._pad_indices(indices.long())
        codes, previous = [], None
        for index in range(self.num_quantizers):
            layer_indices = indices[..., index]
            missing = layer_indices < 0
            layer_codes = self._layer_codes(index, layer_indices.clamp(min=0), previous)
            layer_codes = layer_codes.masked_fill(missing.unsqueeze(-1), 0.0)
            codes.append(layer_codes)
            previous = layer_codes if previous is None else previous + layer_codes
        return torch.stack(codes)


class GroupedStacks(nn.Module):
    """Split the features into ``groups`` chunks and quantize each with its own residual stack.

    Subclasses set ``self.rvqs`` (an ``nn.ModuleList``), ``self.groups``, ``self.dim`` and
    ``self.accept_image_fmap`` (channel axis 1 instead of the last axis).
    """

    rvqs: nn.ModuleList

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    @property
    def codebooks(self):
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def _split(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have {self.dim} features on axis {self.split_dim}, got shape {tuple(x.shape)}")
        return x.chunk(self.groups, dim=self.split_dim)

    def get_codes_from_indices(self, indices) -> Tensor:
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices) -> Tensor:
        outs = [rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)]
        return torch.cat(outs, dim=self.split_dim)

    def _grouped_forward(self, x: Tensor, indices, **kwargs):
        """Run every group with one shared dropout seed; stack indices ``(G, ...)`` and losses ``(G, ...)``."""
        chunks = self._split(x)
        if self.training and kwargs.get("rand_quantize_dropout_fixed_seed") is None:
            kwargs["rand_quantize_dropout_fixed_seed"] = distributed.shared_seed()
        if indices is not None:
            if len(indices) != self.groups:
                raise ValueError(f"indices must hold one tensor per group ({self.groups}), got {len(indices)}")
            outs = [rvq(c, indices=i, **kwargs) for rvq, c, i in zip(self.rvqs, chunks, indices)]
            quantized, ce = zip(*outs)
            return torch.cat(quantized, dim=self.split_dim), sum(ce)
        outs = [rvq(c, **kwargs) for rvq, c in zip(self.rvqs, chunks)]
        quantized, all_indices, *rest = zip(*outs)
        result = [torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices)]
        result += [torch.stack(r) for r in rest]
        return tuple(result)


def layout_for(x: Tensor, channel_first: bool) -> TokenLayout:
    return TokenLayout.of(x, channel_first=channel_first)
