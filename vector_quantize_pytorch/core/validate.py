"""Argument checks shared by every constructor: each raises ValueError/TypeError naming the argument,
the value and what is allowed, before any state is built."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor


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
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex():
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
