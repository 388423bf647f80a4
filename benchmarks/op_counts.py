"""Count the operators one call of every benchmark workload dispatches: a device-independent proxy for kernel launches.

On a GPU every operator costs a kernel launch of several microseconds whatever its size, so a quantizer made of
many small operators is launch-bound there however fast it is on a CPU. This script counts, with
``torch.profiler`` on the CPU, the top-level ``aten::`` operators of one iteration of each workload of
``workloads.py`` (an iteration as ``_worker.make_step`` defines it, backward included, after 2 warm-up calls):
an ``aten::`` event none of whose ancestors is an ``aten::`` event. Operators an operator calls internally
(``aten::linear`` -> ``aten::addmm``) are not counted again.

Usage (from the repository root)::

    python benchmarks/op_counts.py --reference-python ~/ref-venv/bin/python
    python benchmarks/op_counts.py --no-reference --only vq_ --policy accelerator
    python benchmarks/op_counts.py --quick --no-reference          # tiny sizes, smoke test

Ours is counted under ``CPU_POLICY`` and ``ACCELERATOR_POLICY`` (``--policy``, see
``vector_quantize_pytorch/core/policy.py``), the reference (which has no policy) once. Every count runs in a
fresh process through ``run.py``'s worker (phase ``opcount``). Prints a markdown table to stdout (progress to
stderr) and writes JSON to ``--out``. In-process: :func:`count_operators` and :func:`count_workload`.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCHMARKS_DIR / "results" / "op_counts.json"
OPERATOR_PREFIX = "aten::"
POLICY_CHOICES = {"cpu": ("cpu",), "accelerator": ("accelerator",), "both": ("cpu", "accelerator")}
REFERENCE = "reference"
OURS_KEYS = ("ours_cpu", "ours_accelerator")


def is_top_level(event) -> bool:
    """Whether a profiler event is an ``aten::`` operator with no ``aten::`` operator among its ancestors."""
    if not event.name.startswith(OPERATOR_PREFIX):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(OPERATOR_PREFIX):
            return False
        parent = parent.cpu_parent
    return True


def profile_call(step, with_stack: bool = False):
    """Run ``step()`` once under ``torch.profiler`` (CPU activity) and return the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # no collection of earlier garbage during the profiled call
    with profile(activities=[ProfilerActivity.CPU], with_stack=with_stack) as profiler:
        step()
    return profiler.events()


def count_operators(step) -> collections.Counter:
    """Top-level ``aten::`` operators of one call of ``step()``, by name (backward operators included when
    ``step`` runs a backward pass)."""
    return collections.Counter(event.name for event in profile_call(step) if is_top_level(event))


def column_key(policy: str | None) -> str:
    """The table column of ours under ``policy``, or of the reference when ``policy`` is None."""
    return REFERENCE if policy is None else f"ours_{policy}"


def count_workload(
    name: str, policy: str | None = "accelerator", quick: bool = True, device: str = "cpu", warmup: int = 2
) -> collections.Counter:
    """Count one workload of ours in this process: build it as the benchmark worker does, run ``warmup``
    calls, then :func:`count_operators` of one more, everything under ``use_chunk_policy(policy)`` (None:
    the policy of the device type)."""
    import torch
    from _worker import Library, build_step, policy_context
    from workloads import WORKLOADS

    import vector_quantize_pytorch

    workload = WORKLOADS[name]
    with policy_context(policy):
        step, _, _ = build_step(workload, Library(vector_quantize_pytorch), torch.device(device), quick)
        for _ in range(warmup):
            step()
        return count_operators(step)


# ---------------------------------------------------------------------------------------------------------------
# Command line: every workload, each count in a fresh worker process


