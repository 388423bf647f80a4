"""VectorQuantize: nearest-code vector quantization with an EMA (or learned) codebook."""

from __future__ import annotations

from collections import namedtuple
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import estimators, health, losses
from .core.codebook import Codebook, valid_rows
from .core.layout import HeadSplit, TokenInput
from .core.recompute import stateful_forward
from .core.search import (
    TokenConditionedCodes,
    distance_logits,
    gather_codes,
    gumbel_noise_like,
    nearest_codes,
    sample_codes,
    topk_codes,
)
from .core.tensors import as_dtype, detached
from .vector_quantize_codes import VectorQuantizeCodes
from .vector_quantize_options import (
    CODEBOOK_OPTIONS,
    STORED_OPTIONS,
    check_forward_indices,
    check_topk,
    check_transform,
    resolve_defaults,
    validate,
)

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


class VectorQuantize(VectorQuantizeCodes):
    """Vector quantization layer (van den Oord et al. 2017, "Neural Discrete Representation Learning").

    Each input vector is replaced by its nearest code in a codebook. By default the codebook is learned by
    exponential moving averages of the vectors assigned to each code (VQ-VAE-2, SoundStream), and
    gradients reach the input through the rotation trick (Fifty et al. 2024). Options add multi-head
    codebooks, a lower codebook dimension with projections (ViT-VQGAN), cosine similarity, k-means
    initialisation and dead-code expiry (SoundStream), Gumbel sampling, orthogonal and diversity
    regularisers, learnable codebooks (with an in-place optimiser, vqtorch's synchronized update, DiVeQ or
    an FVQ bridge) and vqtorch's affine reparameterisation.

    The nearest-code search never materialises the tokens x codes distance matrix beyond a fixed budget,
    and EMA statistics are accumulated by index, so memory stays flat in the codebook size.

    Distributed training (decided at every call): a training step on ``N`` ranks updates every rank's codebook as
    one process would on the concatenated batch (rank 0's codebook broadcast first, EMA statistics all-reduced,
    k-means and dead-code rows chosen among every rank's rows with a shared seed). Every rank must run the same
    training forwards; eval forwards make no collective.

    Args:
        dim: input feature size.
        codebook_size: number of codes ``K``.
        codebook_dim: code size per head (default ``dim``); Linear projections in and out are added when
            ``codebook_dim * heads != dim``.
        heads: split each vector into ``heads`` chunks, each quantized.
        separate_codebook_per_head: one codebook per head instead of one shared by the heads.
        decay, eps: EMA decay of the statistics, in ``[0, 1]``, and their Laplace smoothing.
        freeze_codebook: never change the codebook (forward's ``freeze_codebook`` overrides it per call).
        kmeans_init, kmeans_iters, sync_kmeans: k-means initialisation (``kmeans_iters`` Lloyd steps, 0: sampled
            rows) on the first training batch, over every rank's rows when ``sync_kmeans``.
        use_cosine_sim: l2-normalise inputs and codes (cosine similarity).
        layernorm_after_project_in: a LayerNorm after ``project_in``.
        threshold_ema_dead_code: codes whose EMA count falls below this are replaced by batch vectors (0: off).
        channel_last / accept_image_fmap / accept_3d_fmap: input layout (see Shape).
        commitment_weight: weight of the commitment loss ``|x - sg(q)|^2``.
        commitment_use_cross_entropy_loss: the commitment term is the cross-entropy of the distance logits.
        orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes: orthogonality
            regulariser of the codes (Shin et al. 2021): its weight, only the codes used in the batch, a random
            subset of at most this many codes.
        codebook_diversity_loss_weight, codebook_diversity_temperature: weight and temperature of a loss that
            maximises the entropy of the batch's mean code distribution.
        stochastic_sample_codes, sample_codebook_temp: in training, sample codes from the softmax of the
            distance logits at this temperature (Gumbel) instead of taking the nearest.
        rotation_trick / straight_through / directional_reparam: gradient estimator (rotation trick by default
            when ``dim > 1``; ``straight_through`` is Gumbel-softmax straight-through; ``directional_reparam`` is
            DiVeQ, with noise variance ``directional_reparam_variance``).
        sync_codebook: all-reduce the codebook statistics across ranks (None: whenever distributed).
        sync_affine_param: all-reduce the batch moments of ``affine_param`` across ranks.
        ema_update, manual_ema_update: update the codes from the EMA statistics (default: unless the codebook is
            learned), or accumulate them and let the caller apply them with ``update_ema``.
        learnable_codebook: the codes are an ``nn.Parameter`` trained by gradients (default: with a bridge or DiVeQ).
        vq_bridge: a module applied to the codes before the search (FVQ's bridge); needs a learnable codebook.
        in_place_codebook_optimizer, manual_in_place_optimizer_update: ``params -> Optimizer`` stepped inside
            forward on the commitment loss (vqtorch's alternating update), or by the caller through
            :meth:`update_in_place_optimizer`.
        affine_param, affine_param_batch_decay, affine_param_codebook_decay: vqtorch's affine reparameterisation
            (codes moved to the batch's running moments) and the EMA decays of those moments.
        sync_update_v: vqtorch's synchronized update of a learnable codebook, in ``[0, 1]``.
        return_zeros_for_masked_padding: masked positions output zeros (else their input).
        route_gradients_to_input: gradients reach the input through the estimator (else only the codes learn).

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(b, n)`` (``(b, n, heads)``), loss ``()``
        - input ``(b, dim)`` -> ``(b, dim)``, ``(b,)``
        - ``channel_last=False``: ``(b, dim, n)`` -> ``(b, dim, n)``, ``(b, n)``
        - ``accept_image_fmap``: ``(b, dim, h, w)`` -> ``(b, dim, h, w)``, ``(b, h, w)``
        - ``accept_3d_fmap``: ``(b, dim, t, h, w)`` -> ``(b, dim, t, h, w)``, ``(b, t, h, w)``
        - ``topk=k``: quantized ``(b, n, k, dim)``, indices ``(b, n, k)``, per-token losses ``(b, n, k)``

    Returns:
        ``(quantized, indices, loss)``; with ``return_loss_breakdown=True`` a 4th item
        :class:`LossBreakdown`; with ``indices=`` given, ``(quantized, cross_entropy_loss)``.

    Example::

        >>> vq = VectorQuantize(dim=256, codebook_size=512)
        >>> x = torch.randn(1, 1024, 256)
        >>> quantized, indices, loss = vq(x)
        >>> quantized.shape, indices.shape, loss.shape
        (torch.Size([1, 1024, 256]), torch.Size([1, 1024]), torch.Size([]))
    """

    def __init__(
        self, dim: int, codebook_size: int, codebook_dim: int | None = None, heads: int = 1,
        separate_codebook_per_head: bool = False, decay: float = 0.8, eps: float = 1e-5, freeze_codebook: bool = False,
        kmeans_init: bool = False, kmeans_iters: int = 10, sync_kmeans: bool = True, use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False, threshold_ema_dead_code: float = 0, channel_last: bool = True,
        accept_image_fmap: bool = False, accept_3d_fmap: bool = False, commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False, orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False, orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0, codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False, sample_codebook_temp: float = 1.0, straight_through: bool = False,
        rotation_trick: bool | None = None, directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3, sync_codebook: bool | None = None, sync_affine_param: bool = False,
        ema_update: bool | None = None, vq_bridge: nn.Module | None = None, manual_ema_update: bool = False,
        learnable_codebook: bool | None = None,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        manual_in_place_optimizer_update: bool = False, affine_param: bool = False,
        affine_param_batch_decay: float = 0.99, affine_param_codebook_decay: float = 0.9, sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True, route_gradients_to_input: bool = True,
    ):  # fmt: skip
        super().__init__()
        args = dict(locals())
        validate(args)
        ema_update, learnable_codebook, rotation_trick = resolve_defaults(args)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.dim, self.heads, self.codebook_dim, self.codebook_size = dim, heads, codebook_dim, codebook_size
        self.separate_codebook_per_head = separate_codebook_per_head
        self.head_split = HeadSplit(heads, codebook_dim, separate_codebook_per_head)
        self._build_projections(dim, codebook_dim * heads, layernorm_after_project_in)

        self.has_commitment_loss = commitment_weight > 0 and not directional_reparam
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0
        self.rotation_trick = rotation_trick
        self.learnable_codebook = learnable_codebook
        for name in STORED_OPTIONS:
            setattr(self, name, args[name])

        self._codebook = Codebook(
            codebook_dim,
            codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            learnable_codebook=learnable_codebook or self.has_codebook_orthogonal_loss,
            ema_update=ema_update,
            **{name: args[name] for name in CODEBOOK_OPTIONS},
        )
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters()) if in_place_codebook_optimizer else None
        )
        self.codebook_revision = 0  # counts the codebook setter's writes and state loads, for caches of codes
        self.register_load_state_dict_post_hook(_count_revision)

    def _build_projections(self, dim: int, codebook_input_dim: int, layernorm_after_project_in: bool) -> None:
        self.has_projections = codebook_input_dim != dim
        if not self.has_projections:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()
            return
        project_in = nn.Linear(dim, codebook_input_dim)
        if layernorm_after_project_in:
            project_in = nn.Sequential(project_in, nn.LayerNorm(codebook_input_dim))
        self.project_in, self.project_out = project_in, nn.Linear(codebook_input_dim, dim)

    # ------------------------------------------------------------------ search

    def _select_codes(self, codebook_rows: Tensor, codes: Tensor, temperature: float, topk: int | None):
        """Indices ``(c, N)`` (or ``(c, N, k)``) and, when a loss needs them, the distance logits."""
        sampling = self.training and self.stochastic_sample_codes and temperature > 0
        if topk is not None:
            _, indices = topk_codes(codebook_rows.detach(), codes.detach(), topk, cosine=self.use_cosine_sim)
            return indices, None
        if self._needs_logits():
            logits = distance_logits(codebook_rows, codes, cosine=self.use_cosine_sim)
            scores = logits.detach()
            if sampling:
                scores = scores / temperature + gumbel_noise_like(scores)
            return scores.argmax(-1), logits
        if sampling:
            return sample_codes(codebook_rows.detach(), codes.detach(), temperature, cosine=self.use_cosine_sim), None
        return nearest_codes(codebook_rows, codes, cosine=self.use_cosine_sim), None  # no_grad: nothing to detach

    def _needs_logits(self) -> bool:
        return self.training and (
            self.straight_through or self.has_codebook_diversity_loss or self._uses_ce_commitment()
        )

    def _uses_ce_commitment(self) -> bool:
        return self.has_commitment_loss and self.commitment_use_cross_entropy_loss

    # ------------------------------------------------------------------ forward

    @stateful_forward  # activation checkpointing: the recompute replays this call's state (core/recompute.py)
    def forward(
        self,
        x: Tensor,
        indices: Tensor | None = None,
        mask: Tensor | None = None,
        lens: Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Callable | None = None,
        ema_update_weight: Tensor | Callable | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
        *,
        forced_indices: Tensor | None = None,
    ):
        """See the class docstring. ``forced_indices`` (as forward returns indices) skips the search and
        quantizes to those codes, with the usual estimator, losses and statistics (used after a beam search).

        ``codebook_transform_fn`` maps the codes ``(c, K, d)`` to one codebook per token ``(c, b, n, K, d)``
        (QINCo's implicit codebook); a :class:`~vector_quantize_pytorch.core.search.TokenConditionedCodes`
        does so without building every token's codebook at once. It needs a learnable codebook, one head and
        no ``topk``/``indices``."""
        parsed = self._parse(x, mask, lens)
        topk = check_topk(self, topk)
        check_transform(self, codebook_transform_fn, topk, indices)
        options = dict(
            freeze_codebook=self.freeze_codebook if freeze_codebook is None else freeze_codebook,
            temperature=self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp,
            ema_update_weight=ema_update_weight, accumulate=accum_ema_update, ema_update=ema_update,
        )  # fmt: skip
        if indices is not None:
            indices = check_forward_indices(self, "indices", indices, parsed.layout, parsed.batch)
        if forced_indices is not None:
            forced_indices = check_forward_indices(self, "forced_indices", forced_indices, parsed.layout, parsed.batch)

        codebook_rows = self.to_codebook_space(parsed.tokens)
        # codebook arithmetic in float32 whatever the autocast dtype (indices must not depend on it); the
        # projections (project_in above, project_out in _outputs) run under the caller's autocast
        with torch.autocast(codebook_rows.device.type, enabled=False):
            result = self._quantize(
                codebook_rows, parsed, indices, topk, forced_indices, codebook_transform_fn, **options
            )
        if indices is not None:
            return self._cross_entropy_path(*result, indices, parsed, x.dtype)
        out, code_indices, loss, breakdown = result
        quantized, out_indices = self._outputs(out, code_indices, x.dtype, parsed)
        if return_loss_breakdown:
            return quantized, out_indices, loss, breakdown
        return quantized, out_indices, loss

    def _quantize(
        self, codebook_rows, parsed, indices, topk, forced_indices, transform, *,
        freeze_codebook, temperature, ema_update_weight, accumulate, ema_update,
    ):  # fmt: skip
        """The pipeline on codebook-space rows ``codebook_rows`` ``(c, N, d)``: search, statistics, estimator, losses.

        Returns the quantized rows ``(c, N, d)`` (before ``project_out``), their indices, the loss and its
        breakdown; with ``indices`` given, what the cross-entropy path needs."""
        token_valid = None if parsed.mask is None else self.head_split.rows_of(parsed.mask)
        fixed_rows = detached(codebook_rows)  # for statistics: no gradient
        # rows that may count in statistics and losses, which exist in training only: eval needs just the mask
        valid = valid_rows(fixed_rows, token_valid) if self.training else token_valid
        updates_state = self.training and not freeze_codebook
        self._prepare_codebook(fixed_rows, valid, updates_state)

        codes = self.effective_codes()
        if updates_state and not self.learnable_codebook and (self.straight_through or indices is not None):
            # the EMA step below rewrites the buffer; the Gumbel estimator and the cross-entropy path use this
            # step's codes after it (everything else uses the codes gathered before it)
            codes = codes.clone()
        code_indices, logits, quantize = self._search(
            codebook_rows, codes, parsed, topk, forced_indices, transform, temperature
        )

        inplace_loss = zero = torch.zeros((), device=codebook_rows.device, dtype=torch.float32)
        if self.in_place_codebook_optimizer is not None and updates_state:
            inplace_loss, quantize, code_indices, codes = self._in_place_optimize(
                codebook_rows, quantize, valid, temperature
            )
        health.observe(self, code_indices, self.codebook_size, mask=valid)  # training only, see core/health
        if updates_state and topk is None:
            ema_on = self.ema_update if ema_update is None else ema_update
            self._codebook.update_(fixed_rows, code_indices, valid, ema_update=ema_on, weight=ema_update_weight,
                                   accumulate=accumulate)  # fmt: skip

        commit_quantize = quantize if (self.learnable_codebook and not freeze_codebook) else detached(quantize)
        out = self._route_gradients(
            codebook_rows, quantize, commit_quantize, logits, code_indices, codes, temperature, topk
        )
        if transform is not None and self.training:
            out = estimators.attach_gradient(out, out + quantize - detached(quantize))  # to the transform
        if indices is not None:
            return codebook_rows, codes, out, token_valid
        breakdown = self._losses(codebook_rows, commit_quantize, logits, code_indices, valid, topk, inplace_loss, zero)
        return out, code_indices, self._total_loss(breakdown, topk, parsed, token_valid), breakdown

    def _search(self, codebook_rows, codes, parsed: TokenInput, topk, forced_indices, transform, temperature):
        """``(indices, logits, quantize)``: the codes chosen for the rows (searched or forced) and, when a loss
        needs them, the distance logits."""
        logits = None
        if forced_indices is not None:
            code_indices = self._indices_to_rows(forced_indices, parsed).clamp(min=0)
            if self._needs_logits():
                logits = distance_logits(codebook_rows, codes, cosine=self.use_cosine_sim)
        elif transform is not None:
            code_indices = self._transformed(transform, parsed).nearest(detached(codebook_rows), codes)
        else:
            code_indices, logits = self._select_codes(codebook_rows, codes, temperature, topk)
        if transform is not None:
            return code_indices, logits, self._transformed(transform, parsed).gather(codes, code_indices)
        return code_indices, logits, gather_codes(codes, code_indices)

    @staticmethod
    def _transformed(transform, parsed: TokenInput) -> TokenConditionedCodes:
        if isinstance(transform, TokenConditionedCodes):
            return transform
        return TokenConditionedCodes.materialized(transform, parsed.batch, parsed.num_tokens)

    def _prepare_codebook(self, codebook_rows: Tensor, valid: Tensor, updates_state: bool) -> None:
        """k-means initialisation and affine statistics: training only (eval never changes state)."""
        if not updates_state:
            return
        cb = self._codebook
        cb.sync_state_once_()
        if cb.needs_kmeans_init():
            cb.kmeans_init_(codebook_rows, valid)
        if cb.affine_param:
            cb.update_affine_statistics_(codebook_rows, valid)

    def _in_place_optimize(self, codebook_rows: Tensor, quantize: Tensor, valid: Tensor, temperature: float):
        """One optimiser step on the codebook inside forward (vqtorch's alternating update), then search again.

        Rows that are masked or not finite give no gradient (they are zeroed before the squared error, so no
        ``NaN * 0`` reaches the codes); a batch where no rank has a valid row leaves the codes as they were."""
        loss = losses.commitment_loss(codebook_rows.detach(), quantize, valid)
        loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer_if_rows(valid.sum())
        codes = self.effective_codes()
        code_indices, _ = self._select_codes(codebook_rows, codes, temperature, None)
        return loss.detach(), gather_codes(codes, code_indices), code_indices, codes

    def _route_gradients(
        self, codebook_rows, quantize, commit_quantize, logits, code_indices, codes, temperature, topk
    ):
        if not self.training:
            return quantize
        out = detached(quantize) if not self.learnable_codebook else quantize
        if self.route_gradients_to_input and codebook_rows.requires_grad:
            x = codebook_rows.unsqueeze(2).expand_as(quantize) if topk is not None else codebook_rows
            if self.straight_through and logits is not None and temperature > 0:
                one_hot = F.one_hot(code_indices, self.codebook_size).to(logits.dtype)
                soft = estimators.gumbel_straight_through(one_hot, logits, temperature)
                out = estimators.attach_gradient(quantize, torch.bmm(soft, codes.detach()))
            elif self.rotation_trick:
                out = estimators.rotation_trick(x, detached(quantize))
            elif self.directional_reparam:
                out = estimators.directional_reparam(x, quantize, self.directional_reparam_variance)
            else:
                out = estimators.straight_through(x, detached(quantize))
        if self.sync_update_v > 0:
            out = estimators.synchronized_update(out, commit_quantize, self.sync_update_v)
        return out

    def _losses(self, codebook_rows, commit_quantize, logits, code_indices, valid, topk, inplace_loss, zero):
        commitment = diversity = orthogonal = zero
        if topk is not None:
            commitment = (codebook_rows.unsqueeze(2) - commit_quantize).pow(2).mean(-1)  # (c, N, k) per-token losses
        elif self.training and self.has_commitment_loss:
            if self.commitment_use_cross_entropy_loss:
                target = torch.where(valid, code_indices, torch.full_like(code_indices, -1))
                commitment = losses.cross_entropy_to_codes(logits, target)
            else:
                commitment = losses.commitment_loss(codebook_rows, commit_quantize, valid)
        if self.training and self.has_codebook_diversity_loss:
            diversity = losses.codebook_diversity_loss(logits, self.codebook_diversity_temperature, valid)
        if self.training and self.has_codebook_orthogonal_loss:
            codes, used = self._codebook.orthogonal_reg_codes(
                code_indices, valid, self.orthogonal_reg_active_codes_only, self.orthogonal_reg_max_codes
            )
            orthogonal = losses.orthogonal_loss(codes, used)
        return LossBreakdown(commitment, diversity, orthogonal, inplace_loss)

    def _total_loss(self, breakdown: LossBreakdown, topk, parsed: TokenInput, token_valid):
        total = breakdown.commitment * self.commitment_weight if self.has_commitment_loss else breakdown.commitment
        if topk is not None:
            total = self.head_split.merge(total, parsed.batch, parsed.num_tokens)[:, :, 0]  # (b, n, k)
            if token_valid is not None:
                total = total * parsed.mask.unsqueeze(-1).to(total.dtype)
            total = parsed.layout.indices_from_tokens(total)
        if self.training and self.has_codebook_diversity_loss:
            total = total + breakdown.codebook_diversity * self.codebook_diversity_loss_weight
        if self.training and self.has_codebook_orthogonal_loss:
            total = total + breakdown.orthogonal_reg * self.orthogonal_reg_weight
        return total

    def _outputs(self, out: Tensor, code_indices: Tensor, dtype: torch.dtype, parsed: TokenInput):
        """Merge heads, project out, fill masked positions and restore the input layout."""
        b, n, mask = parsed.batch, parsed.num_tokens, parsed.mask
        q, idx = self.head_split.merge(out, b, n), self.head_split.merge(code_indices, b, n)
        if code_indices.ndim == 3:  # top-k: (b, n, 1, k, d) -> (b, n, k, d)
            q, idx = q[:, :, 0], idx[:, :, 0]
        else:
            q = q.flatten(2)
            idx = idx[..., 0] if self.heads == 1 else idx
        q = as_dtype(self._project_out(as_dtype(q, dtype)), dtype)
        if mask is not None:
            fill = torch.zeros_like(parsed.tokens) if self.return_zeros_for_masked_padding else parsed.tokens
            if q.ndim == 4:
                fill = fill.unsqueeze(2)
            q = torch.where(mask[(...,) + (None,) * (q.ndim - 2)], q, fill)
            idx = torch.where(mask[(...,) + (None,) * (idx.ndim - 2)], idx, torch.full_like(idx, -1))
        return parsed.layout.from_tokens(q), parsed.layout.indices_from_tokens(idx)

    def _cross_entropy_path(self, codebook_rows, codes, out, token_valid, indices, parsed: TokenInput, dtype):
        """NaturalSpeech 2: cross-entropy of the distance logits against given code indices.

        Returns the quantized tokens in codebook space (before ``project_out``), heads merged, in the input's
        layout, and the cross-entropy."""
        target = self._indices_to_rows(indices, parsed)
        if token_valid is not None:
            target = torch.where(token_valid, target, torch.full_like(target, -1))
        ce = losses.cross_entropy_to_codes(distance_logits(codebook_rows, codes, cosine=self.use_cosine_sim), target)
        q = self.head_split.merge(out, parsed.batch, parsed.num_tokens).flatten(2).to(dtype)
        return parsed.layout.from_tokens(q), ce


def _count_revision(module: VectorQuantize, incompatible_keys) -> None:
    module.codebook_revision += 1
