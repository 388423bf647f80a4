"""The codebook side of VectorQuantize: reading and writing its codes, decoding indices, the maintenance calls
(EMA from given indices, dead-code expiry, the in-place optimiser) and the doors containers use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.codebook import valid_rows
from .core.inplace import average_gradients_, step_if_rows
from .core.layout import TokenInput, parse_input, token_mask
from .core.search import gather_codes
from .core.tensors import as_float32, detached
from .core.validate import check_code_indices
from .vector_quantize_options import SHAPES, check_forward_indices


class VectorQuantizeCodes(nn.Module):
    """Base of :class:`~vector_quantize_pytorch.VectorQuantize` holding every method that reads, writes, decodes or
    maintains its codes; the encoding pipeline lives in the subclass, which builds the state these methods use
    (``_codebook``, ``head_split``, the projections and the layout options)."""

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def num_codebooks(self) -> int:
        return self._codebook.num_codebooks

    @property
    def codebook(self) -> Tensor:
        """The codes: ``(K, d)``, or ``(heads, K, d)`` with separate codebooks per head."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        if not self.separate_codebook_per_head:
            codes = codes.unsqueeze(0)
        with torch.no_grad():
            self._codebook.embed.copy_(codes)
        self.codebook_revision += 1

    def effective_codes(self) -> Tensor:
        """The codes inputs are matched against: after an FVQ bridge and the affine reparameterisation.

        Shape:
            - output: ``(num_codebooks, K, codebook_dim)`` float32
        """
        cb = self._codebook
        codes = as_float32(cb.embed if self.learnable_codebook else detached(cb.embed))
        if self.vq_bridge is not None:
            codes = self.vq_bridge(codes)
        if cb.affine_param:
            codes = cb.affine_codes(codes)
        return codes

    def share_codebook(self, other: VectorQuantizeCodes) -> None:
        """Use ``other``'s codebook (its codes and statistics) from now on, as RQ-VAE's shared codebook does."""
        self._codebook = other._codebook

    def needs_kmeans_init(self) -> bool:
        """Whether the next training step k-means-initialises the codebook (its codes are zeros until then)."""
        return self._codebook.needs_kmeans_init()

    def to_codebook_space(self, tokens: Tensor) -> Tensor:
        """Tokens as the rows the codebooks match: projected in, split into heads, l2-normalised for cosine.

        Shape:
            - tokens: ``(b, n, dim)``
            - output: ``(c, N, codebook_dim)`` float32 (:class:`~vector_quantize_pytorch.core.layout.HeadSplit`)
        """
        rows = as_float32(self.head_split.split(self.project_in(tokens)))
        return F.normalize(rows, dim=-1) if self.use_cosine_sim else rows

    @torch.no_grad()
    def maintain_codebook_(self, rows: Tensor, valid: Tensor, *, apply_ema: bool) -> None:
        """A codebook maintenance pass over given rows: apply the accumulated EMA step (``apply_ema``), step
        the in-place optimiser when a rank had a valid row, and replace dead codes by valid rows.

        Shape:
            - rows: ``(c, N, codebook_dim)`` (:meth:`to_codebook_space`), valid: ``(c, N)`` bool
        """
        if apply_ema:
            self._codebook.update_ema()
        self.update_in_place_optimizer_if_rows(valid.sum())
        self._codebook.expire_codes_(rows, valid)

    def _parse(self, x: Tensor, mask=None, lens=None) -> TokenInput:
        fmap = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        return parse_input(
            x,
            dim=self.dim,
            channel_first=fmap is not None or not self.channel_last,
            ndim=fmap or (2, 3),
            mask=mask,
            lens=lens,
            layout_hint={3: "channel_last=False", 4: "accept_image_fmap=True", 5: "accept_3d_fmap=True"},
            shapes=SHAPES[fmap]
            if fmap
            else "(b, n, dim) or (b, dim)"
            if self.channel_last
            else "(b, dim, n) or (b, dim)",
        )

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes in codebook space for indices as forward returns them; index -1 gives a zero code.
        Other values outside ``[0, codebook_size)`` raise a ``ValueError`` (:func:`~.core.validate.check_code_indices`).

        Shape:
            - indices: ``(b, ...)`` or ``(b, ..., heads)``
            - output: ``(b, ..., heads * codebook_dim)``, channel-first (``(b, d, ...)``) when the
              quantizer takes channel-first inputs
        """
        return self._channel_first(self._codes_channel_last(indices))

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for these indices (eval mode): codes projected out, in the input layout.

        Shape:
            - indices: ``(b, ...)`` or ``(b, ..., heads)``
            - output: ``(b, ..., dim)`` (channel-first for channel-first quantizers)
        """
        out = self._project_out(self._codes_channel_last(indices))
        if self.return_zeros_for_masked_padding:
            missing = (indices < 0).all(dim=-1) if self.heads > 1 else indices < 0
            out = out.masked_fill(missing.unsqueeze(-1), 0.0)
        return self._channel_first(out)

    def _project_out(self, t: Tensor) -> Tensor:
        """``project_out`` on ``(..., heads * codebook_dim)`` as one ``(M, heads * codebook_dim)`` matrix, so that
        forward and decoding run the same kernel on the same rows whatever the layout (bit-identical outputs)."""
        if not self.has_projections:
            return t
        return self.project_out(t.reshape(-1, t.shape[-1])).reshape(*t.shape[:-1], self.dim)

    def _codes_channel_last(self, indices: Tensor) -> Tensor:
        indices = check_code_indices(
            "indices", indices, self.codebook_size, allow_dropped=True, min_ndim=1 if self.heads > 1 else 0
        )
        if self.heads > 1 and indices.shape[-1] != self.heads:
            raise ValueError(f"indices must end with a heads axis of size {self.heads}, got {tuple(indices.shape)}")
        lead = indices.shape[:-1] if self.heads > 1 else indices.shape
        num_vectors = indices.numel() // self.heads
        rows = self.head_split.rows_of(indices.reshape(1, num_vectors, self.heads).long())
        picked = gather_codes(self.effective_codes(), rows.clamp(min=0))
        picked = torch.where((rows >= 0).unsqueeze(-1), picked, torch.zeros_like(picked))
        return self.head_split.merge(picked, 1, num_vectors).reshape(*lead, self.heads * self.codebook_dim)

    def _channel_first(self, t: Tensor) -> Tensor:
        if (self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last) and t.ndim >= 3:
            return t.movedim(-1, 1)
        return t

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimiser (gradients averaged over ranks when distributed)."""
        if self.in_place_codebook_optimizer is None:
            return
        average_gradients_(self._codebook.parameters(), self._codebook.sync_codebook)
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    def update_in_place_optimizer_if_rows(self, num_valid_rows: Tensor) -> None:
        """:meth:`update_in_place_optimizer`, then the codes it moved are restored when no rank had a valid row
        (``num_valid_rows`` summed over ranks is 0), so that an optimiser with momentum or weight decay cannot
        move them on a batch with nothing to learn from. No host synchronisation."""
        if self.in_place_codebook_optimizer is not None:
            params = list(self._codebook.parameters())
            step_if_rows(self.in_place_codebook_optimizer, params, num_valid_rows, sync=self._codebook.sync_codebook)

    @torch.no_grad()
    def expire_codes_(self, x: Tensor) -> None:
        """Replace dead codes by vectors of ``x`` (given in the input layout)."""
        rows = self.to_codebook_space(self._parse(x).tokens)
        self._codebook.expire_codes_(rows, valid_rows(rows, None))

    @torch.no_grad()
    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """Update the codebook statistics with given indices (e.g. chosen by a beam search).

        Shape:
            - x: as forward's input; indices: as forward returns them; mask: ``(b, n)``
        """
        parsed = self._parse(x)
        indices = check_forward_indices(self, "indices", indices, parsed.layout, parsed.batch)
        rows = self.to_codebook_space(parsed.tokens)
        code_rows = self._indices_to_rows(indices, parsed)
        mask = token_mask(mask, None, parsed.layout, parsed.batch)
        valid = valid_rows(rows, None if mask is None else self.head_split.rows_of(mask)) & (code_rows >= 0)
        self._codebook.update_(rows, code_rows, valid)

    update_ema_indices = update_indices

    def _indices_to_rows(self, indices: Tensor, parsed: TokenInput) -> Tensor:
        """User indices ``(b, ...)`` / ``(b, ..., h)`` -> ``(c, N)`` rows of the head split."""
        return self.head_split.rows_of(indices.reshape(parsed.batch, parsed.num_tokens, self.heads).long())
