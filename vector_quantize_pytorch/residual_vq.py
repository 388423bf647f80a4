"""ResidualVQ and GroupedResidualVQ: residual vector quantization (SoundStream, EnCodec, HiFi-Codec)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import estimators
from .core.beam import beam_search
from .core.codebook import valid_rows
from .core.layout import TokenLayout
from .core.linear import project
from .core.recompute import stateful_forward
from .core.residual import GroupedStacks, ResidualStack
from .core.search import TokenConditionedCodes, gather_codes
from .core.validate import (
    check_arguments,
    check_choice,
    check_code_indices,
    check_float,
    check_indices,
    check_input,
    check_int,
)
from .vector_quantize_pytorch import VectorQuantize


class MLP(nn.Module):
    """QINCo's implicit neural codebook (Huijben et al. 2024, arXiv 2401.14732): a code ``c`` of a layer is
    replaced by ``f([p, c])``, a residual MLP of the code and of ``p``, the sum of the earlier layers' codes
    of the same token. Each (token, code) pair is computed independently.

    Shape:
        - codes: ``(..., d)``, condition: ``(..., d)`` (broadcastable) -> ``(..., d)``
    """

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim)) for _ in range(depth)
        )
        self.l2norm_output = l2norm_output

    def forward(self, codes: Tensor, condition: Tensor) -> Tensor:
        codes, condition = torch.broadcast_tensors(codes, condition)
        h = self.proj_in(torch.cat((condition, codes), dim=-1))
        for layer in self.layers:
            h = layer(h) + h
        return F.normalize(h, dim=-1) if self.l2norm_output else h


def _codebook_sizes(codebook_size, num_quantizers) -> tuple[int, ...]:
    if isinstance(codebook_size, (tuple, list)):
        sizes = tuple(check_int(f"codebook_size[{i}]", s, minimum=1) for i, s in enumerate(codebook_size))
        if num_quantizers is not None and len(sizes) != num_quantizers:
            raise ValueError(f"codebook_size has {len(sizes)} entries but num_quantizers is {num_quantizers}")
        return sizes
    check_int("codebook_size", codebook_size, minimum=1)
    if num_quantizers is None:
        raise ValueError("num_quantizers is required unless codebook_size is a tuple of per-layer sizes")
    return (codebook_size,) * check_int("num_quantizers", num_quantizers, minimum=1)


def _check_arguments(args: dict) -> tuple[int, ...]:
    """Check ResidualVQ's own arguments; returns the per-layer codebook sizes."""
    check_arguments(args, int={"dim": 1}, optional_int={"codebook_dim": 1}, float={"quant_grad_frac": (0.0, 1.0)},
                    bool=("shared_codebook", "diveq", "accept_image_fmap", "implicit_neural_codebook"))  # fmt: skip
    if check_int("heads", args["heads"]) != 1:
        raise ValueError(
            f"heads must be 1 for ResidualVQ (use GroupedResidualVQ to split features), got {args['heads']}"
        )
    sizes = _codebook_sizes(args["codebook_size"], args["num_quantizers"])
    mlp_kwargs = args["mlp_kwargs"]
    if mlp_kwargs is not None and not isinstance(mlp_kwargs, Mapping):
        raise TypeError(f"mlp_kwargs must be a dict of MLP arguments or None, got {mlp_kwargs!r}")
    if args["shared_codebook"] and len(set(sizes)) != 1:
        raise ValueError("shared_codebook=True requires the same codebook_size for every layer")
    if args["implicit_neural_codebook"] and (args["beam_size"] or args["eval_beam_size"]):
        raise ValueError("beam search is not supported with implicit_neural_codebook=True")
    for ignored in ("accept_3d_fmap", "channel_last", "heads", "separate_codebook_per_head"):
        if ignored in args["vq_kwargs"]:
            raise ValueError(f"{ignored} is not supported by ResidualVQ layers")
    return sizes


