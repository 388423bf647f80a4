"""Codebook state: EMA statistics, k-means initialisation, dead-code expiry and affine reparameterisation.

The module keeps vector-quantize-pytorch's buffer names (``initted``, ``cluster_size``, ``embed_avg``, ``embed`` and,
with ``affine_param``, the codebook and batch moments) so that its checkpoints load with ``strict=True``.
It holds state and updates it; the search, estimators and losses live in their own modules.

EMA update (van den Oord et al. 2017, appendix; SoundStream), per codebook ``c`` and code ``k``::

    n_k   <- decay * n_k   + (1 - decay) * #{i : z_i = k}
    m_k   <- decay * m_k   + (1 - decay) * sum_{i : z_i = k} x_i
    e_k    = m_k / ((n_k + eps) / (sum_j n_j + K * eps) * sum_j n_j)      (Laplace-smoothed counts)

Rows that are masked out or hold a non-finite value never enter a statistic; a batch without a single valid
row leaves every statistic and code untouched (no decay either). None of this reads a tensor on the host
(except once: whether k-means initialisation succeeded).

Distributed training (``torch.distributed``, decided at every call, so a model built before
``init_process_group`` synchronises too; ``sync_codebook=False`` turns it off):

- the first training step broadcasts rank 0's codebook state, so ranks start equal however they were seeded;
- the per-code counts and sums of every step are all-reduced, so every rank applies the EMA update of the
  concatenated batch;
- k-means (with ``sync_kmeans``) draws its initial means among the rows of every rank and all-reduces its
  statistics;
- dead codes are replaced by rows chosen among the rows of every rank, with a seed shared by the ranks.

Random choices are made by sorting per-row keys computed from a shared seed and each row's position in the
concatenated batch (core/distributed.py), so every rank makes the same choice, equal to the one a single
process makes on the concatenated batch with the same seed (when every rank passes as many rows). A rank
without a valid row still takes part in every collective, so it never blocks the others.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .kmeans import cluster_statistics, kmeans, random_valid_rows
from .tensors import flush_subnormal_


def laplace_smoothed(counts: Tensor, eps: float) -> Tensor:
    """``(n_k + eps) / (sum n + K eps) * sum n``: every code keeps a small positive count.

    Shape:
        - counts: ``(c, K)``
        - output: ``(c, K)``
    """
    total = counts.sum(dim=-1, keepdim=True)
    return (counts + eps) / (total + counts.shape[-1] * eps) * total


def valid_rows(rows: Tensor, mask: Tensor | None) -> Tensor:
    """Rows that may update statistics: inside the mask and entirely finite.

    Shape:
        - rows: ``(c, N, d)``, mask: ``(c, N)`` bool or None
        - output: ``(c, N)`` bool
    """
    finite = torch.isfinite(rows).all(dim=-1)
    return finite if mask is None else finite & mask


def zero_invalid(rows: Tensor, valid: Tensor) -> Tensor:
    """Replace invalid rows by zeros so that ``0 * row`` cannot produce NaN."""
    return torch.where(valid.unsqueeze(-1), rows, 0.0)


class Codebook(nn.Module):
    """``num_codebooks`` codebooks of ``codebook_size`` codes of size ``dim``, with their statistics.

    Args:
        dim: code dimension ``d``.
        codebook_size: number of codes ``K``.
        num_codebooks: number of independent codebooks ``c`` (one per head with separate codebooks).
        kmeans_init: start from zeros and initialise by k-means on the first training batch.
        kmeans_iters: k-means iterations.
        sync_kmeans: when distributed, run k-means on the batches of all ranks.
        decay: EMA decay of the counts and sums.
        eps: Laplace smoothing constant.
        threshold_ema_dead_code: codes whose EMA count falls below this are replaced by batch vectors (0: off).
        reset_cluster_size: count given to a replaced code (default: the threshold).
        learnable_codebook: the codes are an ``nn.Parameter`` trained by gradients.
        ema_update: update codes from the EMA statistics.
        manual_ema_update: track the statistics but let the caller call :meth:`update_ema`.
        use_cosine_sim: codes live on the unit sphere.
        affine_param: vqtorch's running-statistics affine reparameterisation of the codes.
        sync_codebook: all-reduce the statistics across ranks (None: whenever distributed, decided per call).

    Shape:
        - embed: ``(c, K, d)``; cluster_size: ``(c, K)``; embed_avg: ``(c, K, d)``
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_codebooks: int = 1,
        *,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        decay: float = 0.8,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0.0,
        reset_cluster_size: float | None = None,
        learnable_codebook: bool = False,
        ema_update: bool = True,
        manual_ema_update: bool = False,
        use_cosine_sim: bool = False,
        affine_param: bool = False,
        sync_affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_codebook: bool | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.sync_kmeans = sync_kmeans
        self.decay = decay
        self.eps = eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.reset_cluster_size = threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size
        self.learnable_codebook = learnable_codebook
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        self.use_cosine_sim = use_cosine_sim
        self.affine_param = affine_param
        self.sync_affine_param = sync_affine_param
        self.affine_param_batch_decay = affine_param_batch_decay
        self.affine_param_codebook_decay = affine_param_codebook_decay
        self.sync_codebook = sync_codebook

        embed = self._initial_codes()
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)

        # statistics accumulated by `accum_ema_update=True` calls, folded into the next update
        self.register_buffer("accum_cluster_size", torch.zeros(num_codebooks, codebook_size), persistent=False)
        self.register_buffer("accum_embed_sum", torch.zeros_like(embed), persistent=False)
        # whether accum_* hold batches not yet folded into the EMA (a Python flag: no device read per step)
        self.has_accumulated = False

        if affine_param:
            self.register_buffer("codebook_mean_needs_init", torch.tensor(True))
            self.register_buffer("codebook_mean", torch.zeros(num_codebooks, 1, dim))
            self.register_buffer("codebook_variance_needs_init", torch.tensor(True))
            self.register_buffer("codebook_variance", torch.ones(num_codebooks, 1, dim))
            self.register_buffer("batch_mean", torch.zeros(num_codebooks, 1, dim))
            self.register_buffer("batch_variance", torch.ones(num_codebooks, 1, dim))
            self.register_buffer("batch_stats_need_init", torch.tensor(True), persistent=False)

        self._initted_on_host: bool | None = not kmeans_init  # None: read the buffer when next needed
        self._state_synced = False  # whether rank 0's state was broadcast (at the first distributed step)

    def _initial_codes(self) -> Tensor:
        shape = (self.num_codebooks, self.codebook_size, self.dim)
        if self.kmeans_init:
            return torch.zeros(shape)
        embed = nn.init.kaiming_uniform_(torch.empty(shape))
        return F.normalize(embed, dim=-1) if self.use_cosine_sim else embed

    @property
    def has_dead_code_replacement(self) -> bool:
        return self.threshold_ema_dead_code > 0

    # ----------------------------------------------------------------- checkpoints

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        initted = state_dict.get(f"{prefix}initted")
        known = isinstance(initted, Tensor) and initted.numel() == 1 and not initted.is_meta
        self._initted_on_host = bool(initted) if known else None  # read once here, not in a forward
        if self.affine_param:
            # a checkpoint saved before the first training step may have no batch moments: they then keep
            # their "not yet initialised" values
            has_batch_stats = f"{prefix}batch_mean" in state_dict
            for name in ("batch_mean", "batch_variance"):
                state_dict.setdefault(f"{prefix}{name}", getattr(self, name).clone())
            self.batch_stats_need_init.fill_(not has_batch_stats)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------- k-means initialisation

    def needs_kmeans_init(self) -> bool:
        """Whether the next training batch must initialise the codes. Answered from a host flag, never by
        reading a tensor in a forward: the flag is set at construction, when a checkpoint is loaded and by
        each k-means initialisation (the buffer is read only when the flag is unknown, e.g. after loading a
        checkpoint onto the meta device; writes to ``initted`` by other means are not seen)."""
        if not self.kmeans_init:
            return False
        if self._initted_on_host is None:
            self._initted_on_host = bool(self.initted.item())
        return not self._initted_on_host

    @torch.no_grad()
    def kmeans_init_(self, rows: Tensor, valid: Tensor) -> None:
        """Initialise codes, counts and sums by k-means on the valid rows of ``rows`` ``(c, N, d)``.

        With ``sync_kmeans`` (and distributed), k-means runs on the rows of every rank: the initial means
        are drawn among all ranks' rows with a shared seed and the statistics are all-reduced, so every
        rank gets the codebook k-means gives on the concatenated batch. If no rank has a valid row the
        codebook stays uninitialised and the next training batch tries again. Reads one value on the host
        (whether it succeeded), once.
        """
        sync = self.sync_codebook if self.sync_kmeans else False
        means, counts = kmeans(
            zero_invalid(rows, valid),
            self.codebook_size,
            self.kmeans_iters,
            valid=valid,
            cosine=self.use_cosine_sim,
            sync=sync,
        )
        total_valid = distributed.all_reduce_sum_(valid.sum(dim=-1).float(), sync=sync)
        ok = (total_valid > 0).all()
        self.embed_avg.copy_(torch.where(ok, means * counts.unsqueeze(-1), self.embed_avg))
        self.cluster_size.copy_(torch.where(ok, counts, self.cluster_size))
        self.embed.copy_(torch.where(ok, self._ema_codes(), self.embed))
        self.initted.copy_(ok)
        fewest_rows = total_valid.min()
        self._initted_on_host, fewest_rows = bool(ok), int(fewest_rows)  # the one host read
        if self._initted_on_host and fewest_rows < self.codebook_size:
            warnings.warn(
                f"k-means initialisation of {self.codebook_size} codes got only {fewest_rows} valid rows: codes "
                "without a row of their own start empty and are left to dead-code replacement. Initialise on a "
                "batch with at least codebook_size valid vectors (or use fewer codes).",
                stacklevel=4,
            )

    # ----------------------------------------------------------------- distributed state

    @torch.no_grad()
    def sync_state_once_(self) -> None:
        """Broadcast rank 0's codes, statistics and flags, once: at the first training step that runs distributed.

        Ranks then start from the same codebook even when they were seeded differently or built before
        ``init_process_group``; the synchronised updates keep them equal afterwards. A no-op in a single
        process, with ``sync_codebook=False``, and after the first distributed call.
        """
        if self._state_synced or not distributed.should_sync(self.sync_codebook):
            return
        for tensor in list(self.parameters(recurse=False)) + list(self.buffers(recurse=False)):
            wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
            synced = distributed.broadcast_(wire.detach(), sync=self.sync_codebook)
            if synced is not tensor:
                tensor.copy_(synced)
        self._initted_on_host = bool(self.initted)
        self._state_synced = True

    # ----------------------------------------------------------------- affine reparameterisation

    def _batch_moments(self, rows: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sync = self.sync_codebook if self.sync_affine_param else False
        weights = valid.to(rows.dtype).unsqueeze(-1)
        count = distributed.all_reduce_sum_(weights.sum(dim=1, keepdim=True), sync=sync)
        mean = distributed.all_reduce_sum_((rows * weights).sum(dim=1, keepdim=True), sync=sync) / count.clamp(min=1)
        sq = ((rows - mean).pow(2) * weights).sum(dim=1, keepdim=True)
        variance = distributed.all_reduce_sum_(sq, sync=sync) / count.clamp(min=1)
        return mean, variance, count > 0

    @torch.no_grad()
    def update_affine_statistics_(self, rows: Tensor, valid: Tensor) -> None:
        """EMA of the codebook's and of the batch's per-dimension mean and variance (training only). A batch
        without a valid row (on any rank) moves neither, as it moves no other statistic."""
        mean, variance, has_rows = self._batch_moments(zero_invalid(rows, valid), valid)
        codes = self.embed.detach()
        codebook_decay, batch_decay = self.affine_param_codebook_decay, self.affine_param_batch_decay
        codebook_variance = codes.var(dim=1, unbiased=False, keepdim=True)
        self._ema_moment_(self.codebook_mean, codes.mean(dim=1, keepdim=True), codebook_decay,
                          self.codebook_mean_needs_init, has_rows)  # fmt: skip
        self._ema_moment_(self.codebook_variance, codebook_variance, codebook_decay,
                          self.codebook_variance_needs_init, has_rows)  # fmt: skip
        self._ema_moment_(self.batch_mean, mean, batch_decay, self.batch_stats_need_init, has_rows)
        self._ema_moment_(self.batch_variance, variance, batch_decay, self.batch_stats_need_init, has_rows)
        for needs_init in (self.codebook_mean_needs_init, self.codebook_variance_needs_init,
                           self.batch_stats_need_init):  # fmt: skip
            needs_init.copy_(needs_init & ~has_rows.all())

    @staticmethod
    def _ema_moment_(moment: Tensor, new: Tensor, decay: float, needs_init: Tensor, has_rows: Tensor) -> None:
        """``moment <- decay * moment + (1 - decay) * new`` (``new`` itself while ``needs_init``), where
        ``has_rows``."""
        value = torch.where(needs_init, new, moment * decay + new * (1 - decay))
        moment.copy_(torch.where(has_rows, value, moment))

    def _affine_scales(self) -> tuple[Tensor, Tensor]:
        codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
        return codebook_std, batch_std

    def affine_codes(self, codes: Tensor) -> Tensor:
        """Codes moved to the batch's moments: what the inputs are matched against."""
        codebook_std, batch_std = self._affine_scales()
        return (codes - self.codebook_mean) * (batch_std / codebook_std) + self.batch_mean

    def affine_inputs(self, rows: Tensor) -> Tensor:
        """Inputs moved to the codebook's moments: what the EMA statistics accumulate."""
        codebook_std, batch_std = self._affine_scales()
        return (rows - self.batch_mean) * (codebook_std / batch_std) + self.codebook_mean

    # ----------------------------------------------------------------- EMA statistics

    def _ema_codes(self) -> Tensor:
        codes = self.embed_avg / laplace_smoothed(self.cluster_size, self.eps).unsqueeze(-1)
        return F.normalize(codes, dim=-1) if self.use_cosine_sim else codes

    @torch.no_grad()
    def update_ema(self) -> None:
        """Set the codes to the EMA sums divided by the Laplace-smoothed EMA counts."""
        self.embed.copy_(self._ema_codes())

    def _ema_weight(self, weight, embed_sum: Tensor, counts: Tensor) -> Tensor | float:
        if weight is None:
            return 1.0
        if callable(weight):
            weight = weight(embed_sum, counts)
        weight = torch.as_tensor(weight, device=counts.device, dtype=counts.dtype)
        if weight.ndim == 1:
            weight = weight.unsqueeze(0)
        if weight.shape != counts.shape and weight.shape != (1, counts.shape[-1]):
            raise ValueError(
                f"ema_update_weight must have shape (codebook_size,) or (num_codebooks, codebook_size) = "
                f"{tuple(counts.shape)}, got {tuple(weight.shape)}"
            )
        return weight

    @torch.no_grad()
    def track_(self, rows: Tensor, indices: Tensor, valid: Tensor, weight=None, accumulate: bool = False) -> Tensor:
        """Fold one batch's per-code counts and sums into the EMA statistics.

        Returns a ``(c, 1)`` bool tensor: which codebooks saw at least one valid row (on any rank).

        Shape:
            - rows: ``(c, N, d)`` float32, indices: ``(c, N)``, valid: ``(c, N)``
        """
        counts, sums = cluster_statistics(
            zero_invalid(rows, valid), indices.clamp(min=0), valid, self.codebook_size, samples_weighted=True
        )
        if distributed.should_sync(self.sync_codebook):  # one all-reduce for counts and sums
            packed = distributed.all_reduce_sum_(torch.cat((counts.unsqueeze(-1), sums), dim=-1))
            counts, sums = packed[..., 0], packed[..., 1:]
        if accumulate:
            self.accum_cluster_size.add_(counts)
            self.accum_embed_sum.add_(sums)
            self.has_accumulated = True
            return counts.sum(dim=-1, keepdim=True) > 0

        if self.has_accumulated:  # fold the accumulated batches in (the buffers are not saved in checkpoints)
            counts = counts.add_(self.accum_cluster_size)
            sums = sums.add_(self.accum_embed_sum)
            self.accum_cluster_size.zero_()
            self.accum_embed_sum.zero_()
            self.has_accumulated = False

        has_rows = counts.sum(dim=-1, keepdim=True) > 0
        # in place, without (c, K, d) temporaries: a batch without rows gets rate 0, and lerp(a, b, 0) = a
        # exactly (b, the masked sums, is finite), so the statistics keep their values without a host sync
        rate = (1.0 - self.decay) * self._ema_weight(weight, sums, counts) * has_rows.to(counts.dtype)
        self.cluster_size.lerp_(counts, rate)
        self.embed_avg.lerp_(sums, rate.unsqueeze(-1))
        flush_subnormal_(self.cluster_size)  # an unused code's statistics would stop at a slow subnormal number
        flush_subnormal_(self.embed_avg)
        return has_rows

    # ----------------------------------------------------------------- dead codes

    @torch.no_grad()
    def expire_codes_(self, rows: Tensor, valid: Tensor | None = None, seed: Tensor | None = None) -> None:
        """Replace every code whose EMA count is below the threshold by a distinct random valid batch row.

        Dead codes are taken in index order and paired with valid rows in random order; when there are more
        dead codes than valid rows, the first ones are replaced now and the rest on later steps. Replaced
        codes get count ``reset_cluster_size``. When synchronised, the rows are drawn among the rows of every
        rank with a seed shared by the ranks, so every rank replaces the same codes by the same rows: those a
        single process picks from the concatenated batch with the same seed.

        Args:
            rows: ``(c, N, d)`` candidate rows in codebook space.
            valid: ``(c, N)`` bool, rows that may become codes (default: the finite ones).
            seed: ``()`` int64 seed; None draws one from the default generator (rank 0's when distributed).
        """
        if not self.has_dead_code_replacement:
            return
        if valid is None:
            valid = valid_rows(rows, None)
        d = rows.shape[-1]
        expired = self.cluster_size < self.threshold_ema_dead_code
        dead_rank = expired.cumsum(dim=-1) - 1  # a dead code's place among the dead codes, in index order

        rows, num_valid = random_valid_rows(rows, valid, self.codebook_size, seed, sync=self.sync_codebook)
        if self.use_cosine_sim:
            rows = F.normalize(rows, dim=-1)
        replace = expired & (dead_rank < num_valid)  # (c, K): the r-th dead code takes the r-th random row
        new_codes = rows.gather(1, dead_rank.clamp(min=0).unsqueeze(-1).expand(-1, -1, d))

        self.embed.copy_(torch.where(replace.unsqueeze(-1), new_codes, self.embed))
        self.cluster_size.masked_fill_(replace, self.reset_cluster_size)
        self.embed_avg.copy_(torch.where(replace.unsqueeze(-1), new_codes * self.reset_cluster_size, self.embed_avg))

    # ----------------------------------------------------------------- one training step

    @torch.no_grad()
    def update_(
        self,
        rows: Tensor,
        indices: Tensor,
        valid: Tensor,
        *,
        ema_update: bool | None = None,
        weight=None,
        accumulate: bool = False,
    ) -> None:
        """Statistics, codes and dead codes after one training batch (statistics, then codes, then expiry).

        Shape:
            - rows: ``(c, N, d)`` float32 codebook-space inputs, indices: ``(c, N)``, valid: ``(c, N)``
        """
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        self.sync_state_once_()
        if self.affine_param:
            rows = self.affine_inputs(rows)
        # a learnable codebook under EMA (a gradient regulariser on top) moves by the change of its EMA
        # target instead of being overwritten, so that its gradient steps are kept
        moves_by_delta = isinstance(self.embed, nn.Parameter)
        target_before = self._ema_codes() if moves_by_delta and ema_update else None

        has_rows = self.track_(rows, indices, valid, weight=weight, accumulate=accumulate)
        if accumulate:
            return
        if ema_update and not self.manual_ema_update:
            target = self._ema_codes()
            new_codes = self.embed + (target - target_before) if moves_by_delta else target
            # lerp with weight 1 is exactly new_codes and with weight 0 exactly the old codes: an in-place
            # torch.where(has_rows, new_codes, embed) without another (c, K, d) temporary
            self.embed.lerp_(new_codes, has_rows.unsqueeze(-1).to(new_codes.dtype))
        self.expire_codes_(rows, valid)

    def orthogonal_reg_codes(
        self, indices: Tensor, valid: Tensor, active_only: bool, max_codes: int | None
    ) -> tuple[Tensor, Tensor]:
        """The codes an orthogonal regulariser covers: all, or those used in this batch (``active_only``),
        optionally a random subset of at most ``max_codes`` (fixed shapes: no ``unique``, no host sync).

        Shape:
            - indices, valid: ``(c, N)``
            - output: codes ``(c, m, d)`` and which of them count ``(c, m)`` bool
        """
        codes = self.embed
        c, num_codes, _ = codes.shape
        used = torch.ones(c, num_codes, dtype=torch.bool, device=codes.device)
        if active_only:
            counts = torch.zeros(c, num_codes, device=codes.device)
            counts.scatter_add_(1, indices.reshape(c, -1), valid.reshape(c, -1).float())
            used = counts > 0
        if max_codes is not None and num_codes > max_codes:
            keys = torch.rand(c, num_codes, device=codes.device).masked_fill(~used, 2.0)
            chosen = keys.argsort(dim=-1)[:, :max_codes]
            codes = codes.gather(1, chosen.unsqueeze(-1).expand(-1, -1, codes.shape[-1]))
            used = used.gather(1, chosen)
        return codes, used
