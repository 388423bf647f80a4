"""RandomProjectionQuantizer: BEST-RQ targets from a frozen random projection and a frozen random codebook."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import distributed, losses
from .core.search import distance_logits, nearest_codes
from .core.validate import check_bool, check_code_indices, check_feature_size, check_indices, check_input, check_int
from .vector_quantize_pytorch import VectorQuantize


class RandomProjectionQuantizer(nn.Module):
    r"""Random-projection quantizer of BEST-RQ (Chiu et al. 2022, "Self-supervised Learning with
    Random-projection Quantizer for Speech Recognition", arXiv 2202.01855).

    Turns input frames into discrete targets for masked prediction. Nothing in it is trained: the frames
    are normalised to zero mean and unit variance (LayerNorm without affine, section 3 of the paper),
    projected by a fixed Xavier-normal matrix per codebook, and each projection is matched to its nearest
    code, by cosine similarity, in a fixed random codebook::

        k_h = argmax_k  cos(P_h(x), e_{h,k})

    The codebooks live in an inner :class:`VectorQuantize` (``vq``) built as follows:
    ``dim = codebook_dim * num_codebooks``, ``heads = num_codebooks``, one cosine codebook per head and no
    ``codebook_dim``. With more than one codebook that inner quantizer therefore carries a random Linear
    ``project_in`` from ``codebook_dim * h`` to ``codebook_dim * h * h`` features (and an unused
    ``project_out``) and ``h * codebook_dim``-wide codes; that structure is what checkpoints hold, so it is
    kept. All of it is frozen: the codebook is never
    updated (no EMA, k-means or dead-code replacement) in training or eval mode, and training mode gives
    the same indices as eval mode (the module's mode is never changed behind the caller's back).

    When the inner quantizer has its Linear ``project_in``, the three linear maps and the codebook are
    folded into one ``(h, K, dim)`` score matrix (recomputed only when one of them changes), so a call
    costs ``N * dim * h * K`` multiply-adds instead of ``N * (h * codebook_dim)^2 * h`` through the inner
    quantizer's projection.

    Under ``torch.distributed`` every rank must hold the same projections and codebooks. The first forward
    in a process group broadcasts them from rank 0 (so every rank must make that first call); call
    :meth:`sync_buffers_` to do it at another time.

    Args:
        dim: input feature size.
        codebook_size: codes per codebook ``K``.
        codebook_dim: size of each random projection.
        num_codebooks: number of independent projections and codebooks ``h``.
        norm: normalise the input frames first.
        **vq_kwargs: passed on to the inner :class:`VectorQuantize` (e.g. ``layernorm_after_project_in``);
            options that would update the codebook have no effect, and ``kmeans_init`` is refused.

    Shape:
        - input ``(b, n, dim)`` -> indices ``(b, n)`` int64, or ``(b, n, h)`` when ``num_codebooks > 1``
        - with ``indices`` (as returned) -> cross-entropy loss ``()`` of the cosine logits against them

    Example::

        >>> quantizer = RandomProjectionQuantizer(dim=80, codebook_dim=16, codebook_size=1024)
        >>> indices = quantizer(torch.randn(2, 100, 80))
        >>> indices.shape
        torch.Size([2, 100])
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        codebook_dim: int,
        num_codebooks: int = 1,
        norm: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("codebook_size", codebook_size, minimum=1)
        check_int("codebook_dim", codebook_dim, minimum=1)
        check_int("num_codebooks", num_codebooks, minimum=1)
        check_bool("norm", norm)
        if vq_kwargs.get("kmeans_init", False):
            raise ValueError(
                "kmeans_init=True is not supported: the random projection quantizer's codebook is random and "
                "frozen (k-means would make it depend on the first batch and differ between ranks)"
            )

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks

        rand_projs = torch.empty(num_codebooks, dim, codebook_dim)
        nn.init.xavier_normal_(rand_projs)
        self.register_buffer("rand_projs", rand_projs)

        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        self.vq = VectorQuantize(
            dim=codebook_dim * num_codebooks,
            heads=num_codebooks,
            codebook_size=codebook_size,
            use_cosine_sim=True,
            separate_codebook_per_head=True,
            **vq_kwargs,
        )
        self.vq.requires_grad_(False)

        self._synced = False
        self._folded: tuple | None = None  # (key of the source tensors, scores matrix, scores offset)
        self.register_load_state_dict_post_hook(_forget_folded_scores)

    def __getstate__(self) -> dict:
        """Pickling and deep copies leave out the folded-scores cache: it holds weak references (which cannot be
        pickled) to this module's own tensors, and is rebuilt on the next call."""
        state = self.__dict__.copy()
        state["_folded"] = None
        return state

    def forget_folded_scores(self) -> None:
        """Drop the cached folded scores (rebuilt on the next call): needed only after writing new values into
        the projections or codes in place by hand."""
        self._folded = None

    # ------------------------------------------------------------------ distributed

    @torch.no_grad()
    def sync_buffers_(self) -> None:
        """Broadcast the projections, the inner quantizer's weights and the codebooks from rank 0
        (a no-op in a single process). Every rank must call it."""
        if distributed.is_distributed():
            for tensor in self.state_dict().values():
                if torch.is_floating_point(tensor):
                    synced = distributed.broadcast_(tensor)
                    if synced is not tensor:
                        tensor.copy_(synced)
        self._synced = True
        self._folded = None  # the broadcast may have written new values in place

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, indices: Tensor | None = None) -> Tensor:
        check_input("x", x, min_ndim=3, max_ndim=3)
        check_feature_size("x", x, -1, self.dim, "(b, n, dim)")
        if not self._synced and distributed.is_distributed():
            self.sync_buffers_()
        b, n, _ = x.shape

        with torch.autocast(x.device.type, enabled=False):
            frames = self.norm(x.float()).reshape(b * n, self.dim)
            if indices is not None:
                return self._cross_entropy(frames, indices, b, n)
            with torch.no_grad():
                if self._can_fold():
                    code_indices = self._folded_nearest(frames)
                else:
                    code_indices = nearest_codes(self._head_features(frames), self._codes(), cosine=True)

        code_indices = code_indices.t().reshape(b, n, self.num_codebooks)  # (h, N) -> (b, n, h)
        return code_indices[..., 0] if self.num_codebooks == 1 else code_indices

    def _projections(self) -> Tensor:
        """``(dim, h * codebook_dim)``: the random projections side by side."""
        return self.rand_projs.float().permute(1, 0, 2).reshape(self.dim, -1)

    def _codes(self) -> Tensor:
        return self.vq.effective_codes()  # (h, K, D), unit vectors

    def _head_features(self, frames: Tensor) -> Tensor:
        """``(N, dim)`` -> ``(h, N, D)``: projected, passed through ``vq.project_in``, split by head, unit norm."""
        features = self.vq.project_in(frames @ self._projections())
        features = features.unflatten(-1, (self.num_codebooks, -1)).transpose(0, 1)
        return F.normalize(features.float(), dim=-1)

    def _cross_entropy(self, frames: Tensor, indices: Tensor, b: int, n: int) -> Tensor:
        """Cross-entropy of the cosine logits ``(h, N, K)`` against given indices (-1 ignored; any other value
        outside ``[0, codebook_size)`` raises a ``ValueError``)."""
        check_indices("indices", indices)
        expected = (b, n) if self.num_codebooks == 1 else (b, n, self.num_codebooks)
        if tuple(indices.shape) != expected:
            raise ValueError(f"indices must have shape {expected} as forward returns them, got {tuple(indices.shape)}")
        indices = check_code_indices("indices", indices, self.codebook_size, allow_dropped=True)
        target = indices.long().reshape(b * n, self.num_codebooks).t()  # (h, N)
        logits = distance_logits(self._head_features(frames), self._codes(), cosine=True)
        return losses.cross_entropy_to_codes(logits, target)

    # ------------------------------------------------------------------ folded search

    def _can_fold(self) -> bool:
        return isinstance(self.vq.project_in, nn.Linear)

    def _folded_nearest(self, frames: Tensor) -> Tensor:
        r"""Nearest codes with the linear maps folded into the codes.

        Per head ``h`` with ``y_h = W_h P^T x + b_h`` (``P`` the random projections, ``W_h, b_h`` that head's
        rows of ``project_in``), ``cos(y_h, e_k)`` and ``y_h . e_k`` have the same argmax over ``k`` (``|y_h|``
        is the same for every code and codes are unit vectors), and
        ``y_h . e_k = x . (P W_h^T e_k) + b_h . e_k = x . g_{h,k} + c_{h,k}``.
        """
        scores, offsets = self._folded_scores()
        h = self.num_codebooks
        # nearest_codes' Euclidean score is 2 x.g - s; s = -2c makes it 2 (x.g + c), which has the same argmax
        return nearest_codes(frames.unsqueeze(0).expand(h, -1, -1), scores, code_sq_norms=-2 * offsets)

    def _folded_scores(self) -> tuple[Tensor, Tensor]:
        """``g`` ``(h, K, dim)`` and ``c`` ``(h, K)``, recomputed when a source tensor was replaced or moved
        (``.to()``, a dtype conversion, reassignment), after ``load_state_dict``, :meth:`sync_buffers_` and the
        ``vq.codebook`` setter. Other in-place writes to the projections or codes (they are frozen) are not
        seen: call :meth:`forget_folded_scores` after one."""
        if torch.compiler.is_compiling():  # a traced program folds once per call; no addresses to read
            return self._fold()
        linear = self.vq.project_in
        sources = tuple(t for t in (self.rand_projs, linear.weight, linear.bias, self.vq.codebook) if t is not None)
        revision = self.vq.codebook_revision
        if self._folded is None or not _same_sources(sources, revision, self._folded[0]):
            keys = (revision, tuple((weakref.ref(t), t.data_ptr(), t.dtype, t.device) for t in sources))
            self._folded = (keys, *self._fold())
        return self._folded[1], self._folded[2]

    def _fold(self) -> tuple[Tensor, Tensor]:
        linear = self.vq.project_in
        h, codes = self.num_codebooks, self._codes()  # (h, K, D)
        weight = linear.weight.float().reshape(h, -1, linear.in_features)  # (h, D, h * codebook_dim)
        per_head_maps = weight @ self._projections().t()  # (h, D, dim)
        scores = codes @ per_head_maps  # (h, K, dim)
        if linear.bias is None:
            return scores, torch.zeros(scores.shape[:2], device=scores.device)
        offsets = (codes @ linear.bias.float().reshape(h, -1, 1)).squeeze(-1)  # (h, K)
        return scores, offsets


def _same_sources(sources: tuple[Tensor, ...], revision: int, key: tuple) -> bool:
    """Whether ``sources`` are the very tensors recorded in ``key``, at the same address, dtype and device, and
    the codebook revision is the same."""
    recorded_revision, recorded = key
    return recorded_revision == revision and all(
        ref() is t and (address, dtype, device) == (t.data_ptr(), t.dtype, t.device)
        for t, (ref, address, dtype, device) in zip(sources, recorded)
    )


def _forget_folded_scores(module: RandomProjectionQuantizer, incompatible_keys) -> None:
    module.forget_folded_scores()
