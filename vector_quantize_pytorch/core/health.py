"""Codebook health check: a training quantizer that keeps using few of its codes warns once, naming remedies.

A codebook can collapse without any error: the loss goes down, the outputs are finite, and after a few hundred
steps every token maps to a handful of codes. ``LFQ(codebook_size=1024, dim=10, entropy_loss_weight=0.02)`` in
a small MNIST autoencoder does it (a few % of its codes on the test set, ``benchmarks/README.md``, "Codebook
health"): without a bound on its input the encoder grows the latents until the entropy terms saturate. This
module turns that into one :class:`CodebookCollapseWarning` that names the remedies measured for the family.

How it works. A family's training forward calls :func:`observe` with its indices. One forward in ``stride`` (5)
has its indices counted on their device by a :class:`~vector_quantize_pytorch.usage.CodebookUsage` meter (a
few tensor operators ending in one ``index_add_``, no host synchronisation); the others cost a Python counter.
Every ``every`` training forwards the meter is read once (the only host synchronisation,
amortised over ``every`` steps) and reset; from ``warmup`` forwards on, a window whose usage is under
``threshold`` warns, once per module, and the module stops being checked. Usage is the number of codes used in
the window relative to what one forward could use, ``codes used / min(codebook_size, tokens per forward)``
(tokens per forward: the window's mean), so small batches, one batch trained on again and again, or huge
vocabularies (LFQ with 2^32 codes) do not read as collapse.

Checked families: ``LFQ``, ``SimVQ`` and ``VectorQuantize``, the ones with a collapse mechanism (an entropy
loss that saturates, a random codebook one code of which wins, dead learned codes); their stacks (``ResidualVQ``,
``ResidualLFQ``, ``ResidualSimVQ``, grouped and hierarchical ones) are checked layer by layer. FSQ and
LatentQuantize are not: their codes cannot die, and their low usage on the benchmark is the latents filling a
thin part of the grid (every level of every dimension is reached, not their combinations), which a
normalization layer before them improves.

What is not checked: modules in eval mode, forwards traced by ``torch.compile`` or ``torch.export``
(the check is plain Python state and is skipped there), and modules for which the check is off.

Turning it off:

- everywhere: ``set_health_check(False)`` (or the context manager ``health_check(False)``);
- one module: ``configure(module, enabled=False)``, which also sets its threshold, warm-up and window;
- the warning only: ``warnings.filterwarnings("ignore", category=CodebookCollapseWarning)``.

Nothing is stored in the module: no parameter, buffer or ``state_dict`` key, and outputs, indices and losses
are those of a module without the check. The per-module state lives in a weak dictionary keyed by the module.
In distributed training every rank checks its own tokens (no collective in a forward).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from .tracing import is_capturing

# Threshold from benchmarks/codebook_health.py, where a window counts 10 forwards of 6,272 tokens: the collapsed
# windows of LFQ (1024 codes) and SimVQ (4096) used 7.8% and 1.2% of their codes; the healthy window with the
# fewest codes, LFQ with 4096 codes after a normalization layer at forward 200, 23.8% (46% of its codes on the
# whole test set). A window sees fewer codes than a test set of 490,000 tokens, so the threshold is lower than
# the test-set usage that separates them.
DEFAULT_THRESHOLD = 0.15
DEFAULT_WARMUP = 200
DEFAULT_EVERY = 50
DEFAULT_STRIDE = 5  # count the indices of one training forward in 5: a fifth of the counting cost per step
MAX_BINS = 2**16  # larger vocabularies are hashed into this many buckets (512 KiB of int64 counters)

# Remedies measured with benchmarks/codebook_health.py (MNIST autoencoder, 2^8 - 2^12 codes), by family.
REMEDIES: dict[str, str] = {
    "LFQ": (
        "spherical=True (BSQ), soft_clamp_input_value=1.0, or a normalization layer before the quantizer "
        "(e.g. nn.GroupNorm(1, dim, affine=False) on a (b, dim, h, w) input); without a bound the encoder grows "
        "its latents until the entropy loss saturates"
    ),
    "SimVQ": (
        "a per-channel normalization before the quantizer (e.g. nn.GroupNorm(dim, dim, affine=False) on a "
        "(b, dim, h, w) input): un-normalized latents start in one small cluster that one code wins"
    ),
    "VectorQuantize": "kmeans_init=True and threshold_ema_dead_code=2 (dead-code expiry)",
}

_enabled = True


class CodebookCollapseWarning(UserWarning):
    """A training quantizer used few of its codes for a whole window after the warm-up."""


def set_health_check(enabled: bool) -> None:
    """Turn the codebook health check on or off for every module (it is on by default)."""
    global _enabled
    _enabled = bool(enabled)


def health_check_enabled() -> bool:
    """Whether the codebook health check is on globally."""
    return _enabled


@contextmanager
def health_check(enabled: bool) -> Iterator[None]:
    """The health check on or off inside a ``with`` block; the previous setting afterwards."""
    previous = _enabled
    set_health_check(enabled)
    try:
        yield
    finally:
        set_health_check(previous)


@dataclass
class _State:
    enabled: bool = True
    threshold: float = DEFAULT_THRESHOLD
    warmup: int = DEFAULT_WARMUP
    every: int = DEFAULT_EVERY
    stride: int = DEFAULT_STRIDE
    steps: int = 0
    counted: int = 0  # forwards counted in the current window
    done: bool = False  # warned, or turned off: never counts again
    meter: object | None = field(default=None, repr=False)
    size: int = 0
    last_report: dict | None = None


_states: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()


def configure(
    module: nn.Module,
    *,
    enabled: bool = True,
    threshold: float = DEFAULT_THRESHOLD,
    warmup: int = DEFAULT_WARMUP,
    every: int = DEFAULT_EVERY,
    stride: int = DEFAULT_STRIDE,
) -> None:
    """Set the health check of one quantizer (restarts its count).

    Args:
        module: the quantizer (e.g. an ``LFQ``); composite quantizers check their layers, so configure those.
        enabled: False turns the check off for this module.
        threshold: warn when a window's usage (codes used / min(codebook size, tokens per forward)) is below this.
        warmup: training forwards before the first window may warn.
        every: training forwards per window; the meter is read (one host synchronisation) once per window.
        stride: count the indices of one training forward in ``stride`` (at most ``every``); the others cost
            nothing but a Python counter.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if warmup < 0 or every < 1 or stride < 1:
        raise ValueError(f"need warmup >= 0, every >= 1 and stride >= 1, got {warmup}, {every} and {stride}")
    _states[module] = _State(
        enabled=enabled, threshold=threshold, warmup=warmup, every=every, stride=min(stride, every), done=not enabled
    )


