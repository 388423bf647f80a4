"""Activation checkpointing for quantizers with state: the recompute in backward is exact and changes nothing.

``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)`` runs ``fn`` twice: once in the forward pass
(keeping no activations) and once more in the backward pass, to recompute them. A quantizer that updates its
state in a training forward (EMA statistics, k-means initialisation, dead-code replacement, affine moments)
would update it a second time in the recompute, and would quantize against the already updated codebook, so
its outputs, and the gradients computed from them, would differ from the first forward's.

torch tells a function whether it runs as the forward or as the recompute through one public hook: the
``context_fn`` argument of ``checkpoint``, "a callable returning a tuple of two context managers; the function
and its recomputation will be run under the first and second context managers respectively".
:func:`checkpoint_contexts` is such a ``context_fn``; :func:`checkpoint` calls torch's checkpoint with it::

    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_contexts)
    out = vector_quantize_pytorch.checkpoint(block, x)  # the same

How it works. A quantizer whose training forward changes its state has that forward wrapped by
:func:`stateful_forward`. Inside the first context, each such call (the outermost one: a ResidualVQ's layers are
part of its call) stores a copy of the module's state as it was before the call: its parameters, buffers
and the plain Python flags (numbers, booleans, None) of its modules. Inside the second context the same calls
come again, in the same order; each one runs with the module's tensors swapped for copies of the stored
state (buffers by assignment, parameters through ``.data``, so that gradients still reach the module's own
parameters), and afterwards the module's tensors and flags are put back as they were. So the recompute sees
exactly the state the forward saw; with the random number state that checkpoint restores, it makes the same
choices and computes the same outputs, hence the same gradients; and whatever it updates is thrown away.
Tensors saved for backward during the recompute keep referring to the copies, not to the module's tensors.

Cost: one copy of the quantizer's parameters and buffers per checkpointed call, kept until the checkpoint's
graph is freed, and one more copy during the recompute. Distributed quantizers repeat their collectives in
the recompute (every rank recomputes the same calls, so they match).

Not covered: a plain ``checkpoint`` call without this ``context_fn`` (torch offers no public way to tell a
recompute from a forward then: the quantizer then updates twice). It is not silent: a training forward that
changes state checks whether saved-tensor hooks are active (non-reentrant checkpointing installs them; the probe
is one operator on a CPU scalar, see :func:`saved_tensor_hooks_active`) and, outside ``checkpoint_contexts``,
warns once per module. ``torch.autograd.graph.save_on_cpu`` and other offloading hooks trigger the same warning
(they recompute nothing; filter it). Also not covered: quantizers with an
in-place codebook optimizer (its state lives in the optimizer: refused with a ``ValueError``); ``torch.compile``
of the checkpointed function (``context_fn`` must then return ``TorchDispatchMode`` objects; the wrapper
passes through while compiling).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from contextlib import nullcontext
from contextvars import ContextVar
from typing import Callable

import torch
from torch import nn

# (frame, "forward" | "recompute") while a checkpointed function runs under checkpoint_contexts
_PHASE: ContextVar[tuple[_Frame, str] | None] = ContextVar("vector_quantize_pytorch_checkpoint_phase", default=None)
# True inside a stateful call that is already recorded or replayed (its inner stateful calls are part of it)
_INSIDE: ContextVar[bool] = ContextVar("vector_quantize_pytorch_inside_stateful_call", default=False)

_SCALARS = (bool, int, float, type(None))
_PROBE_MESSAGE = "vector_quantize_pytorch: probing for active saved-tensor hooks"
# the CPU scalar saved_tensor_hooks_active multiplies: made at import, outside any mode (a fake or meta tensor
# made under a user's tracing mode must not be kept)
_PROBE = torch.ones((), requires_grad=True)
_WARNED: weakref.WeakSet = weakref.WeakSet()  # modules already warned about a checkpoint without our context
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))  # torch's own attributes of every module: never touched


def is_recompute() -> bool:
    """True while :func:`checkpoint_contexts` runs a checkpointed function's recomputation (in backward).

    For code that observes a training forward (e.g. a usage meter fed from a forward): skip it when True."""
    phase = _PHASE.get()
    return phase is not None and phase[1] == "recompute"


class _State:
    """A module's parameters, buffers and Python flags at one moment (tensors copied)."""

    def __init__(self, module: nn.Module):
        self.parameters = {name: p.detach().clone() for name, p in module.named_parameters()}
        self.buffers = {name: b.detach().clone() for name, b in module.named_buffers() if b is not None}
        self.flags = _flags(module)


def _flags(module: nn.Module) -> dict:
    """``{(submodule name, attribute): value}`` for the plain Python values our modules keep (not torch's)."""
    return {
        (name, key): value
        for name, sub in module.named_modules()
        for key, value in vars(sub).items()
        if key not in _MODULE_ATTRIBUTES and isinstance(value, _SCALARS)
    }


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _set_flags(module: nn.Module, flags: dict) -> None:
    for (name, key), value in flags.items():
        setattr(module.get_submodule(name) if name else module, key, value)


