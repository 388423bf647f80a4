"""Run one benchmark workload in this (fresh) process and print one JSON line with the result.

Launched by ``benchmarks/run.py``; not meant to be called by hand, though it can be::

    python benchmarks/_worker.py --workload fsq_train --phase timing --quick

Phases:
    ``memory``: build, warm up, then the peak memory of ONE more iteration above the memory held before it.
        CPU: resident set size. The kernel's high-water mark (VmHWM) is reset to the current RSS through
        ``/proc/self/clear_refs`` right before the iteration, so ``VmHWM - VmRSS(before)`` is the peak of that
        iteration alone. Freed heap memory is first handed back to the OS (``malloc_trim``) so reused
        allocator slack does not hide the iteration's demand.
        CUDA: ``max_memory_allocated() - memory_allocated()`` around the iteration.
    ``timing``: build, warm up, then ``repeats`` timed iterations (more until they add up to ``min_time``
        seconds): wall time (``time.perf_counter``) and the CPU time of the whole process
        (``time.process_time``, every thread). On CUDA the iteration time is measured with a pair of CUDA
        events around each iteration (the device is synchronised before each iteration and after it), and the
        host wall time is kept as ``host_times_ms``.
    ``both``: ``memory``, then ``timing`` in the same process (``run.py --one-process``).
    ``opcount``: build, warm up, then the top-level ``aten::`` operators of ONE more iteration, counted with
        ``torch.profiler`` (see ``op_counts.py``).

``--policy cpu|accelerator`` runs everything under ``vector_quantize_pytorch.core.policy.use_chunk_policy``
(ours only: the reference has no chunk policy).

The result line is prefixed with ``BENCHMARK_RESULT`` so it can be found among anything the library prints.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import sys
import time
import traceback

RESULT_PREFIX = "BENCHMARK_RESULT "
PACKAGE = "vector_quantize_pytorch"


class QuantizerUnavailable(Exception):
    """The imported package has no class of that name (not implemented yet)."""


class Library:
    """Attribute access to the imported package's public classes; missing ones raise QuantizerUnavailable."""

    def __init__(self, package):
        self.package = package

    def __getattr__(self, name):
        try:
            return getattr(self.package, name)
        except AttributeError:
            raise QuantizerUnavailable(f"{PACKAGE}.{name} does not exist") from None


def import_package(repo_root: str | None, expect_repo: bool):
    """Import the package and check that it is ours (under repo_root) or the reference (not under it)."""
    try:
        package = __import__(PACKAGE)
    except ImportError as error:
        raise QuantizerUnavailable(f"cannot import {PACKAGE}: {error}") from None
    location = os.path.realpath(package.__file__)
    if repo_root is not None:
        inside = location.startswith(os.path.realpath(repo_root) + os.sep)
        if inside != expect_repo:
            wanted = "inside" if expect_repo else "outside"
            raise RuntimeError(f"{PACKAGE} resolved to {location}, expected a copy {wanted} {repo_root}")
    return package, location