def last_report(module: nn.Module) -> dict | None:
    """The usage report of ``module``'s last finished window (a ``CodebookUsage.report`` dict plus
    ``relative_usage`` and ``step``), or None before the first one."""
    state = _states.get(module)
    return None if state is None else state.last_report


def observe(module: nn.Module, indices: Tensor, codebook_size: int, mask: Tensor | None = None) -> None:
    """Count one training forward's ``indices`` (codebooks pooled) and warn once if the codebook has collapsed.

    Called by the families' forwards; does nothing unless ``module.training``. ``-1`` (masked, dropped) indices
    and tokens where ``mask`` is False are not counted. ``mask`` holds one value per token: its elements, in
    order, are the leading entries of the indices (e.g. a ``(b * n,)`` mask for ``(b, n, codebooks)`` indices).
    Only one call in ``stride`` counts (a few tensor operators, no host synchronisation); one in ``every``
    reads the meter (one host synchronisation).
    """
    if not (_enabled and module.training) or is_capturing() or indices.numel() == 0:
        return
    state = _states.get(module)
    if state is None:
        state = _states[module] = _State()
    if state.done:
        return
    state.steps += 1
    if state.steps % state.stride:
        return
    if state.meter is None:
        from ..usage import CodebookUsage  # the package's public meter; imported late (it imports core)

        state.meter = CodebookUsage(int(codebook_size), max_bins=MAX_BINS, sync=False, device=indices.device)
        state.size = int(codebook_size)
    indices = indices.detach()
    if mask is not None:
        mask = mask.detach().reshape(-1, 1)
        indices = indices.reshape(mask.shape[0], -1)
    state.meter.update(indices, mask=mask)
    state.counted += 1
    if state.steps % state.every:
        return
    report = state.meter.report(reset=True)
    counted, state.counted = state.counted, 0
    used = report["usage"] * state.size
    relative = used / max(1.0, min(state.size, report["tokens"] / max(1, counted)))
    state.last_report = {**report, "relative_usage": relative, "step": state.steps}
    if state.steps < state.warmup or report["tokens"] == 0 or relative >= state.threshold:
        return
    state.done, state.meter = True, None
    family = type(module).__name__
    remedies = REMEDIES.get(family)
    warnings.warn(
        f"{family} used {used:.0f} of its {state.size} codes in the {counted} training forwards counted of its "
        f"last {state.every} (up to forward {state.steps}; {100 * relative:.1f}% of min(codes, tokens per "
        "forward)): the codebook has collapsed. "
        + (f"Measured remedies: {remedies}. " if remedies else "")
        + "See benchmarks/README.md, 'Codebook health'. Turn this check off with "
        "vector_quantize_pytorch.core.health.set_health_check(False) or configure(module, enabled=False).",
        CodebookCollapseWarning,
        stacklevel=3,
    )