class ResidualVQ(ResidualStack):
    """Residual vector quantization (Zeghidour et al. 2021, SoundStream, Algorithm 1).

    Each of ``num_quantizers`` VectorQuantize layers quantizes what the previous layers left over; the output
    is the sum of their codes. Projections to ``codebook_dim`` happen once, around the whole stack.

    Args:
        dim: input feature size.
        num_quantizers: depth ``q`` (may be omitted when ``codebook_size`` is a tuple of per-layer sizes).
        codebook_size: codes per layer, an int or a tuple (e.g. ``(5, 128, 256)``).
        codebook_dim: code size; Linear projections are added when it differs from ``dim``.
        shared_codebook: every layer uses layer 0's codebook (RQ-VAE); its EMA and dead codes are updated
            once per step from all layers' inputs.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: train with a random
            number of layers (one cutoff per batch, the same on every rank). ``quantize_dropout_per_sample``
            (ours) draws a cutoff per sample, as DAC does.
        accept_image_fmap: inputs are ``(b, c, h, w)``.
        heads: must be 1 (accepted for compatibility; GroupedResidualVQ splits features).
        return_zeros_for_masked_padding: masked positions output zeros (else their input).
        implicit_neural_codebook, mlp_kwargs: QINCo codebooks for layers after the first.
        beam_score: how a beam ranks partial paths: ``"final"`` (the default unless per-layer weights are given)
            by the squared error of the reconstruction so far, as faiss does; ``"sum"`` (the default when weights
            are given) by the weighted sum of every layer's error. On structured data "final" gains about twice as
            much over greedy encoding (benchmarks/README.md, "Beam search").
        beam_size, eval_beam_size, beam_score_quantizer_weights: beam search over the layers' choices, in
            training and in eval (a greedily trained model can be encoded with a beam). A path scores the
            weighted sum of its per-layer squared errors. In training the beam stops at the
            quantize-dropout cutoff, and a step that k-means-initialises the codebooks is greedy.
        quant_grad_frac: fraction of the gradient that flows through ``residual -= quantized``.
        diveq: DiVeQ on the summed output.
        **vq_kwargs: passed to every VectorQuantize layer (decay, kmeans_init, rotation_trick, ...).

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(b, n, q)`` int64, losses ``(q,)``
        - ``accept_image_fmap``: ``(b, dim, h, w)`` -> ``(b, dim, h, w)``, ``(b, h, w, q)``
        - ``return_all_codes``: a 4th output, codes ``(q, b, n, codebook_dim)``

    Example::

        >>> rvq = ResidualVQ(dim=256, codebook_size=1024, num_quantizers=8)
        >>> quantized, indices, losses = rvq(torch.randn(1, 1024, 256))
        >>> indices.shape, losses.shape
        (torch.Size([1, 1024, 8]), torch.Size([8]))
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size: int | tuple[int, ...],
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        diveq: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: dict | None = None,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights: list[float] | None = None,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        quantize_dropout_per_sample: bool = False,
        beam_score: str | None = None,
        **vq_kwargs,
    ):
        super().__init__()
        sizes = _check_arguments(dict(locals()))
        codebook_dim = dim if codebook_dim is None else codebook_dim
        self._init_dropout(quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of,
                           quantize_dropout_per_sample, num_quantizers=len(sizes))  # fmt: skip
        self._check_beam(beam_size, eval_beam_size, beam_score_quantizer_weights, len(sizes))

        self.dim = dim
        self.codebook_dim = codebook_dim
        self.codebook_sizes = sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.accept_image_fmap = accept_image_fmap
        self.shared_codebook = shared_codebook
        self.diveq = diveq
        self.implicit_neural_codebook = implicit_neural_codebook
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.quant_grad_frac = 1.0 if diveq else quant_grad_frac
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        if beam_score is None:
            beam_score = "sum" if beam_score_quantizer_weights is not None else "final"
        self.beam_score = check_choice("beam_score", beam_score, {"final", "sum"})
        weights = beam_score_quantizer_weights or [1.0] * len(sizes)
        self.register_buffer("beam_score_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()

        vq_kwargs["return_zeros_for_masked_padding"] = return_zeros_for_masked_padding
        if implicit_neural_codebook:
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        if shared_codebook:
            vq_kwargs.update(manual_ema_update=True, manual_in_place_optimizer_update=True)
        if diveq:
            vq_kwargs.update(
                ema_update=False, learnable_codebook=True, route_gradients_to_input=False, commitment_weight=0.0
            )
        self.layers = nn.ModuleList(
            VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim, **vq_kwargs)
            for size in sizes
        )
        if shared_codebook:
            for layer in self.layers[1:]:
                layer.share_codebook(self.layers[0])
        self.vq_is_ema_updating = self.layers[0].ema_update

        mlp_kwargs = dict(mlp_kwargs or {})
        mlp_kwargs.setdefault("l2norm_output", self.layers[0].use_cosine_sim)
        self.mlps = (
            nn.ModuleList(MLP(codebook_dim, **mlp_kwargs) for _ in range(len(sizes) - 1))
            if implicit_neural_codebook
            else None
        )

    @staticmethod
    def _check_beam(beam_size, eval_beam_size, weights, num_layers) -> None:
        if beam_size is not None:
            check_int("beam_size", beam_size, minimum=1)
        if eval_beam_size is not None:
            check_int("eval_beam_size", eval_beam_size, minimum=1)
        if weights is None:
            return
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise TypeError(f"beam_score_quantizer_weights must be a sequence of {num_layers} numbers, got {weights!r}")
        if len(weights) != num_layers:
            raise ValueError(f"beam_score_quantizer_weights must have {num_layers} entries, got {len(weights)}")
        for i, weight in enumerate(weights):
            check_float(f"beam_score_quantizer_weights[{i}]", float(weight) if isinstance(weight, Tensor) else weight)

    # ------------------------------------------------------------------ public state

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        """``(q, K, d)``, or a tuple of ``(K_i, d)`` when the layers' sizes differ."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    # ------------------------------------------------------------------ layers

    def _quantize_layer(self, index, residual, mask, *, previous, forced=None, **kwargs):
        transform = None
        if self.implicit_neural_codebook and index > 0:
            transform = TokenConditionedCodes(self.mlps[index - 1], previous.detach().float())
        forced = forced[..., index] if forced is not None else None
        return self.layers[index](residual, mask=mask, forced_indices=forced, codebook_transform_fn=transform, **kwargs)

    def _layer_codes(self, index, indices, previous) -> Tensor:
        base = self.layers[index].effective_codes()
        codes = gather_codes(base, indices.unsqueeze(0))[0]
        if self.implicit_neural_codebook and index > 0:
            codes = self.mlps[index - 1](codes, previous)
        return codes

    # ------------------------------------------------------------------ beam search

    @torch.no_grad()
    def _beam_search(self, h: Tensor, beam: int, cutoffs: Tensor | None = None) -> Tensor:
        """Indices ``(b, n, q)``: the path with the best beam score (``beam_score``), keeping ``beam`` candidates
        per token (:func:`~vector_quantize_pytorch.core.beam.beam_search`). With quantize dropout ``cutoffs``
        (``()`` or ``(b,)``), a token's path ends at its last kept layer (later entries are 0)."""
        b, n, d = h.shape
        stops = None if cutoffs is None else cutoffs.expand(b).long().unsqueeze(-1).expand(b, n).reshape(-1)
        codes = [layer.effective_codes()[0] for layer in self.layers]
        cosine = [layer.use_cosine_sim for layer in self.layers]
        with torch.autocast(h.device.type, enabled=False):  # distances in float32 under autocast too
            indices = beam_search(h.reshape(-1, d).float(), codes, beam, stops=stops, cosine=cosine,
                                  score=self.beam_score, weights=self.beam_score_weights)  # fmt: skip
        return indices.reshape(b, n, self.num_quantizers)

    # ------------------------------------------------------------------ forward

    def _tokens(self, x: Tensor, mask: Tensor | None):
        fmap = self.accept_image_fmap
        shapes = "(b, dim, h, w)" if fmap else "(b, n, dim)"
        return self._input_tokens(
            x, fmap, mask, ndim=4 if fmap else 3, shapes=shapes, layout_hint={4: "accept_image_fmap=True"}
        )

    @stateful_forward  # activation checkpointing: the recompute replays this call's state (core/recompute.py)
    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        indices: Tensor | list[Tensor] | None = None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        layout, tokens, mask = self._tokens(x, mask)
        if beam_size is not None:
            check_int("beam_size", beam_size, minimum=1)
        h = project(self.project_in, tokens).float()  # residuals in float32 whatever the input dtype; output cast back
        layer_kwargs = dict(sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook)

        if indices is not None:
            return self._cross_entropy_forward(h, indices, layout, tokens, mask, **layer_kwargs)

        cutoffs = None
        if self.quantize_dropout_active():
            cutoffs = self._dropout_plan(h.shape[0], h.device, rand_quantize_dropout_fixed_seed)
        forced = None
        if self._uses_beam(beam_size, freeze_codebook):
            forced = self._beam_search(h, self._beam_width(beam_size), cutoffs)

        quantized, all_indices, losses, residuals = self._residual_loop(
            h, mask, cutoffs, self.quant_grad_frac, forced=forced, **layer_kwargs
        )
        if self.training and self.shared_codebook and not freeze_codebook:
            self._maintain_shared_codebook(residuals)
        if self.diveq and self.training:
            quantized = estimators.directional_reparam(h, quantized)

        out = self._output(quantized, tokens, mask, layout)
        return self._forward_result(out, layout, all_indices, losses, return_all_codes)

    def _beam_width(self, beam_size: int | None) -> int:
        beam = beam_size if beam_size is not None else (self.beam_size if self.training else self.eval_beam_size)
        return 1 if beam is None else beam

    def _uses_beam(self, beam_size: int | None, freeze_codebook: bool) -> bool:
        if self._beam_width(beam_size) <= 1:
            return False
        if self.implicit_neural_codebook:
            raise ValueError("beam_size > 1 is not supported with implicit_neural_codebook=True")
        # a k-means initialisation still to come: the codebooks are zeros, so this step is greedy
        pending = self.training and not freeze_codebook
        return not (pending and any(layer.needs_kmeans_init() for layer in self.layers))

    def _output(self, quantized: Tensor, tokens: Tensor, mask: Tensor | None, layout: TokenLayout) -> Tensor:
        out = project(self.project_out, quantized).to(tokens.dtype)
        if mask is not None:
            fill = torch.zeros_like(out) if self.return_zeros_for_masked_padding else tokens
            out = torch.where(mask.unsqueeze(-1), out, fill)
        return layout.from_tokens(out)

    @torch.no_grad()
    def _maintain_shared_codebook(self, residuals: list[tuple[Tensor, Tensor | None]]) -> None:
        """Shared codebook: one EMA write and one dead-code pass per step, over every layer's valid inputs
        (masked and dropped tokens never become codes).

        The candidate rows are token-major (each token's layer inputs together), so that the rows of every rank
        concatenated in rank order are the rows of the concatenated batch, and dead codes are replaced as one
        process replaces them.
        """
        first = self.layers[0]
        inputs = torch.stack([residual.detach() for residual, _ in residuals], dim=2)  # (b, n, q, d)
        b, n, q, d = inputs.shape
        rows = first.to_codebook_space(inputs.reshape(b, n * q, d))  # (1, b * n * q, d)
        masks = [mask for _, mask in residuals]
        mask = None
        if any(m is not None for m in masks):
            everywhere = torch.ones(b, n, dtype=torch.bool, device=inputs.device)
            mask = torch.stack([everywhere if m is None else m for m in masks], dim=2).reshape(1, -1)
        first.maintain_codebook_(rows, valid_rows(rows, mask), apply_ema=self.vq_is_ema_updating)

    def _cross_entropy_forward(self, h, indices, layout, tokens, mask, **layer_kwargs):
        """NaturalSpeech 2: sum over layers of the cross-entropy of each layer's distance logits against the
        given codes, with the residual updated by those codes."""
        if isinstance(indices, (list, tuple)):
            indices = torch.stack(list(indices), dim=-1)
        check_indices("indices", indices)
        expected = (h.shape[0], *layout.spatial, self.num_quantizers)
        if tuple(indices.shape) != expected:
            raise ValueError(
                f"indices must have shape (b, ..., num_quantizers) = {expected}, got {tuple(indices.shape)}"
            )
        indices = layout.indices_to_tokens(indices, tail_dims=1)
        # no -1 (a dropped layer has no target): use indices from eval mode
        indices = check_code_indices("indices", indices, self.codebook_sizes).long()
        residual, quantized_out, ce_total = h, torch.zeros_like(h), 0.0
        for index, layer in enumerate(self.layers):
            # the given codes, looked up before the layer's training step can move its codebook
            codes = self._layer_codes(index, indices[..., index], quantized_out).to(h.dtype)
            quantized, ce = layer(residual, indices=indices[..., index], mask=mask, **layer_kwargs)
            quantized = estimators.attach_gradient(codes, quantized) if self.training else codes
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            ce_total = ce_total + ce
        return self._output(quantized_out, tokens, mask, layout), ce_total

    # ------------------------------------------------------------------ decoding

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward outputs for these indices in eval mode.

        Shape:
            - indices: ``(b, n, q')`` (``(b, h, w, q')`` for image maps)
            - output: ``(b, n, dim)`` (``(b, dim, h, w)``)
        """
        out = self._decode_indices(indices, channel_first=False)
        if self.return_zeros_for_masked_padding:  # masked tokens (every index -1): zeros, not project_out's bias
            out = out.masked_fill((indices < 0).all(dim=-1, keepdim=True), 0.0)
        if self.accept_image_fmap:
            out = out.movedim(-1, 1)
        return out


class GroupedResidualVQ(GroupedStacks):
    """Grouped residual VQ (Yang et al. 2023, HiFi-Codec): the features are split into ``groups`` chunks,
    each quantized by its own :class:`ResidualVQ`.

    Args:
        dim: input feature size (a multiple of ``groups``).
        groups: number of feature chunks.
        accept_image_fmap: inputs are ``(b, c, h, w)``.
        **kwargs: passed to every group's :class:`ResidualVQ`.

    Shape:
        - input ``(b, n, dim)`` -> quantized ``(b, n, dim)``, indices ``(groups, b, n, q)``, losses ``(groups, q)``
        - ``return_all_codes``: codes ``(groups, q, b, n, dim // groups)``

    Example::

        >>> grvq = GroupedResidualVQ(dim=256, codebook_size=1024, num_quantizers=8, groups=2)
        >>> quantized, indices, losses = grvq(torch.randn(1, 1024, 256))
        >>> indices.shape, losses.shape
        (torch.Size([2, 1, 1024, 8]), torch.Size([2, 8]))
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        self._init_groups(dim, groups, accept_image_fmap)
        self.rvqs = nn.ModuleList(
            ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs) for _ in range(groups)
        )

    def forward(
        self,
        x: Tensor,
        indices=None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool = False,
        mask: Tensor | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        ndim = 4 if self.accept_image_fmap else 3
        check_input("x", x, min_ndim=ndim, max_ndim=ndim)  # before the split reads the feature axis
        return self._grouped_forward(
            x,
            indices,
            return_all_codes=return_all_codes,
            sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook,
            mask=mask,
            rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
        )
