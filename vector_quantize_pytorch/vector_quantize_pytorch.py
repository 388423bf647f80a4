"""VectorQuantize: nearest-code vector quantization with an EMA (or learned) codebook."""

from __future__ import annotations

from collections import namedtuple
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import distributed, estimators, losses
from .core.codebook import Codebook, valid_rows
from .core.layout import TokenLayout, check_mask, lens_to_mask
from .core.linear import project
from .core.search import distance_logits, gather_codes, gumbel_noise_like, nearest_codes, sample_codes, topk_codes
from .core.tensors import as_dtype, as_float32, detached
from .core.validate import check_bool, check_float, check_indices, check_int, check_optional_bool

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


def _validate(args: dict) -> None:
    check_int("dim", args["dim"], minimum=1)
    check_int("codebook_size", args["codebook_size"], minimum=1)
    if args["codebook_dim"] is not None:
        check_int("codebook_dim", args["codebook_dim"], minimum=1)
    check_int("heads", args["heads"], minimum=1)
    check_int("kmeans_iters", args["kmeans_iters"], minimum=0)
    check_float("decay", args["decay"], minimum=0.0, maximum=1.0)
    check_float("eps", args["eps"], minimum=0.0)
    check_float("threshold_ema_dead_code", args["threshold_ema_dead_code"], minimum=0.0)
    check_float("commitment_weight", args["commitment_weight"], minimum=0.0)
    check_float("orthogonal_reg_weight", args["orthogonal_reg_weight"], minimum=0.0)
    if args["orthogonal_reg_max_codes"] is not None:
        check_int("orthogonal_reg_max_codes", args["orthogonal_reg_max_codes"], minimum=1)
    check_float("codebook_diversity_loss_weight", args["codebook_diversity_loss_weight"], minimum=0.0)
    check_float("codebook_diversity_temperature", args["codebook_diversity_temperature"])
    check_float("sample_codebook_temp", args["sample_codebook_temp"], minimum=0.0)
    check_float("directional_reparam_variance", args["directional_reparam_variance"], minimum=0.0)
    check_float("affine_param_batch_decay", args["affine_param_batch_decay"], minimum=0.0, maximum=1.0)
    check_float("affine_param_codebook_decay", args["affine_param_codebook_decay"], minimum=0.0, maximum=1.0)
    check_float("sync_update_v", args["sync_update_v"], minimum=0.0, maximum=1.0)
    for name in (
        "separate_codebook_per_head",
        "freeze_codebook",
        "kmeans_init",
        "sync_kmeans",
        "use_cosine_sim",
        "layernorm_after_project_in",
        "channel_last",
        "accept_image_fmap",
        "accept_3d_fmap",
        "commitment_use_cross_entropy_loss",
        "orthogonal_reg_active_codes_only",
        "stochastic_sample_codes",
        "straight_through",
        "directional_reparam",
        "sync_affine_param",
        "manual_ema_update",
        "manual_in_place_optimizer_update",
        "affine_param",
        "return_zeros_for_masked_padding",
        "route_gradients_to_input",
    ):
        check_bool(name, args[name])
    for name in ("rotation_trick", "sync_codebook", "ema_update", "learnable_codebook"):
        check_optional_bool(name, args[name])
    if args["accept_image_fmap"] and args["accept_3d_fmap"]:
        raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
    if args["vq_bridge"] is not None and not isinstance(args["vq_bridge"], nn.Module):
        raise TypeError(f"vq_bridge must be an nn.Module, got {type(args['vq_bridge']).__name__}")
    if args["in_place_codebook_optimizer"] is not None and not callable(args["in_place_codebook_optimizer"]):
        raise TypeError("in_place_codebook_optimizer must be a callable params -> torch.optim.Optimizer")


def _resolve_estimator(straight_through: bool, rotation_trick: bool | None, directional_reparam: bool, dim: int):
    """The reference turns the rotation trick on by default; asking for another estimator turns it off."""
    if rotation_trick is None:
        rotation_trick = not (straight_through or directional_reparam) and dim > 1
    chosen = [name for name, on in [("straight_through", straight_through), ("rotation_trick", rotation_trick),
                                    ("directional_reparam", directional_reparam)] if on]  # fmt: skip
    if len(chosen) > 1:
        raise ValueError(f"at most one gradient estimator may be chosen, got {' and '.join(chosen)} all True")
    return rotation_trick