def float_tensors_requiring_grad(output):
    """Every floating tensor in a (nested) output that requires grad; indices and plain numbers are skipped."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() and output.requires_grad else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in float_tensors_requiring_grad(item)]
    return []


def clear_grads(module, inputs):
    module.zero_grad(set_to_none=True)
    for x in inputs:
        x.grad = None


def make_step(module, inputs, mode: str):
    """A zero-argument function running one iteration of the workload."""
    import torch

    if mode == "encode":
        module.eval()

        def encode_step():
            with torch.no_grad():
                return module(*inputs)

        return encode_step

    module.train()

    def train_step():
        clear_grads(module, inputs)
        tensors = float_tensors_requiring_grad(module(*inputs))
        if tensors:
            loss = sum(t.float().mean() for t in tensors)
            loss.backward()

    return train_step


def status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        return int(re.search(rf"^{field}:\s+(\d+) kB", file.read(), re.MULTILINE).group(1))


def release_free_heap():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def measure_memory(step, device) -> dict:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return {"peak_mb": peak / 2**20, "memory_method": "cuda max_memory_allocated"}
    release_free_heap()
    before = status_kib("VmRSS")
    method = "VmHWM after clear_refs" if reset_peak_rss() else "VmHWM lifetime (clear_refs unavailable)"
    step()
    peak = status_kib("VmHWM") - before
    return {"peak_mb": max(peak, 0) / 1024, "memory_method": method}


def measure_time(step, device, repeats: int, min_seconds: float = 0.0) -> dict:
    """Time ``repeats`` iterations (more until they add up to ``min_seconds``): CUDA events on CUDA, else
    ``time.perf_counter``; the CPU time of the process is kept in both cases."""
    if device.type == "cuda":
        return measure_time_cuda(step, device, repeats, min_seconds)
    times, cpu_times = [], []
    while len(times) < repeats or sum(times) < min_seconds:
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "times_ms": [t * 1000 for t in times],
        "cpu_times_ms": [t * 1000 for t in cpu_times],
        "timer": "perf_counter",
    }


def measure_time_cuda(step, device, repeats: int, min_seconds: float = 0.0) -> dict:
    """Time iterations on CUDA with a ``torch.cuda.Event(enable_timing=True)`` pair around each one.

    The device is synchronised before each iteration, so no earlier work is queued in front of the start event,
    and after it, to read the elapsed time. ``times_ms`` are the event times (device time from the first
    launch to the end of the last kernel, launch gaps included); ``host_times_ms`` the host wall times."""
    import torch

    times, host_times, cpu_times = [], [], []
    while len(times) < repeats or sum(times) < min_seconds * 1000:
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        start_event.record()
        step()
        end_event.record()
        torch.cuda.synchronize(device)
        host_times.append((time.perf_counter() - start) * 1000)
        cpu_times.append((time.process_time() - cpu_start) * 1000)
        times.append(start_event.elapsed_time(end_event))
    return {"times_ms": times, "host_times_ms": host_times, "cpu_times_ms": cpu_times, "timer": "cuda events"}


def policy_context(policy: str | None):
    """``use_chunk_policy(policy)`` of the imported package, or nothing when ``policy`` is None."""
    if policy is None:
        return contextlib.nullcontext()
    from vector_quantize_pytorch.core.policy import use_chunk_policy

    return use_chunk_policy(policy)


def build_step(workload, lib, device, quick: bool):
    """Build ``workload`` with ``lib`` after ``torch.manual_seed(0)`` and move it to ``device``.

    Returns ``(step, module, inputs)``: the one-iteration step (see :func:`make_step`), the module and the tuple
    of inputs; floating inputs of a training workload require grad."""
    import torch

    torch.manual_seed(0)
    module, inputs = workload.build(lib, quick)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    module = module.to(device)
    inputs = tuple(x.to(device) for x in inputs)
    if workload.mode == "train":
        inputs = tuple(x.requires_grad_() if x.is_floating_point() else x for x in inputs)
    return make_step(module, inputs, workload.mode), module, inputs


def measure(args, step, device) -> dict:
    """The measurement of ``args.phase`` on a warmed-up ``step``."""
    if args.phase == "memory":
        return measure_memory(step, device)
    if args.phase == "both":
        return {**measure_memory(step, device), **measure_time(step, device, args.repeats, args.min_time)}
    if args.phase == "opcount":
        from op_counts import count_operators

        counts = count_operators(step)
        return {"op_total": sum(counts.values()), "op_counts": dict(counts.most_common())}
    return measure_time(step, device, args.repeats, args.min_time)


def run(args) -> dict:
    import torch
    from workloads import WORKLOADS

    workload = WORKLOADS[args.workload]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = {"workload": workload.name, "mode": workload.mode, "phase": args.phase}
    result.update(python=sys.executable, torch=torch.__version__, threads=torch.get_num_threads())
    lib = None
    if workload.needs_quantizer:
        package, location = import_package(args.repo_root, args.expect_repo)
        lib = Library(package)
        result["package_file"] = location
        result["package_version"] = getattr(package, "__version__", None)

    device = torch.device(args.device)
    result["policy"] = args.policy
    with policy_context(args.policy):
        step, module, inputs = build_step(workload, lib, device, args.quick)
        for _ in range(args.warmup):
            step()
        clear_grads(module, inputs)  # so the measured iteration's gradients count as its own memory
        result.update(measure(args, step, device))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--phase", choices=("memory", "timing", "both", "opcount"), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.0, help="keep timing until this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--policy", choices=("cpu", "accelerator"), default=None, help="ours: chunk policy")
    parser.add_argument("--repo-root", default=None, help="check where the package was imported from")
    parser.add_argument("--expect-repo", action="store_true", help="the package must come from --repo-root")
    args = parser.parse_args()

    try:
        result = {"status": "ok", **run(args)}
    except QuantizerUnavailable as error:
        result = {"status": "n/a", "workload": args.workload, "phase": args.phase, "error": str(error)}
    except Exception as error:  # report, do not crash the whole benchmark run
        traceback.print_exc(file=sys.stderr)
        message = f"{type(error).__name__}: {error}"
        result = {"status": "error", "workload": args.workload, "phase": args.phase, "error": message}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
