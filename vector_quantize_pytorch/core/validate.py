"""Argument checks shared by every constructor: each raises ValueError/TypeError naming the argument,
the value and what is allowed, before any state is built."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor

from .tracing import is_capturing


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value < minimum or (min_exclusive and value == minimum)):
        op = ">" if min_exclusive else ">="
        raise ValueError(f"{name} must be {op} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (max_exclusive and value == maximum)):
        op = "<" if max_exclusive else "<="
        raise ValueError(f"{name} must be {op} {maximum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_optional_bool(name: str, value) -> bool | None:
    return None if value is None else check_bool(name, value)


def check_choice(name: str, value, allowed) -> object:
    try:
        known = value in allowed
    except TypeError:  # unhashable, e.g. a list
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {sorted(allowed, key=str)}, got {value!r}")
    return value


def check_int_sequence(name: str, value, *, minimum: int | None = None, nonempty: bool = True) -> tuple[int, ...]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    items = tuple(value)
    if nonempty and not items:
        raise ValueError(f"{name} must not be empty")
    return tuple(check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(items))


def check_input(name: str, x, *, min_ndim: int = 2, max_ndim: int | None = None) -> Tensor:
    """A forward input: a floating tensor of an allowed rank."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim or (max_ndim is not None and x.ndim > max_ndim):
        allowed = (
            f"{min_ndim}" if max_ndim == min_ndim else f"{min_ndim} to {max_ndim}" if max_ndim else f">= {min_ndim}"
        )
        raise ValueError(f"{name} must have {allowed} dimensions, got shape {tuple(x.shape)}")
    return x


def check_feature_size(name: str, x: Tensor, axis: int, expected: int, layout: str) -> None:
    if x.shape[axis] != expected:
        raise ValueError(
            f"{name} must have {expected} features on axis {axis} (expected layout {layout}), "
            f"got shape {tuple(x.shape)}"
        )


def check_indices(name: str, indices, *, min_ndim: int = 1) -> Tensor:
    """Code indices handed to a decoder: an integer tensor (floating point, complex and bool refused)."""
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise TypeError(f"{name} must be an integer torch.Tensor, got {getattr(indices, 'dtype', type(indices))}")
    if indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer torch.Tensor, got dtype {indices.dtype}")
    if indices.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(indices.shape)}")
    return indices


def check_arguments(args: dict, **kinds) -> None:
    """Check many constructor arguments from a table, each with the check of its kind.

    Args:
        args: argument name -> value (e.g. ``locals()`` of a constructor).
        **kinds: ``int={name: minimum}``, ``optional_int={name: minimum}`` (None allowed),
            ``float={name: (minimum, maximum)}`` (None: unbounded), ``bool=(names)``, ``optional_bool=(names)``.
    """
    for name, minimum in kinds.get("int", {}).items():
        check_int(name, args[name], minimum=minimum)
    for name, minimum in kinds.get("optional_int", {}).items():
        if args[name] is not None:
            check_int(name, args[name], minimum=minimum)
    for name, (minimum, maximum) in kinds.get("float", {}).items():
        check_float(name, args[name], minimum=minimum, maximum=maximum)
    for name in kinds.get("bool", ()):
        check_bool(name, args[name])
    for name in kinds.get("optional_bool", ()):
        check_optional_bool(name, args[name])


class ArgumentRuntimeError(ValueError, RuntimeError):
    """A bad argument where vector-quantize-pytorch 1.32 raised ``RuntimeError``: both ``except ValueError``
    (this library's rule for bad arguments) and ``except RuntimeError`` (code written against 1.32) catch it."""


def reads_indices_on_host(indices: Tensor) -> bool:
    """Whether :func:`check_code_indices` may read index values on the host: only in eager mode with the indices
    on the CPU, where reading them synchronises nothing. On an accelerator, under ``torch.compile``, while
    ``torch.export`` / the ONNX exporter trace, or under ``torch.jit`` tracing, it must not read (a read would be
    a host synchronisation, a graph break or a traced constant). Tests replace this function to run the
    device branch on the CPU."""
    if indices.device.type != "cpu":
        return False
    return not is_capturing()


def _allowed_range(size: int, allow_dropped: bool) -> str:
    return f"[0, codebook_size) = [0, {size})" + (" or be -1" if allow_dropped else "")


