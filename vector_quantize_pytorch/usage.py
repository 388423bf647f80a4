"""A codebook usage meter: index histograms accumulated over steps, reported as a plain dict.

Every quantizer returns integer indices; :class:`CodebookUsage` counts them per codebook (residual layer, group,
head, LFQ/FSQ codebook: whatever the indices' codebook axes say), across as many steps as you like, and reports
usage, perplexity, dead codes and entropy, summed over ranks when ``torch.distributed`` is initialised::

    usage = CodebookUsage(codebook_size=1024, codebooks=8)  # e.g. ResidualVQ(num_quantizers=8): (b, n, 8)
    for batch in loader:
        quantized, indices, loss = rvq(encoder(batch))
        usage.update(indices)                             # on the device, no host synchronisation
    writer.add_scalars("codebook", usage.report(reset=True))  # every rank calls report() when distributed

Exact counting keeps one int64 histogram of ``codebook_size`` bins per codebook. Vocabularies above
``max_bins`` (default 2^20: FSQ and LFQ can have 2^32 codes and more) are hashed into ``max_bins`` buckets, and
the report is an estimate whose error is bounded (see :class:`CodebookUsage`). Either way the memory is
``num_codebooks * min(codebook_size, max_bins)`` counters, whatever the number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .core import distributed

DEFAULT_MAX_BINS = 2**20
_MASK32 = 0xFFFFFFFF


def _bucket(indices: Tensor, bins: int) -> Tensor:
    """A fixed hash of non-negative int64 indices into ``[0, bins)`` (low and high 32-bit halves mixed)."""
    low, high = indices & _MASK32, (indices >> 32) & _MASK32
    mixed = distributed.hash32(distributed.hash32(low) ^ distributed.hash32(high + 0x9E3779B9))
    return mixed % bins


class CodebookUsage:
    """Accumulates histograms of code indices over steps; :meth:`report` turns them into numbers to log.

    Args:
        codebook_size: number of codes of each codebook: an int, or one size per codebook (anything that
            broadcasts to ``codebooks``, e.g. ResidualVQ's per-layer sizes ``(1024, 512, 256)``).
        codebooks: how many codebooks the indices hold along their codebook axes: ``()`` for one codebook
            (every index counts in it), an int for one axis (residual layers, heads, LFQ/FSQ codebooks), a
            tuple for several (GroupedResidualVQ: ``(groups, num_quantizers)``).
        codebook_axes: where those axes are in the indices (default: the last ``len(codebooks)`` axes).
            GroupedResidualVQ's indices are ``(groups, b, n, q)``: pass ``codebook_axes=(0, -1)``.
        max_bins: vocabularies larger than this are hashed into ``max_bins`` buckets (an estimate, see below).
        sync: sum the histograms of every rank in :meth:`report` (None: whenever ``torch.distributed`` is
            initialised with more than one rank). Every rank must then call :meth:`report`.
        device: where the histograms start (they follow the indices of the first :meth:`update`).

    What is counted: an index ``i`` of a codebook of ``K`` codes counts when ``0 <= i < K`` and its position is
    inside ``mask``; ``-1`` (a residual layer dropped by quantize dropout, a masked token) and out-of-range
    values are ignored.

    Report (a plain dict of Python numbers; per-codebook entries ``"<metric>/<i>"`` when there are several
    codebooks, ``i`` the codebook's position, axes joined by ``.``):

        - ``usage``: share of the codes used at least once (mean over codebooks);
        - ``perplexity``: ``2 ** entropy_bits``, the effective number of codes (mean over codebooks);
        - ``entropy_bits``: entropy of the code distribution in bits (mean over codebooks);
        - ``dead_codes``: codes never used (sum over codebooks);
        - ``tokens``: indices counted (sum over codebooks).

    Above ``max_bins`` codes (``m = max_bins`` buckets, ``n`` distinct codes used): the number of codes used
    is the linear-counting estimate ``-m ln(1 - u / m)`` from the ``u`` occupied buckets (Whang et al. 1990),
    whose relative standard error is ``sqrt(e^t - t - 1) / (t sqrt(m))`` with ``t = n / m``: under 0.1% for
    ``n <= m``, 0.7% at ``n = 8 m`` (it saturates when nearly every bucket is occupied, ``n`` of about
    ``m ln m``; it is then capped at ``m ln m`` and at the vocabulary size). The entropy is the hashed
    histogram's: never above the true entropy (merging codes only lowers it), equal to it while no two used
    codes share a bucket, and below it by at most ``log2(1 + (n - 1) / m)`` bits in expectation over the hash
    (e.g. 0.09 bits for 2^16 codes used in 2^20 buckets). :attr:`estimated` says whether this applies.

    Shape:
        - indices: any integer tensor whose ``codebook_axes`` have the sizes ``codebooks``
        - mask: bool, broadcastable to the indices' shape without the codebook axes (e.g. ``(b, n)``)
    """

    def __init__(
        self,
        codebook_size: int | Sequence[int] | Tensor,
        codebooks: int | Sequence[int] = (),
        *,
        codebook_axes: Sequence[int] | None = None,
        max_bins: int = DEFAULT_MAX_BINS,
        sync: bool | None = None,
        device: torch.device | str | None = None,
    ):
        self.codebooks = (codebooks,) if isinstance(codebooks, int) else tuple(int(c) for c in codebooks)
        if any(c < 1 for c in self.codebooks):
            raise ValueError(f"codebooks must be positive, got {codebooks}")
        axes = range(-len(self.codebooks), 0) if codebook_axes is None else codebook_axes
        self.codebook_axes = tuple(int(a) for a in axes)
        if len(self.codebook_axes) != len(self.codebooks):
            raise ValueError(f"codebook_axes {tuple(axes)} must name one axis per entry of codebooks {codebooks}")
        if max_bins < 1:
            raise ValueError(f"max_bins must be positive, got {max_bins}")
        sizes = torch.as_tensor(codebook_size, dtype=torch.int64)
        try:
            sizes = sizes.expand(self.codebooks).reshape(-1).clone()
        except RuntimeError:
            raise ValueError(
                f"codebook_size {codebook_size} does not broadcast to the codebooks {self.codebooks}"
            ) from None
        if (sizes < 1).any():
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.sizes = sizes  # (C,) codes per codebook, on the host
        largest = int(sizes.max())
        self.estimated = largest > max_bins
        self.bins = max_bins if self.estimated else largest
        self.sync = sync
        # one extra bin per codebook collects what is not counted, so update() needs no boolean indexing
        self.histogram = torch.zeros(len(sizes), self.bins + 1, dtype=torch.int64, device=device)
        self._device_sizes = sizes.to(self.histogram.device)

    @property
    def num_codebooks(self) -> int:
        return len(self.sizes)

    def reset(self) -> None:
        self.histogram.zero_()

    @torch.no_grad()
    def update(self, indices: Tensor, mask: Tensor | None = None) -> None:
        """Count ``indices`` (on their device, with no host synchronisation)."""
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        k = len(self.codebooks)
        if indices.ndim < k:
            raise ValueError(f"indices of shape {tuple(indices.shape)} have fewer axes than codebooks {self.codebooks}")
        if k:
            axes = [a % indices.ndim for a in self.codebook_axes]
            indices = indices.movedim(axes, list(range(indices.ndim - k, indices.ndim)))
        if tuple(indices.shape[indices.ndim - k :]) != self.codebooks:
            raise ValueError(
                f"indices of shape {tuple(indices.shape)} do not have {self.codebooks} codebooks along the axes "
                f"{self.codebook_axes}"
            )
        if self.histogram.device != indices.device:
            self.histogram = self.histogram.to(indices.device)
            self._device_sizes = self.sizes.to(indices.device)

        flat = indices.reshape(-1, self.num_codebooks).long()
        counted = (flat >= 0) & (flat < self._device_sizes)
        if mask is not None:
            token_shape = indices.shape[: indices.ndim - k]
            mask = torch.as_tensor(mask, dtype=torch.bool, device=indices.device).broadcast_to(token_shape)
            counted = counted & mask.reshape(-1, 1)
        bins = _bucket(flat.clamp(min=0), self.bins) if self.estimated else flat
        offsets = torch.arange(self.num_codebooks, device=flat.device) * (self.bins + 1)
        target = torch.where(counted, bins, self.bins) + offsets  # the extra bin for what is not counted
        ones = torch.ones((), dtype=torch.int64, device=flat.device).expand(target.numel())
        self.histogram.view(-1).index_add_(0, target.reshape(-1), ones)

    def counts(self) -> Tensor:
        """The histograms ``(num_codebooks, bins)`` summed over ranks when synchronised (a copy)."""
        histogram = self.histogram[:, : self.bins].clone()
        return distributed.all_reduce_sum_(histogram, sync=self.sync)

    @torch.no_grad()
    def report(self, reset: bool = False) -> dict:
        """Usage, perplexity, entropy, dead codes and tokens counted so far (see the class docstring).

        A collective when synchronised: every rank must call it. ``reset=True`` then starts a new window.
        """
        histogram = self.counts().cpu().double()
        if reset:
            self.reset()
        tokens = histogram.sum(dim=-1)
        probs = histogram / tokens.clamp(min=1).unsqueeze(-1)
        entropy = -(probs * torch.where(probs > 0, probs, 1.0).log2()).sum(dim=-1)
        occupied = (histogram > 0).sum(dim=-1).double()
        sizes = self.sizes.double()
        if self.estimated:
            m = float(self.bins)
            cap = torch.minimum(sizes, torch.tensor(m * math.log(m)))
            free = (1 - occupied / m).clamp(min=1e-300)
            used = torch.minimum(-m * free.log(), cap).where(occupied < m, cap)
            used = torch.maximum(used, occupied)  # at least as many codes as occupied buckets
        else:
            used = occupied
        per_codebook = {
            "usage": used / sizes,
            "perplexity": entropy.exp2(),
            "entropy_bits": entropy,
            "dead_codes": sizes - used,
            "tokens": tokens,
        }
        report = {
            "usage": per_codebook["usage"].mean().item(),
            "perplexity": per_codebook["perplexity"].mean().item(),
            "entropy_bits": per_codebook["entropy_bits"].mean().item(),
            "dead_codes": _number(per_codebook["dead_codes"].sum().item(), self.estimated),
            "tokens": int(per_codebook["tokens"].sum().item()),
        }
        if self.num_codebooks > 1:
            positions = torch.cartesian_prod(*(torch.arange(c) for c in self.codebooks)).reshape(self.num_codebooks, -1)
            for metric, values in per_codebook.items():
                for position, value in zip(positions.tolist(), values.tolist()):
                    name = ".".join(str(p) for p in position)
                    exact = metric == "tokens" or (metric == "dead_codes" and not self.estimated)
                    report[f"{metric}/{name}"] = int(value) if exact else value
        return report


def _number(value: float, estimated: bool) -> float | int:
    return value if estimated else int(value)