def parse_args(argv=None):
    """Options; ``repeats`` and ``min_time`` are set for ``run.run_worker``, which passes them on."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="interpreter with the reference installed (~/ref-venv/bin/python)")
    parser.add_argument("--no-reference", action="store_true", help="count ours only")
    parser.add_argument("--only", action="append", default=[], help="workloads whose name contains this")
    parser.add_argument("--policy", choices=POLICY_CHOICES, default="both", help="chunk policy of ours")
    parser.add_argument("--device", default="cpu", help="device the workloads run on (cpu or cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--warmup", type=int, default=2, help="calls before the counted one")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes at once")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per worker process")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--combine",
        nargs=2,
        type=Path,
        metavar=("RUN_JSON", "COUNTS_JSON"),
        help="count nothing: print one table joining a run.py JSON report with an op_counts.py JSON report",
    )
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.jobs < 1:
        parser.error("--warmup must be >= 0 and --jobs >= 1")
    args.repeats, args.min_time, args.ours_python = 1, 0.0, None
    return args


def make_columns(args) -> list[tuple[str, object, str | None]]:
    """``(column key, run.Side, policy)`` for every count of a workload: ours per policy, then the reference."""
    from run import make_sides

    sides = make_sides(args)
    columns = [(column_key(policy), sides[0], policy) for policy in POLICY_CHOICES[args.policy]]
    return columns + [(REFERENCE, side, None) for side in sides[1:]]


def count_one(name: str, column: tuple, args, cwd: str) -> dict:
    """One worker process: the op count of workload ``name`` for one column."""
    from run import run_worker

    _, side, policy = column
    extra = ("--policy", policy) if policy else ()
    result = run_worker(side, name, "opcount", args, cwd, extra)
    keep = ("status", "error", "op_total", "op_counts", "policy", "package_file", "package_version", "torch")
    return {key: result[key] for key in keep if key in result}


def count_all(names: list[str], columns: list[tuple], args, log) -> list[dict]:
    """Every (workload, column) count, ``--jobs`` worker processes at once; one result dict per workload."""
    from workloads import WORKLOADS

    tasks = [(name, column) for name in names for column in columns]
    results = {name: {"workload": name, "mode": WORKLOADS[name].mode} for name in names}
    with tempfile.TemporaryDirectory(prefix="vq-opcount-") as cwd, ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(count_one, name, column, args, cwd) for name, column in tasks]
        for index, ((name, column), future) in enumerate(zip(tasks, futures), 1):
            entry = results[name][column[0]] = future.result()
            shown = entry.get("op_total") if entry["status"] == "ok" else f"{entry['status']} ({entry.get('error')})"
            log(f"[{index}/{len(tasks)}] {name} {column[0]}: {shown}")
    return list(results.values())


def cell(entry: dict | None) -> str:
    """A table cell: the operator count, the status when it did not run, ``-`` when not asked for."""
    if entry is None:
        return "-"
    return str(entry["op_total"]) if entry["status"] == "ok" else entry["status"]


def count_ratio(result: dict) -> str:
    """Ours under the accelerator policy over the reference, or ``-``."""
    ours, reference = result.get(column_key("accelerator")), result.get(REFERENCE)
    if not ours or not reference or ours["status"] != "ok" or reference["status"] != "ok":
        return "-"
    return f"{ours['op_total'] / reference['op_total']:.2f}" if reference["op_total"] else "-"


def markdown_table(results: list[dict]) -> str:
    """The table: one row per workload, top-level operators per call."""
    header = "| workload | ours (cpu policy) | ours (accelerator policy) | reference | ratio accelerator/reference |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for result in results:
        row = [result["workload"], cell(result.get(column_key("cpu"))), cell(result.get(column_key("accelerator")))]
        row += [cell(result.get(REFERENCE)), count_ratio(result)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def combined_table(run_report: dict, count_report: dict) -> str:
    """One table of a ``run.py`` JSON report (time, memory) joined with an op-count report, by workload."""
    from run import cell as run_cell
    from run import ratio as run_ratio

    counts = {result["workload"]: result for result in count_report["results"]}
    header = "| workload | ours ms | ref ms | time ratio | ours peak MB | ref peak MB | memory ratio "
    header += "| ours ops (cpu policy) | ours ops (accelerator policy) | ref ops | ops ratio (accelerator/ref) |"
    lines = [header, "|---|" + "---:|" * 10]
    for result in run_report["results"]:
        ours, reference = result.get("ours"), result.get("reference")
        row = [result["workload"], run_cell(ours, "time_ms"), run_cell(reference, "time_ms")]
        row += [run_ratio(result, "time_ms"), run_cell(ours, "peak_mb"), run_cell(reference, "peak_mb")]
        row.append(run_ratio(result, "peak_mb"))
        count = counts.get(result["workload"], {})
        row += [cell(count.get(column_key(policy))) for policy in ("cpu", "accelerator")]
        row += [cell(count.get(REFERENCE)), count_ratio(count)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(args, argv, results: list[dict], table: str, seconds: float) -> None:
    """The JSON file: settings, per-workload counts by operator name, and the table."""
    meta = {key: getattr(args, key) for key in ("device", "quick", "warmup", "policy", "threads", "reference_python")}
    meta.update(argv=sys.argv[1:] if argv is None else list(argv), seconds=round(seconds, 1))
    report = {"meta": meta, "results": results, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def main(argv=None) -> int:
    """Count, print the table, write the JSON; 1 if one of ours failed, 2 if ``--only`` matches nothing (or
    ``--combine``: print the joined table only)."""
    from run import select_workloads

    args = parse_args(argv)
    if args.combine:
        run_json, counts_json = (json.loads(path.read_text()) for path in args.combine)
        print(combined_table(run_json, counts_json))
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    names = select_workloads(args.only)
    if not names:
        print(f"no workload matches --only {args.only}; see run.py --list", file=sys.stderr)
        return 2
    if not args.no_reference and not args.reference_python:
        print("note: no --reference-python given, counting ours only", file=sys.stderr)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = time.time()
    results = count_all(names, make_columns(args), args, log)
    table = markdown_table(results)
    print(table)
    print(f"\ntop-level aten:: operators per call ({args.device}, {'quick' if args.quick else 'full'} sizes)")
    write_report(args, argv, results, table, time.time() - started)
    log(f"wrote {args.out}")
    failed = [r["workload"] for r in results if any(r.get(key, {}).get("status") == "error" for key in OURS_KEYS)]
    if failed:
        log(f"ours failed on: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