class VectorQuantize(nn.Module):
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

    Distributed training: under ``torch.distributed`` (checked at every call, so the module may be built
    before ``init_process_group``) a training step on ``N`` ranks updates every rank's codebook as one
    process would on the concatenated batch: the first step broadcasts rank 0's codebook, the EMA counts
    and sums are all-reduced, k-means initialisation (``sync_kmeans``) and dead-code replacement choose
    their rows among every rank's rows with a seed shared by the ranks. Collectives are made on every
    training step of every rank, whether or not its batch has a valid token, so every rank must run the
    same training forwards; eval forwards make none. ``sync_codebook=False`` keeps each rank's codebook
    to itself. A learnable codebook is an ``nn.Parameter`` trained through DistributedDataParallel as usual.

    Args:
        dim: input feature size.
        codebook_size: number of codes ``K``.
        codebook_dim: code size per head (default ``dim // heads``... as the reference: ``dim``); a Linear
            projection in and out is added when ``codebook_dim * heads != dim``.
        heads: split each vector into ``heads`` chunks, each quantized.
        separate_codebook_per_head: one codebook per head instead of one shared.
        decay, eps: EMA decay and Laplace smoothing.
        kmeans_init, kmeans_iters, sync_kmeans: k-means initialisation on the first training batch.
        threshold_ema_dead_code: replace codes whose EMA count drops below this by batch vectors.
        use_cosine_sim: l2-normalise inputs and codes.
        channel_last / accept_image_fmap / accept_3d_fmap: input layout (see Shape).
        commitment_weight: weight of the commitment loss ``|x - sg(q)|^2``.
        rotation_trick / straight_through / directional_reparam: gradient estimator (rotation trick by
            default when ``dim > 1``; ``straight_through`` is Gumbel-softmax straight-through).
        sync_codebook: all-reduce the codebook statistics across ranks (None: whenever distributed).
        sync_affine_param: all-reduce the batch moments of ``affine_param`` across ranks.
        See REFERENCE.md for the remaining arguments; every one of the reference's is accepted.

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
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: bool | None = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_codebook: bool | None = None,
        sync_affine_param: bool = False,
        ema_update: bool | None = None,
        vq_bridge: nn.Module | None = None,
        manual_ema_update: bool = False,
        learnable_codebook: bool | None = None,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        manual_in_place_optimizer_update: bool = False,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
    ):
        super().__init__()
        _validate(dict(locals()))
        has_bridge = vq_bridge is not None
        ema_update = (not directional_reparam and not has_bridge) if ema_update is None else ema_update
        learnable_codebook = (directional_reparam or has_bridge) if learnable_codebook is None else learnable_codebook
        rotation_trick = _resolve_estimator(straight_through, rotation_trick, directional_reparam, dim)
        self._check_compatibility(locals())

        codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = codebook_dim * heads
        self.dim = dim
        self.heads = heads
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.separate_codebook_per_head = separate_codebook_per_head
        self.has_projections = codebook_input_dim != dim
        if self.has_projections:
            layers = [nn.Linear(dim, codebook_input_dim)]
            if layernorm_after_project_in:
                layers.append(nn.LayerNorm(codebook_input_dim))
            self.project_in = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
            self.project_out = nn.Linear(codebook_input_dim, dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

        self.eps = eps
        self.commitment_weight = commitment_weight
        self.has_commitment_loss = commitment_weight > 0 and not directional_reparam
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = codebook_diversity_loss_weight
        self.has_codebook_diversity_loss = codebook_diversity_loss_weight > 0
        self.codebook_diversity_temperature = codebook_diversity_temperature
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sample_codebook_temp = sample_codebook_temp
        self.straight_through = straight_through
        self.rotation_trick = rotation_trick
        self.directional_reparam = directional_reparam
        self.directional_reparam_variance = directional_reparam_variance
        self.sync_update_v = sync_update_v
        self.learnable_codebook = learnable_codebook
        self.use_cosine_sim = use_cosine_sim
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.route_gradients_to_input = route_gradients_to_input
        self.freeze_codebook = freeze_codebook
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        self.channel_last = channel_last
        self.vq_bridge = vq_bridge

        self._codebook = Codebook(
            codebook_dim,
            codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            learnable_codebook=learnable_codebook or self.has_codebook_orthogonal_loss,
            ema_update=ema_update,
            manual_ema_update=manual_ema_update,
            use_cosine_sim=use_cosine_sim,
            affine_param=affine_param,
            sync_affine_param=sync_affine_param,
            affine_param_batch_decay=affine_param_batch_decay,
            affine_param_codebook_decay=affine_param_codebook_decay,
            sync_codebook=sync_codebook,
        )
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters()) if in_place_codebook_optimizer else None
        )
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update

    @staticmethod
    def _check_compatibility(a: dict) -> None:
        if a["use_cosine_sim"] and a["learnable_codebook"]:
            raise ValueError("use_cosine_sim=True is not supported with a learnable codebook")
        if a["ema_update"] and a["learnable_codebook"]:
            raise ValueError("learnable_codebook=True requires ema_update=False (the codebook learns by gradients)")
        if a["straight_through"] and a["learnable_codebook"]:
            raise ValueError(
                "straight_through=True (Gumbel straight-through) is not supported with a learnable codebook"
            )
        if a["vq_bridge"] is not None and not a["learnable_codebook"]:
            raise ValueError("vq_bridge requires learnable_codebook=True")
        if a["directional_reparam"] and a["threshold_ema_dead_code"] == 0:
            raise ValueError("directional_reparam=True requires threshold_ema_dead_code > 0 (dead-code replacement)")
        if a["sync_update_v"] > 0 and not a["learnable_codebook"]:
            raise ValueError("sync_update_v > 0 requires learnable_codebook=True")
        if a["affine_param"] and a["use_cosine_sim"]:
            raise ValueError("affine_param=True is only supported with Euclidean distance (use_cosine_sim=False)")
        if a["in_place_codebook_optimizer"] is not None and not a["learnable_codebook"]:
            raise ValueError("in_place_codebook_optimizer requires learnable_codebook=True")

    # ------------------------------------------------------------------ public state

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

    # ------------------------------------------------------------------ layout helpers

    def _layout(self, x: Tensor) -> TokenLayout:
        expected = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
        if expected is not None and x.ndim != expected:
            names = "(b, c, h, w)" if expected == 4 else "(b, c, t, h, w)"
            raise ValueError(f"x must have shape {names} with c = {self.dim}, got {tuple(x.shape)}")
        if expected is None and x.ndim not in (2, 3):
            layout = "(b, n, dim)" if self.channel_last else "(b, dim, n)"
            raise ValueError(f"x must have shape {layout} or (b, dim) with dim = {self.dim}, got {tuple(x.shape)}")
        channel_first = expected is not None or not self.channel_last
        layout = TokenLayout.of(x, channel_first=channel_first)
        feature_axis = 1 if (channel_first and not layout.single_token) else -1
        if x.shape[feature_axis] != self.dim:
            raise ValueError(f"x must have {self.dim} features on axis {feature_axis}, got shape {tuple(x.shape)}")
        return layout

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(b, n, h * d)`` -> ``(c, N, d)``: one row block per codebook (shared heads stack their tokens)."""
        b, n, _ = x.shape
        x = x.reshape(b, n, self.heads, self.codebook_dim)
        if self.separate_codebook_per_head:
            return x.permute(2, 0, 1, 3).reshape(self.heads, b * n, self.codebook_dim)
        return x.reshape(1, b * n * self.heads, self.codebook_dim)

    def _merge_heads(self, t: Tensor, b: int, n: int) -> Tensor:
        """Inverse of :meth:`_split_heads` for ``(c, N, *tail)`` -> ``(b, n, h, *tail)``."""
        tail = t.shape[2:]
        if self.separate_codebook_per_head:
            return t.reshape(self.heads, b, n, *tail).movedim(0, 2)
        return t.reshape(b, n, self.heads, *tail)

    def _token_valid(self, mask: Tensor | None, b: int, n: int) -> Tensor | None:
        """``(b, n)`` mask -> ``(c, N)`` in the row order of :meth:`_split_heads`."""
        if mask is None:
            return None
        per_head = mask.unsqueeze(-1).expand(b, n, self.heads)
        if self.separate_codebook_per_head:
            return per_head.permute(2, 0, 1).reshape(self.heads, b * n)
        return per_head.reshape(1, b * n * self.heads)

    def _to_codebook_space(self, tokens: Tensor) -> Tensor:
        flat = as_float32(self._split_heads(project(self.project_in, tokens)))
        return F.normalize(flat, dim=-1) if self.use_cosine_sim else flat

    def _inputs(self, x: Tensor, mask: Tensor | None, lens: Tensor | None):
        layout = self._layout(x)
        tokens = layout.to_tokens(x)
        b, n = tokens.shape[:2]
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        if lens is not None:
            mask = lens_to_mask(lens, n)
        if mask is not None:
            mask = check_mask(layout.mask_to_tokens(mask), b, n)
        return layout, tokens, mask

    # ------------------------------------------------------------------ search

    def _select_codes(self, flat: Tensor, codes: Tensor, temperature: float, topk: int | None):
        """Indices ``(c, N)`` (or ``(c, N, k)``) and, when a loss needs them, the distance logits."""
        sampling = self.training and self.stochastic_sample_codes and temperature > 0
        needs_logits = self._needs_logits()
        logits = None
        if topk is not None:
            _, indices = topk_codes(flat.detach(), codes.detach(), topk, cosine=self.use_cosine_sim)
            return indices, None
        if needs_logits:
            logits = distance_logits(flat, codes, cosine=self.use_cosine_sim)
            scores = logits.detach()
            if sampling:
                scores = scores / temperature + gumbel_noise_like(scores)
            return scores.argmax(-1), logits
        if sampling:
            return sample_codes(flat.detach(), codes.detach(), temperature, cosine=self.use_cosine_sim), None
        return nearest_codes(flat, codes, cosine=self.use_cosine_sim), None  # no_grad: nothing to detach

    def _needs_logits(self) -> bool:
        return self.training and (
            self.straight_through or self.has_codebook_diversity_loss or self._uses_ce_commitment()
        )

    def _uses_ce_commitment(self) -> bool:
        return self.has_commitment_loss and self.commitment_use_cross_entropy_loss

    # ------------------------------------------------------------------ forward

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
        quantizes to those codes, with the usual estimator, losses and statistics (used after a beam search)."""
        layout, tokens, mask = self._inputs(x, mask, lens)
        b, n = tokens.shape[:2]
        topk = self._check_topk(topk)
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        if codebook_transform_fn is not None:
            raise NotImplementedError(
                "codebook_transform_fn is used by ResidualVQ(implicit_neural_codebook=True); call that instead"
            )

        if indices is not None:
            self._check_forward_indices("indices", indices, layout, b, check_values=True)
        if forced_indices is not None:
            self._check_forward_indices("forced_indices", forced_indices, layout, b)

        flat = self._to_codebook_space(tokens)
        # codebook arithmetic in float32 whatever the autocast dtype (indices must not depend on it); the
        # projections (project_in above, project_out in _outputs) run under the caller's autocast
        with torch.autocast(flat.device.type, enabled=False):
            result = self._quantize(
                flat, x, tokens, layout, mask, indices, topk, freeze_codebook, temperature,
                ema_update_weight, accum_ema_update, ema_update, forced_indices,
            )  # fmt: skip
        if indices is not None:
            return result  # (quantized in codebook space, cross-entropy)
        out, code_indices, loss, breakdown = result
        quantized, out_indices = self._outputs(out, code_indices, x, tokens, layout, mask, b, n)
        if return_loss_breakdown:
            return quantized, out_indices, loss, breakdown
        return quantized, out_indices, loss

    def _quantize(
        self, flat, x, tokens, layout, mask, indices, topk, freeze_codebook, temperature,
        ema_update_weight, accum_ema_update, ema_update, forced_indices,
    ):  # fmt: skip
        """The pipeline on codebook-space rows ``flat`` ``(c, N, d)``: search, statistics, estimator, losses.

        Returns the quantized rows ``(c, N, d)`` (before ``project_out``), their indices, the loss and its
        breakdown; with ``indices`` given, the cross-entropy path's result."""
        b, n = tokens.shape[:2]
        token_valid = self._token_valid(mask, b, n)
        rows = detached(flat)
        valid = valid_rows(rows, token_valid)
        updates_state = self.training and not freeze_codebook
        self._prepare_codebook(rows, valid, updates_state)

        codes = self.effective_codes()
        if updates_state and not self.learnable_codebook and (self.straight_through or indices is not None):
            # the EMA step below rewrites the buffer; the Gumbel estimator and the cross-entropy path use this
            # step's codes after it (everything else uses the codes gathered before it)
            codes = codes.clone()
        if forced_indices is None:
            code_indices, logits = self._select_codes(flat, codes, temperature, topk)
        else:
            code_indices = self._indices_to_rows(forced_indices, layout, b, n).clamp(min=0)
            logits = distance_logits(flat, codes, cosine=self.use_cosine_sim) if self._needs_logits() else None
        quantize = gather_codes(codes, code_indices)

        zero = self._zero(flat)
        inplace_loss = zero
        if self.in_place_codebook_optimizer is not None and updates_state:
            inplace_loss, quantize, code_indices, codes = self._in_place_optimize(flat, quantize, valid, temperature)

        if updates_state and topk is None:
            ema_on = self.ema_update if ema_update is None else ema_update
            self._codebook.update_(
                rows,
                code_indices,
                valid,
                ema_update=ema_on,
                weight=ema_update_weight,
                accumulate=accum_ema_update,
            )

        commit_quantize = quantize if (self.learnable_codebook and not freeze_codebook) else detached(quantize)
        out = self._route_gradients(flat, quantize, commit_quantize, logits, code_indices, codes, temperature, topk)

        if indices is not None:
            return self._cross_entropy_path(flat, codes, out, indices, layout, b, n, token_valid, x.dtype)

        breakdown = self._losses(flat, commit_quantize, logits, code_indices, valid, topk, inplace_loss, zero)
        loss = self._total_loss(breakdown, topk, b, n, layout, token_valid)
        return out, code_indices, loss, breakdown

    def _check_forward_indices(
        self, name: str, indices, layout: TokenLayout, b: int, *, check_values: bool = False
    ) -> None:
        """Indices given to forward: an integer tensor shaped as forward returns indices for this input, with
        values in ``[0, codebook_size)`` or -1 (ignored, as at masked positions). The value check reads one
        value on the host (skipped while compiling)."""
        check_indices(name, indices)
        expected = (b, *layout.spatial) + ((self.heads,) if self.heads > 1 else ())
        if tuple(indices.shape) != expected:
            raise ValueError(
                f"{name} must have the shape of the indices forward returns for this input, {expected}, "
                f"got {tuple(indices.shape)}"
            )
        if check_values and not torch.compiler.is_compiling():
            if ((indices < -1) | (indices >= self.codebook_size)).any():
                raise ValueError(
                    f"{name} must lie in [0, codebook_size) = [0, {self.codebook_size}) (or be -1 to be ignored), "
                    f"got values from {indices.min().item()} to {indices.max().item()}"
                )

    def _check_topk(self, topk):
        if topk is None:
            return None
        topk = min(check_int("topk", topk, minimum=1), self.codebook_size)
        if self.heads != 1:
            raise ValueError("topk is only supported with heads=1")
        if self.training and (self.commitment_use_cross_entropy_loss or self.in_place_codebook_optimizer):
            raise ValueError("topk is not supported in training with a cross-entropy commitment or in-place optimizer")
        return topk

    def _zero(self, like: Tensor) -> Tensor:
        return torch.zeros((), device=like.device, dtype=torch.float32)

    def _prepare_codebook(self, flat: Tensor, valid: Tensor, updates_state: bool) -> None:
        """k-means initialisation and affine statistics: training only (eval never changes state)."""
        if not updates_state:
            return
        cb = self._codebook
        cb.sync_state_once_()
        if cb.needs_kmeans_init():
            cb.kmeans_init_(flat, valid)
        if cb.affine_param:
            cb.update_affine_statistics_(flat, valid)

    def _in_place_optimize(self, flat: Tensor, quantize: Tensor, valid: Tensor, temperature: float):
        """One optimiser step on the codebook inside forward (vqtorch's alternating update), then search again.

        Rows that are masked or not finite give no gradient (they are zeroed before the squared error, so no
        ``NaN * 0`` reaches the codes); when no rank has a valid row the codes are restored after the step,
        so an optimiser with momentum or weight decay cannot move them on a batch with nothing to learn from.
        """
        loss = losses.commitment_loss(flat.detach(), quantize, valid)
        loss.backward()
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer_if_rows(valid.sum())
        codes = self.effective_codes()
        code_indices, _ = self._select_codes(flat, codes, temperature, None)
        return loss.detach(), gather_codes(codes, code_indices), code_indices, codes

    def _route_gradients(self, flat, quantize, commit_quantize, logits, code_indices, codes, temperature, topk):
        if not self.training:
            return quantize
        out = detached(quantize) if not self.learnable_codebook else quantize
        if self.route_gradients_to_input and flat.requires_grad:
            x = flat.unsqueeze(2).expand_as(quantize) if topk is not None else flat
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

    def _losses(self, flat, commit_quantize, logits, code_indices, valid, topk, inplace_loss, zero):
        commitment = diversity = orthogonal = zero
        if topk is not None:
            x = flat.unsqueeze(2)
            commitment = (x - commit_quantize).pow(2).mean(-1)  # (c, N, k) per-token losses
        elif self.training and self.has_commitment_loss:
            if self.commitment_use_cross_entropy_loss:
                target = torch.where(valid, code_indices, torch.full_like(code_indices, -1))
                commitment = losses.cross_entropy_to_codes(logits, target)
            else:
                commitment = losses.commitment_loss(flat, commit_quantize, valid)
        if self.training and self.has_codebook_diversity_loss:
            diversity = losses.codebook_diversity_loss(logits, self.codebook_diversity_temperature, valid)
        if self.training and self.has_codebook_orthogonal_loss:
            orthogonal = self._orthogonal_loss(code_indices, valid)
        return LossBreakdown(commitment, diversity, orthogonal, inplace_loss)

    def _orthogonal_loss(self, code_indices: Tensor, valid: Tensor) -> Tensor:
        """Orthogonal regulariser over all codes, or over those used in this batch, optionally on a random
        subset of at most ``orthogonal_reg_max_codes`` (fixed shapes: no ``unique``, no host sync)."""
        codes = self._codebook.embed
        c, num_codes, _ = codes.shape
        used = torch.ones(c, num_codes, dtype=torch.bool, device=codes.device)
        if self.orthogonal_reg_active_codes_only:
            counts = torch.zeros(c, num_codes, device=codes.device)
            counts.scatter_add_(1, code_indices.reshape(c, -1), valid.reshape(c, -1).float())
            used = counts > 0
        if self.orthogonal_reg_max_codes is not None and num_codes > self.orthogonal_reg_max_codes:
            keys = torch.rand(c, num_codes, device=codes.device).masked_fill(~used, 2.0)
            chosen = keys.argsort(dim=-1)[:, : self.orthogonal_reg_max_codes]
            codes = codes.gather(1, chosen.unsqueeze(-1).expand(-1, -1, codes.shape[-1]))
            used = used.gather(1, chosen)
        return losses.orthogonal_loss(codes, used)

    def _total_loss(self, breakdown: LossBreakdown, topk, b: int, n: int, layout: TokenLayout, token_valid):
        total = breakdown.commitment * self.commitment_weight if self.has_commitment_loss else breakdown.commitment
        if topk is not None:
            total = self._merge_heads(total, b, n)[:, :, 0]  # (b, n, k)
            if token_valid is not None:
                total = total * token_valid.reshape(b, n, 1).to(total.dtype)
            total = layout.indices_from_tokens(total)
        if self.training and self.has_codebook_diversity_loss:
            total = total + breakdown.codebook_diversity * self.codebook_diversity_loss_weight
        if self.training and self.has_codebook_orthogonal_loss:
            total = total + breakdown.orthogonal_reg * self.orthogonal_reg_weight
        return total

    def _outputs(self, out, code_indices, x, tokens, layout, mask, b, n):
        """Merge heads, project out, fill masked positions and restore the input layout."""
        dtype = x.dtype
        if code_indices.ndim == 3:  # top-k: (c, N, k) -> (b, n, k, d)
            q = self._merge_heads(out, b, n)[:, :, 0]
            idx = self._merge_heads(code_indices, b, n)[:, :, 0]
        else:
            q = self._merge_heads(out, b, n).flatten(2)
            idx = self._merge_heads(code_indices, b, n)
            idx = idx[..., 0] if self.heads == 1 else idx
        q = as_dtype(self._project_out(as_dtype(q, dtype)), dtype)
        if mask is not None:
            fill = torch.zeros_like(tokens) if self.return_zeros_for_masked_padding else tokens
            if q.ndim == 4:
                fill = fill.unsqueeze(2)
            expand = (...,) + (None,) * (q.ndim - 2)
            q = torch.where(mask[expand], q, fill)
            idx = torch.where(mask[(...,) + (None,) * (idx.ndim - 2)], idx, torch.full_like(idx, -1))
        return layout.from_tokens(q), layout.indices_from_tokens(idx)

    def _cross_entropy_path(self, flat, codes, out, indices, layout, b, n, token_valid, dtype):
        """NaturalSpeech 2: cross-entropy of the distance logits against given code indices.

        Returns the quantized tokens in codebook space (before ``project_out``, as the reference does),
        heads merged, in the input's layout, and the cross-entropy."""
        target = self._indices_to_rows(indices, layout, b, n)
        if token_valid is not None:
            target = torch.where(token_valid, target, torch.full_like(target, -1))
        logits = distance_logits(flat, codes, cosine=self.use_cosine_sim)
        ce = losses.cross_entropy_to_codes(logits, target)
        q = self._merge_heads(out, b, n).flatten(2).to(dtype)
        return layout.from_tokens(q), ce

    def _indices_to_rows(self, indices: Tensor, layout: TokenLayout, b: int, n: int) -> Tensor:
        """User indices ``(b, ...)`` / ``(b, ..., h)`` -> ``(c, N)`` rows of :meth:`_split_heads`."""
        idx = indices.reshape(b, n, self.heads).long()
        if self.separate_codebook_per_head:
            return idx.permute(2, 0, 1).reshape(self.heads, b * n)
        return idx.reshape(1, b * n * self.heads)

    # ------------------------------------------------------------------ decode and maintenance

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Codes in codebook space for indices as forward returns them; index -1 gives a zero code.

        Shape:
            - indices: ``(b, ...)`` or ``(b, ..., heads)``
            - output: ``(b, ..., heads * codebook_dim)``, channel-first (``(b, d, ...)``) when the
              quantizer takes channel-first inputs
        """
        codes = self._codes_channel_last(indices)
        return self._channel_first(codes)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for these indices (eval mode): codes projected out, in the input layout.

        Shape:
            - indices: ``(b, ...)`` or ``(b, ..., heads)``
            - output: ``(b, ..., dim)`` (channel-first for channel-first quantizers)
        """
        codes = self._codes_channel_last(indices)
        out = self._project_out(codes)
        missing = self._missing(indices)
        if missing is not None and self.return_zeros_for_masked_padding:
            out = out.masked_fill(missing.unsqueeze(-1), 0.0)
        return self._channel_first(out)

    def _project_out(self, t: Tensor) -> Tensor:
        """``project_out`` on ``(..., heads * codebook_dim)`` as one ``(M, heads * codebook_dim)`` matrix, so that
        forward and decoding run the same kernel on the same rows whatever the layout (bit-identical outputs)."""
        if not self.has_projections:
            return t
        lead = t.shape[:-1]
        return project(self.project_out, t.reshape(-1, t.shape[-1])).reshape(*lead, self.dim)

    def _missing(self, indices: Tensor) -> Tensor | None:
        if self.heads > 1:
            return (indices < 0).all(dim=-1)
        return indices < 0

    def _codes_channel_last(self, indices: Tensor) -> Tensor:
        check_indices("indices", indices, min_ndim=1 if self.heads > 1 else 0)
        heads_axis = self.heads > 1
        if heads_axis and indices.shape[-1] != self.heads:
            raise ValueError(f"indices must end with a heads axis of size {self.heads}, got {tuple(indices.shape)}")
        idx = indices.long()
        lead = idx.shape[:-1] if heads_axis else idx.shape
        idx = idx.reshape(-1, self.heads)  # (M, h)
        codes = self.effective_codes()
        if self.separate_codebook_per_head:
            rows = idx.t()  # (h, M)
        else:
            rows = idx.reshape(1, -1)
        picked = gather_codes(codes, rows.clamp(min=0))
        picked = torch.where((rows >= 0).unsqueeze(-1), picked, torch.zeros_like(picked))
        if self.separate_codebook_per_head:
            picked = picked.transpose(0, 1)  # (M, h, d)
        return picked.reshape(*lead, self.heads * self.codebook_dim)

    def _channel_first(self, t: Tensor) -> Tensor:
        if self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last:
            if t.ndim >= 3:
                return t.movedim(-1, 1)
        return t

    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimiser (gradients averaged over ranks when distributed)."""
        if self.in_place_codebook_optimizer is None:
            return
        if distributed.should_sync(self._codebook.sync_codebook):
            for param in self._codebook.parameters():
                if param.grad is not None:
                    distributed.all_reduce_sum_(param.grad).div_(distributed.world_size())
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    def update_in_place_optimizer_if_rows(self, num_valid_rows: Tensor) -> None:
        """:meth:`update_in_place_optimizer`, then the codes it moved are restored when no rank had a valid row
        (``num_valid_rows`` summed over ranks is 0), so that an optimiser with momentum or weight decay cannot
        move them on a batch with nothing to learn from. No host synchronisation."""
        if self.in_place_codebook_optimizer is None:
            return
        params = [p for p in self._codebook.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        self.update_in_place_optimizer()
        total = distributed.all_reduce_sum_(num_valid_rows.detach().float().clone(), sync=self._codebook.sync_codebook)
        with torch.no_grad():
            for param, old in zip(params, before):
                param.copy_(torch.where(total > 0, param, old))

    def _flat_from_input(self, x: Tensor) -> tuple[Tensor, TokenLayout, int, int]:
        layout = self._layout(x)
        tokens = layout.to_tokens(x)
        return self._to_codebook_space(tokens), layout, tokens.shape[0], tokens.shape[1]

    @torch.no_grad()
    def expire_codes_(self, x: Tensor) -> None:
        """Replace dead codes by vectors of ``x`` (given in the input layout)."""
        flat, *_ = self._flat_from_input(x)
        self._codebook.expire_codes_(flat, valid_rows(flat, None))

    @torch.no_grad()
    def update_indices(self, x: Tensor, indices: Tensor, mask: Tensor | None = None) -> None:
        """Update the codebook statistics with given indices (e.g. chosen by a beam search).

        Shape:
            - x: as forward's input; indices: as forward returns them; mask: ``(b, n)``
        """
        flat, layout, b, n = self._flat_from_input(x)
        self._check_forward_indices("indices", indices, layout, b)
        rows = self._indices_to_rows(indices, layout, b, n)
        token_valid = self._token_valid(check_mask(mask, b, n) if mask is not None else None, b, n)
        valid = valid_rows(flat, token_valid) & (rows >= 0)
        self._codebook.update_(flat, rows, valid)

    update_ema_indices = update_indices