class _Frame:
    """One checkpoint call: the states recorded by its forward, replayed in order by its recomputations."""

    def __init__(self):
        self.records: list[tuple[nn.Module, _State]] = []
        self.cursor = 0

    def record(self, module: nn.Module) -> None:
        if getattr(module, "in_place_codebook_optimizer", None) is not None:
            raise ValueError(
                f"{type(module).__name__} with an in_place_codebook_optimizer cannot run under activation "
                "checkpointing: the optimizer's own state would be stepped again by the recomputation"
            )
        self.records.append((module, _State(module)))

    def replay(self, module: nn.Module, forward: Callable, args, kwargs):
        if self.cursor >= len(self.records) or self.records[self.cursor][0] is not module:
            raise RuntimeError(
                f"checkpoint recomputation called {type(module).__name__} where the forward pass did not (call "
                f"{self.cursor}): the checkpointed function must call its quantizers in the same order both times"
            )
        state = self.records[self.cursor][1]
        self.cursor += 1
        live_buffers = {name: b for name, b in module.named_buffers() if b is not None}
        live_data = {name: p.data for name, p in module.named_parameters()}
        live_flags = _flags(module)
        try:
            with torch.no_grad():
                for name, saved in state.buffers.items():
                    owner, leaf = _owner(module, name)
                    setattr(owner, leaf, saved.clone())  # a registered buffer is replaced by assignment
                for name, p in module.named_parameters():
                    p.data = state.parameters[name].clone()
            _set_flags(module, state.flags)
            return forward(module, *args, **kwargs)
        finally:
            for name, live in live_buffers.items():
                owner, leaf = _owner(module, name)
                setattr(owner, leaf, live)
            for name, p in module.named_parameters():
                p.data = live_data[name]
            _set_flags(module, live_flags)


class _Phase:
    """A re-enterable context manager: a recomputation may run more than once (several backward passes)."""

    def __init__(self, frame: _Frame, phase: str, inner):
        self.frame, self.phase, self.inner = frame, phase, inner
        self.tokens = []

    def __enter__(self):
        if self.phase == "recompute":
            self.frame.cursor = 0
        self.tokens.append(_PHASE.set((self.frame, self.phase)))
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            _PHASE.reset(self.tokens.pop())


def checkpoint_contexts(context_fn: Callable | None = None) -> tuple:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint``: quantizers recompute exactly and change nothing.

    Args:
        context_fn: another ``context_fn`` to combine with (e.g. ``functools.partial(
            torch.utils.checkpoint.create_selective_checkpoint_contexts, policy)``); its contexts run inside ours.

    Pass the function itself: ``checkpoint(fn, x, use_reentrant=False, context_fn=checkpoint_contexts)``.
    """
    frame = _Frame()
    forward_inner, recompute_inner = context_fn() if context_fn is not None else (nullcontext(), nullcontext())
    return _Phase(frame, "forward", forward_inner), _Phase(frame, "recompute", recompute_inner)


def checkpoint(function: Callable, *args, context_fn: Callable | None = None, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=checkpoint_contexts)``.

    Keyword arguments other than ``context_fn`` (``preserve_rng_state``, ``determinism_check``, ...) go to torch's
    checkpoint; a ``context_fn`` given here is combined with :func:`checkpoint_contexts`. The reentrant variant
    is refused: it has no ``context_fn``."""
    if kwargs.pop("use_reentrant", False):
        raise ValueError("use_reentrant=True has no context_fn; quantizers need use_reentrant=False")
    contexts = functools.partial(checkpoint_contexts, context_fn) if context_fn is not None else checkpoint_contexts
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def saved_tensor_hooks_active() -> bool:
    """True while saved-tensor hooks are active, as they are in a non-reentrant checkpoint's forward and recompute.

    The documented contract of ``torch.autograd.graph.disable_saved_tensors_hooks``: inside it, saving a tensor
    for backward through an active hook raises ``RuntimeError`` with the given message. The probe saves a CPU
    scalar (a multiplication that records its operands), so it launches nothing on an accelerator."""
    try:
        with torch.autograd.graph.disable_saved_tensors_hooks(_PROBE_MESSAGE):
            _PROBE.mul(_PROBE)
    except RuntimeError as error:
        if _PROBE_MESSAGE in str(error):
            return True
        raise
    return False


def _warn_if_checkpointed_without_context(module: nn.Module) -> None:
    """Warn once per module when its state-changing forward runs under checkpointing without our context."""
    if module in _WARNED or not torch.is_grad_enabled() or not saved_tensor_hooks_active():
        return
    _WARNED.add(module)
    warnings.warn(
        f"{type(module).__name__} changes its state in this training forward, which runs under saved-tensor hooks "
        "(activation checkpointing?) without vector_quantize_pytorch.checkpoint_contexts: a checkpoint's "
        "recomputation would update the state a second time and quantize against the updated codebook. Pass "
        "context_fn=vector_quantize_pytorch.checkpoint_contexts to torch.utils.checkpoint.checkpoint, or call "
        "vector_quantize_pytorch.checkpoint (ignore this for offloading hooks such as save_on_cpu)",
        UserWarning,
        stacklevel=5,  # the caller of the module: warn, this function, the wrapper, Module._call_impl, __call__
    )


def stateful_forward(forward: Callable) -> Callable:
    """Decorate the ``forward`` of a module whose training forward changes its state (see the module docstring).

    Outside :func:`checkpoint_contexts`, in eval mode and while compiling, it calls ``forward`` unchanged (outside
    the contexts, a training forward under saved-tensor hooks warns once: see the module docstring)."""

    @functools.wraps(forward)
    def wrapper(module: nn.Module, *args, **kwargs):
        if torch.compiler.is_compiling():
            return forward(module, *args, **kwargs)
        phase = _PHASE.get()
        if not module.training or _INSIDE.get():
            return forward(module, *args, **kwargs)
        if phase is None:
            _warn_if_checkpointed_without_context(module)
        token = _INSIDE.set(True)
        try:
            if phase is None:
                return forward(module, *args, **kwargs)
            frame, name = phase
            if name == "forward":
                frame.record(module)
                return forward(module, *args, **kwargs)
            return frame.replay(module, forward, args, kwargs)
        finally:
            _INSIDE.reset(token)

    return wrapper


__all__ = ["checkpoint", "checkpoint_contexts", "is_recompute", "saved_tensor_hooks_active", "stateful_forward"]
