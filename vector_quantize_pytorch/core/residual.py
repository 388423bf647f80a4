"""One residual stack and one grouping wrapper, shared by every Residual* and Grouped* quantizer.

A residual quantizer (SoundStream, Algorithm 1) quantizes its input with layer 1, the remainder with
layer 2, and so on; the output is the sum of the layers' codes. :class:`ResidualStack` holds the loop,
quantize dropout, the input and output plumbing and decoding from indices; a family only says how one of
its layers quantizes a residual and how it turns indices back into codes.

Quantize dropout (SoundStream, EnCodec) trains the stack to work with its first few layers only: during
training a random cutoff layer is drawn and later layers are dropped (index -1, zero codes, loss 0). By
default one cutoff per batch, the same on every distributed rank; with
``quantize_dropout_per_sample=True`` each sample draws its own cutoff, as DAC does.

The cutoff stays a tensor: a dropped layer is masked (its tokens are masked out, so its codebook
statistics do not move), which needs no host synchronisation and lets ``torch.compile`` capture the
training step in one graph. Layers that every sample drops are not run at all when knowing that is free
(eager mode, cutoffs on the CPU), which gives the same outputs at the cost of the kept layers only.
Cutoffs are a hash of a seed and of each sample's position in
the batch of every rank concatenated, so each rank draws one seed whatever its batch size, and a single
process fed the concatenated batch with the same seed draws the same cutoffs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed
from .layout import TokenLayout, parse_input
from .tensors import as_float32
from .validate import check_bool, check_code_indices, check_indices, check_int

# layer arguments that would change a layer's token shapes (the stack feeds every layer ``(b, n, codebook_dim)``
# tokens and stacks ``(b, n)`` indices), with the values that leave them alone
LAYER_ARGUMENTS_FIXED_BY_THE_STACK = {
    "num_codebooks": (1,),
    "keep_num_codebooks_dim": (None, False),
    "channel_first": (None, False),
    "has_projections": (None, False),
    "return_indices": (True,),
}

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: separates the hash streams of seeds and positions


def check_layer_kwargs(layer_kwargs: dict) -> None:
    """Reject per-layer arguments a residual stack cannot honour, with an error naming the argument."""
    for name, allowed in LAYER_ARGUMENTS_FIXED_BY_THE_STACK.items():
        if name in layer_kwargs and not any(
            layer_kwargs[name] is value or layer_kwargs[name] == value for value in allowed
        ):
            raise ValueError(
                f"{name}={layer_kwargs[name]!r} is not supported for the layers of a residual stack (allowed: "
                f"{', '.join(map(repr, allowed))}); split features with the Grouped* class, and use the stack's own "
                "dim / is_channel_first for projections and layouts"
            )


def round_up_cutoff(cutoff, multiple_of: int):
    """Round a cutoff layer index (an int or an int tensor) up so that the number of kept layers,
    ``cutoff + 1``, is a multiple of ``multiple_of`` (EnCodec's structured dropout)."""
    return (cutoff + multiple_of) // multiple_of * multiple_of - 1


def frac_gradient(t: Tensor, frac: float) -> Tensor:
    """Forward value exactly ``t``; only a fraction ``frac`` of the gradient passes."""
    if frac <= 0:
        return t.detach()
    return t.detach() + frac * (t - t.detach())


def dropout_seed(seed, device) -> Tensor:
    """The seed of a dropout draw as a ``()`` int64 tensor on ``device``: the given one (an int or a tensor),
    or rank 0's draw from the default generator of ``device`` (no host read)."""
    if seed is None:
        return distributed.shared_seed_tensor(device)
    if isinstance(seed, Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(())
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


def hashed_draws(seed: Tensor, positions: Tensor) -> Tensor:
    """Uniform integers in ``[0, 2^32)``, one per position: a function of ``(seed, position)`` only.

    Shape:
        - seed: ``()`` int64, positions: any int64 -> the shape of ``positions``
    """
    stream = distributed.hash32(distributed.hash32(seed) + _GOLDEN)
    return distributed.hash32(distributed.hash32(positions + _GOLDEN) ^ stream)


def first_sample_position(batch: int, device) -> Tensor | int:
    """Where this rank's samples start in the batch of every rank concatenated in rank order: 0 in a single
    process; when distributed, one all-gather of the local batch sizes (ranks may hold different numbers of
    samples), with no host read."""
    if not distributed.is_distributed():
        return 0
    sizes = distributed.all_gather_cat(torch.full((1,), batch, dtype=torch.int64, device=device))
    return sizes[: distributed.rank()].sum()


def _last_layer_to_run(cutoffs: Tensor | None, num_quantizers: int) -> int:
    """The last layer some sample keeps, when that is free to know: in eager mode with the cutoffs on the CPU
    (reading them is not a device synchronisation). Otherwise (on an accelerator, or under ``torch.compile``)
    every layer runs and the dropped ones are masked, which gives the same outputs, losses and state without a
    host read (a layer without a valid row changes no statistic); only the default generator has given out more
    numbers, so later random choices differ as with another seed.
    Per-sample cutoffs differ between ranks, and layers synchronise their statistics, so under
    torch.distributed every rank runs every layer."""
    if cutoffs is None or cutoffs.device.type != "cpu" or torch.compiler.is_compiling():
        return num_quantizers - 1
    if cutoffs.ndim > 0 and distributed.is_distributed():
        return num_quantizers - 1
    return int(cutoffs.max())


class ResidualStack(nn.Module):
    """Base class: ``num_quantizers`` layers quantizing successive residuals of tokens ``(b, n, d)``.

    Subclasses call :meth:`_init_dropout` (before building state: it validates the dropout arguments),
    build ``self.layers`` (an ``nn.ModuleList``) and ``self.project_in`` / ``self.project_out``, set
    ``self.dim``, and implement:

    - ``_quantize_layer(index, residual, mask, **kwargs) -> (quantized, indices, loss)`` on tokens
      ``(b, n, d)``, returning ``(b, n, d)``, ``(b, n)`` and a loss (``()``; ``None`` for loss-free layers);
      masked tokens (``mask`` False) must not change the layer's statistics (default: the layer's forward
      with the mask);
    - ``_layer_codes(index, indices, previous) -> (b, n, d)`` codes for indices ``(b, n)`` in ``[0, K)``,
      where ``previous`` is the sum of the codes of the earlier layers (for implicit neural codebooks).
    """

    layers: nn.ModuleList
    # True for stacks that drop layers only while autograd records (ResidualFSQ, ResidualLFQ)
    dropout_needs_grad = False

    @property
    def codebooks(self) -> Tensor:
        """``(q, K, d)``: every layer's ``codebook``, stacked."""
        return torch.stack([layer.codebook for layer in self.layers])

    def _quantize_layer(self, index, residual, mask, *, previous):
        return self.layers[index](residual, mask=mask)

    def _init_dropout(self, quantize_dropout, cutoff_index, multiple_of, per_sample=False, *, num_quantizers=None):
        """Validate and keep the quantize dropout arguments of a stack of ``num_quantizers`` layers
        (default: ``len(self.layers)``, when they are built already)."""
        num = len(self.layers) if num_quantizers is None else num_quantizers
        check_bool("quantize_dropout", quantize_dropout)
        check_int("quantize_dropout_cutoff_index", cutoff_index, minimum=0, maximum=max(num - 1, 0))
        check_int("quantize_dropout_multiple_of", multiple_of, minimum=1)
        check_bool("quantize_dropout_per_sample", per_sample)
        self.quantize_dropout = quantize_dropout and num > 1
        self.quantize_dropout_cutoff_index = cutoff_index
        self.quantize_dropout_multiple_of = multiple_of
        self.quantize_dropout_per_sample = per_sample

    @property
    def num_quantizers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ dropout

    def quantize_dropout_active(self) -> bool:
        """Whether this forward drops layers: in training with ``quantize_dropout`` (and, for stacks whose
        dropout only matters to gradients, when gradients are tracked)."""
        return self.training and self.quantize_dropout and (torch.is_grad_enabled() or not self.dropout_needs_grad)

    def _dropout_plan(self, batch: int, device, seed=None) -> Tensor:
        """The last kept layer, drawn uniformly in ``[quantize_dropout_cutoff_index, num_quantizers)`` and rounded
        up by ``quantize_dropout_multiple_of``: ``()`` for the batch, or ``(batch,)`` per sample. int64 on
        ``device``, without a host read.

        ``seed`` (an int, a ``()`` tensor, or None: rank 0's draw from the default generator) decides the
        draw; a sample's cutoff depends on its position in the batch of every rank concatenated.
        """
        seed = dropout_seed(seed, device)
        if self.quantize_dropout_per_sample:
            positions = torch.arange(batch, device=device) + first_sample_position(batch, device)
        else:
            positions = torch.zeros((), dtype=torch.int64, device=device)
        low, high = self.quantize_dropout_cutoff_index, self.num_quantizers
        cutoffs = low + hashed_draws(seed, positions) % (high - low)
        return round_up_cutoff(cutoffs, self.quantize_dropout_multiple_of).clamp(max=high - 1)

    @staticmethod
    def _drop_layer(keep: Tensor, quantized: Tensor, indices: Tensor, loss: Tensor | None):
        """Zero codes and index -1 for the samples that drop a layer (``keep``: ``()`` or ``(b,)``), and a zero
        loss when no sample keeps it (otherwise the layer's masked loss already leaves the others out)."""
        token_keep = keep.reshape(-1, *([1] * (indices.ndim - 1)))
        quantized = torch.where(token_keep.unsqueeze(-1), quantized, torch.zeros_like(quantized))
        indices = torch.where(token_keep, indices, torch.full_like(indices, -1))
        if loss is not None:
            loss = torch.where(keep.any(), loss, torch.zeros_like(loss))
        return quantized, indices, loss

    # ------------------------------------------------------------------ the residual loop

    def _residual_loop(
        self,
        x: Tensor,
        mask: Tensor | None,
        cutoffs: Tensor | None,
        quant_grad_frac: float = 0.0,
        **layer_kwargs,
    ) -> tuple[Tensor, Tensor, list, list]:
        """Quantize ``x`` ``(b, n, d)`` layer by layer; ``cutoffs`` (``()`` or ``(b,)``, from
        :meth:`_dropout_plan`) drops the layers after them.

        Returns quantized ``(b, n, d)``, indices ``(b, n, q)``, per-layer losses (list) and, for every layer,
        its residual input ``(b, n, d)`` with the mask it ran under (``(b, n)`` or None), for shared-codebook
        maintenance.
        """
        b, n, _ = x.shape
        residual = x
        quantized_out = None  # the running sum starts at the first layer's codes (0 + q_0 is q_0)
        all_indices, all_losses, residuals = [], [], []
        last_layer = _last_layer_to_run(cutoffs, self.num_quantizers)
        for index in range(self.num_quantizers):
            if index > last_layer:  # dropped by every sample: what running it masked would give, without running it
                residuals.append((residual, torch.zeros(b, n, dtype=torch.bool, device=x.device)))
                all_indices.append(torch.full_like(all_indices[0], -1))
                all_losses.append(None if all_losses[0] is None else torch.zeros_like(all_losses[0]))
                continue
            keep = None if cutoffs is None else cutoffs >= index
            layer_mask = mask
            if keep is not None:
                token_keep = keep.reshape(-1, 1).expand(b, n)
                layer_mask = token_keep if mask is None else (mask & token_keep)
            residuals.append((residual, layer_mask))
            previous = x.new_zeros(()).expand_as(x) if quantized_out is None else quantized_out
            quantized, indices, loss = self._quantize_layer(
                index, residual, layer_mask, previous=previous, **layer_kwargs
            )
            if keep is not None:
                quantized, indices, loss = self._drop_layer(keep, quantized, indices, loss)
            residual = residual - frac_gradient(quantized, quant_grad_frac)
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)
        return quantized_out, torch.stack(all_indices, dim=-1), all_losses, residuals

    def _quantize_residuals(self, h: Tensor, mask: Tensor | None, seed, **loop_kwargs):
        """:meth:`_residual_loop` with quantize dropout when it applies (training)."""
        cutoffs = self._dropout_plan(h.shape[0], h.device, seed) if self.quantize_dropout_active() else None
        return self._residual_loop(h, mask, cutoffs, **loop_kwargs)

    def _stack_losses(self, losses: list, like: Tensor) -> Tensor:
        """``(q,)`` float32 losses of the layers; a layer that did not run (None) contributes 0."""
        zero = None
        if any(loss is None for loss in losses):
            zero = torch.zeros((), device=like.device, dtype=torch.float32)
        scalars = [
            zero if loss is None else as_float32(loss if loss.ndim == 0 else loss.reshape(())) for loss in losses
        ]
        return torch.stack(scalars)

    # ------------------------------------------------------------------ input and output

    def _input_tokens(self, x: Tensor, channel_first: bool | None, mask: Tensor | None = None, **parse_kwargs):
        """``(layout, tokens (b, n, dim), mask (b, n) or None)`` of ``x`` (:func:`~.layout.parse_input`; at least
        3 dimensions). ``channel_first=None``: features on axis 1 for images and video (4 or more dimensions)."""
        parsed = parse_input(x, dim=self.dim, channel_first=channel_first, mask=mask, min_ndim=3, **parse_kwargs)
        return parsed.layout, parsed.tokens, parsed.mask

    def _forward_result(self, out, layout: TokenLayout, indices, losses=None, return_all_codes: bool = False):
        """``(out, indices[, losses][, all_codes])`` with the indices in the input's layout; losses are left
        out for loss-free families (None)."""
        result = (out, layout.indices_from_tokens(indices))
        if losses is not None:
            result = (*result, self._stack_losses(losses, out))
        if return_all_codes:
            result = (*result, self.get_codes_from_indices(result[1]))
        return result

    # ------------------------------------------------------------------ decoding

    def _pad_indices(self, indices: Tensor) -> Tensor:
        q = indices.shape[-1]
        if q > self.num_quantizers:
            raise ValueError(f"indices have {q} layers, the stack has only {self.num_quantizers}")
        if q < self.num_quantizers:
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - q), -1)  # on the device: no copy
            indices = torch.cat((indices, pad), dim=-1)
        return indices

    @staticmethod
    def _sum_in_layer_order(codes: Tensor) -> Tensor:
        """``(q, ...)`` codes summed one layer at a time from zero, in the order the forward adds them, so
        that decoding reproduces the forward's output bit for bit (``Tensor.sum`` may add in another order)."""
        total = torch.zeros_like(codes[0])
        for layer_codes in codes:
            total = total + layer_codes
        return total

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Every layer's codes (in the layers' code space, before ``project_out``); index -1 (a dropped
        layer) gives a zero code, and missing trailing layers count as dropped. Any other value outside
        ``[0, codebook_size)`` of its layer raises a ``ValueError`` naming the layer and the range.

        Shape:
            - indices: ``(b, ..., q')`` with ``q' <= q``, as forward returns them
            - output: ``(q, b, ..., codebook_dim)``
        """
        return self._all_layer_codes(indices)

    def _decode_indices(self, indices: Tensor, channel_first: bool) -> Tensor:
        """``project_out`` of the sum of every layer's codes, with the features on axis 1 if ``channel_first``."""
        out = self.project_out(self._sum_in_layer_order(self.get_codes_from_indices(indices)))
        return out.movedim(-1, 1) if channel_first else out

    def _layer_codebook_sizes(self) -> tuple[int, ...]:
        return tuple(layer.codebook_size for layer in self.layers)

    def _all_layer_codes(self, indices: Tensor) -> Tensor:
        """Every layer's codes for indices as forward returns them: ``(b, ..., q') -> (q, b, ..., d)``;
        index -1 and missing trailing layers give zero codes; any other value outside ``[0, K)`` of its layer
        raises a ``ValueError`` (:func:`~.validate.check_code_indices`)."""
        check_indices("indices", indices, min_ndim=2)
        if indices.shape[-1] <= self.num_quantizers:  # more layers than the stack's: _pad_indices says so
            indices = check_code_indices("indices", indices, self._layer_codebook_sizes(), allow_dropped=True)
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

    Subclasses call :meth:`_init_groups` and set ``self.rvqs`` (an ``nn.ModuleList`` of ``groups`` stacks).
    """

    rvqs: nn.ModuleList

    def _init_groups(self, dim: int, groups: int, accept_image_fmap: bool) -> None:
        """Validate and keep ``dim`` (divisible by ``groups``), ``groups`` and ``accept_image_fmap`` (the
        features are on axis 1 instead of the last axis)."""
        check_int("dim", dim, minimum=1)
        check_int("groups", groups, minimum=1)
        if dim % groups:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.dim, self.groups = dim, groups
        self.accept_image_fmap = check_bool("accept_image_fmap", accept_image_fmap)

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
        """Run every group, with one dropout seed shared by the groups (drawn only when a group drops layers);
        stack indices ``(G, ...)`` and losses ``(G, ...)``."""
        chunks = self._split(x)
        if indices is not None:
            if len(indices) != self.groups:
                raise ValueError(f"indices must hold one tensor per group ({self.groups}), got {len(indices)}")
            outs = [rvq(c, indices=i, **kwargs) for rvq, c, i in zip(self.rvqs, chunks, indices)]
            quantized, ce = zip(*outs)
            return torch.cat(quantized, dim=self.split_dim), sum(ce)
        if kwargs.get("rand_quantize_dropout_fixed_seed") is None and self.rvqs[0].quantize_dropout_active():
            kwargs["rand_quantize_dropout_fixed_seed"] = dropout_seed(None, x.device)
        outs = [rvq(c, **kwargs) for rvq, c in zip(self.rvqs, chunks)]
        quantized, all_indices, *rest = zip(*outs)
        result = [torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices)]
        result += [torch.stack(r) for r in rest]
        return tuple(result)