def check_code_indices(name: str, indices, codebook_size, *, allow_dropped: bool = False, min_ndim: int = 0) -> Tensor:
    """Code indices handed to a decoder (``get_codes_from_indices``, ``get_output_from_indices``,
    ``indices_to_codes``, ``forward(indices=...)``): checked once here for every family.

    Args:
        name: the argument's name, used in the errors.
        indices: an integer tensor (any integer dtype; floating point, complex and bool are refused).
        codebook_size: an int, or one int per entry of the last axis (a residual stack's layers; the last axis
            may be shorter than the sequence, as for indices of the first few layers only).
        allow_dropped: whether -1 is allowed too (a dropped residual layer or a masked position, decoded as a
            zero code), where the decoder documents it.
        min_ndim: the fewest dimensions ``indices`` may have.

    Returns:
        ``indices``, unchanged, for the caller to decode. On the sync-free branch (below) the returned tensor
        is a gather of ``indices`` that carries the check: decode the returned tensor, not the argument.

    Raises:
        TypeError: ``indices`` is not an integer tensor (``name`` and the dtype in the message).
        ValueError: a value lies outside ``[0, codebook_size)`` (and is not an allowed -1): the message names
            the argument, the offending minimum/maximum and the allowed range. Raised before any state changes.

    How the values are checked without a host synchronisation: in eager mode with the indices on the CPU
    (:func:`reads_indices_on_host`) the minimum and maximum are read on the host, which costs nothing, and a
    ``ValueError`` is raised. Otherwise (an accelerator, ``torch.compile``, ``torch.export``, ONNX) nothing is
    read: the indices are returned as ``indices.flatten().gather(0, positions)``, where ``positions`` is
    ``arange(numel)`` with every invalid index's position replaced by ``numel``, one past the end. A valid
    input gives its own values back (bit for bit, same dtype); an invalid one makes the gather kernel's own
    bounds check fail: a device-side assert on CUDA (asynchronous: it surfaces at the next synchronisation and
    ends the CUDA context, as any out-of-bounds gather does), a bounds assertion in Inductor's generated code,
    an error in ONNX Runtime's GatherElements. The decoders consume the returned tensor, so the check cannot be
    removed as dead code; it is a handful of elementwise kernels and one gather, with no data-dependent shape.
    """
    indices = check_indices(name, indices, min_ndim=min_ndim)
    if isinstance(codebook_size, int):
        sizes = None
    else:
        sizes = tuple(int(s) for s in codebook_size)
        if indices.ndim == 0 or indices.shape[-1] > len(sizes):
            raise ValueError(
                f"{name} must end with an axis of at most {len(sizes)} entries (one per layer), "
                f"got shape {tuple(indices.shape)}"
            )
        sizes = sizes[: indices.shape[-1]]
        if len(set(sizes)) <= 1:  # uniform sizes: the scalar comparison
            codebook_size, sizes = (sizes[0] if sizes else 1), None
    if indices.numel() == 0:
        return indices
    low = -1 if allow_dropped else 0
    if reads_indices_on_host(indices):
        _raise_if_out_of_range(name, indices, codebook_size, sizes, low)
        return indices
    wide = indices.long()  # comparisons against Python ints beyond the dtype's range (uint8 vs -1, int16 vs 2**20)
    if sizes is None:
        valid = (wide >= low) & (wide < codebook_size)
    else:
        upper = torch.cat([wide.new_full((1,), size) for size in sizes])  # built on the device: no host copy
        valid = (wide >= low) & (wide < upper)
    flat = indices.reshape(-1)
    positions = torch.arange(flat.numel(), device=flat.device)
    positions = torch.where(valid.reshape(-1), positions, flat.numel())
    return flat.gather(0, positions).reshape(indices.shape)


def _raise_if_out_of_range(name: str, indices: Tensor, codebook_size: int, sizes, low: int) -> None:
    """The host branch of :func:`check_code_indices`: one min/max reduction (per layer with ``sizes``)."""
    if sizes is None:
        lo, hi = (int(v) for v in indices.aminmax())
        if lo >= low and hi < codebook_size:
            return
        bad = [v for v in dict.fromkeys((lo, hi)) if v < low or v >= codebook_size]
        raise IndexRangeError(
            f"{name} must lie in {_allowed_range(codebook_size, low < 0)}, got {' and '.join(map(str, bad))} "
            f"(values from {lo} to {hi})"
        )
    lows, highs = indices.reshape(-1, len(sizes)).aminmax(dim=0)
    for layer, (lo, hi, size) in enumerate(zip(lows.tolist(), highs.tolist(), sizes)):
        if lo < low or hi >= size:
            bad = [v for v in dict.fromkeys((lo, hi)) if v < low or v >= size]
            raise IndexRangeError(
                f"{name}[..., {layer}] (layer {layer}) must lie in {_allowed_range(size, low < 0)}, got "
                f"{' and '.join(map(str, bad))} (values from {lo} to {hi}; codebook sizes {list(sizes)})"
            )


class IndexRangeError(ValueError, IndexError):
    """Code indices outside their codebook, where vector-quantize-pytorch 1.32 failed inside an embedding lookup
    with ``IndexError``: both ``except ValueError`` and ``except IndexError`` catch it."""
