"""Benchmark our quantizers against the reference library, workload by workload, each in fresh processes.

Usage (from the repository root)::

    python benchmarks/run.py --reference-python ~/ref-venv/bin/python
    python benchmarks/run.py --reference-python ~/ref-venv/bin/python --only vq_train --rounds 2
    python benchmarks/run.py --quick --no-reference          # smoke test, ours only

Ours runs with this interpreter and the repository root on PYTHONPATH; the reference runs with
``--reference-python`` from a temporary directory with the repository root kept off the path. Every
(workload, side) gets one fresh process for memory and one per timing round; see ``_worker.py``.
Prints a markdown table to stdout (progress to stderr) and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _worker import RESULT_PREFIX
from workloads import LIMIT_PAIR, WORKLOADS

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
WORKER = BENCHMARKS_DIR / "_worker.py"
DEFAULT_OUT = BENCHMARKS_DIR / "results" / "latest.json"
# --clock: which per-iteration samples the table and the ratios use
CLOCKS = {"wall": "times_ms", "cpu": "cpu_times_ms"}


@dataclass(frozen=True)
class Side:
    """One implementation under test: which interpreter, and whether the repository root is on its path."""

    label: str
    python: str
    on_repo_path: bool


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="interpreter with the reference installed (~/ref-venv/bin/python)")
    parser.add_argument("--no-reference", action="store_true", help="run ours only")
    parser.add_argument("--only", action="append", default=[], help="run workloads whose name contains this")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per round (7; quick: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument(
        "--min-time", type=float, default=0.0, help="per round, time more iterations until they add up to this (s)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="timing rounds, alternating ours and reference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument(
        "--memory-repeats", type=int, default=1, help="fresh-process memory measurements per side (median shown)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per worker process")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="measure memory and the first timing round in the same worker process (half the process starts; "
        "fine on CUDA, whose memory comes from the allocator's counters)",
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="time the table shows: wall clock, or CPU time of the worker process (steadier on a shared "
        "machine; use with --threads 1)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    # Run "ours" with another interpreter and without the repository on the path (e.g. an installed wheel,
    # or the reference itself to check the harness).
    parser.add_argument("--ours-python", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("repeats", "rounds", "memory_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.min_time < 0:
        parser.error(f"--min-time must be >= 0, got {args.min_time}")
    return args


def select_workloads(only: list[str]) -> list[str]:
    names = list(WORKLOADS)
    if only:
        names = [name for name in names if any(part in name for part in only)]
    return names


def make_sides(args) -> list[Side]:
    ours_python = os.path.expanduser(args.ours_python) if args.ours_python else sys.executable
    ours = Side("ours", ours_python, on_repo_path=args.ours_python is None)
    sides = [ours]
    if not args.no_reference and args.reference_python:
        sides.append(Side("reference", os.path.expanduser(args.reference_python), on_repo_path=False))
    for side in sides:
        if not Path(side.python).exists():
            raise SystemExit(f"{side.label} interpreter {side.python!r} does not exist")
    return sides


def worker_env(side: Side) -> dict:
    """The environment for a worker: PYTHONPATH without the repository, plus it first for ours."""
    env = dict(os.environ)
    repo = os.path.realpath(REPO_ROOT)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.realpath(p) != repo]
    if side.on_repo_path:
        kept.insert(0, str(REPO_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(kept)
    if not kept:
        del env["PYTHONPATH"]
    return env


def run_worker(side: Side, workload: str, phase: str, args, cwd: str, extra: tuple[str, ...] = ()) -> dict:
    """Run ``_worker.py`` for one (side, workload, phase) in a fresh process from ``cwd`` and return its result;
    ``extra`` are more worker options (e.g. ``("--policy", "cpu")``)."""
    command = [side.python, str(WORKER), "--workload", workload, "--phase", phase, "--device", args.device]
    command += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--repo-root", str(REPO_ROOT)]
    command += ["--min-time", str(args.min_time), *extra]
    command += ["--quick"] * args.quick + ["--expect-repo"] * side.on_repo_path
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    try:
        done = subprocess.run(
            command, cwd=cwd, env=worker_env(side), capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {args.timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            if result["status"] == "error":
                result["stderr_tail"] = done.stderr[-2000:]
            return result
    tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
    return {"status": "error", "error": f"worker exited with code {done.returncode}: {tail[0]}"}


def measure_side(side: Side, workload: str, args, cwd: str) -> dict:
    """Memory ``--memory-repeats`` times (a fresh process each, the median is reported); timing rounds are
    added later by measure_workload. With ``--one-process`` the first memory process also times round 1."""
    memory = run_worker(side, workload, "both" if args.one_process else "memory", args, cwd)
    entry = {key: memory.get(key) for key in ("status", "error", "package_file", "package_version", "torch")}
    entry.update(peak_mb=memory.get("peak_mb"), memory_method=memory.get("memory_method"), times_ms=[])
    entry["cpu_times_ms"] = []
    entry.update(threads=memory.get("threads"), timer=memory.get("timer"))
    if entry["status"] != "ok":
        return entry
    if args.one_process:
        add_timing(entry, memory, args)
    samples = [memory["peak_mb"]]
    for _ in range(args.memory_repeats - 1):
        again = run_worker(side, workload, "memory", args, cwd)
        if again["status"] == "ok":
            samples.append(again["peak_mb"])
    entry["peak_mb_samples"] = samples
    entry["peak_mb"] = statistics.median(samples)
    return entry


def add_timing(entry: dict, timing: dict, args) -> None:
    """Add one timing round's samples to a side's entry and update its medians and minima."""
    entry["times_ms"] += timing["times_ms"]
    entry["cpu_times_ms"] += timing.get("cpu_times_ms", [])
    entry["timer"] = timing.get("timer", entry.get("timer"))
    entry["wall_ms"] = statistics.median(entry["times_ms"])
    entry["wall_min_ms"] = min(entry["times_ms"])
    if entry["cpu_times_ms"]:
        entry["cpu_ms"] = statistics.median(entry["cpu_times_ms"])
        entry["cpu_min_ms"] = min(entry["cpu_times_ms"])
    samples = entry[CLOCKS[args.clock]]
    entry["time_ms"] = statistics.median(samples)
    entry["time_min_ms"] = min(samples)


def measure_workload(name: str, sides: list[Side], args, cwd: str, log) -> dict:
    """Memory, then ``--rounds`` timing rounds alternating the sides, each in a fresh worker process."""
    entries = {side.label: measure_side(side, name, args, cwd) for side in sides}
    for side in sides:
        log(f"  {side.label:9s} memory  {describe(entries[side.label], 'peak_mb', 'MB')}")
    for round_index in range(1 if args.one_process else 0, args.rounds):
        for side in sides:
            entry = entries[side.label]
            if entry["status"] != "ok":
                continue
            timing = run_worker(side, name, "timing", args, cwd)
            if timing["status"] != "ok":
                entry.update(status=timing["status"], error=timing.get("error"))
                continue
            add_timing(entry, timing, args)
            round_median = statistics.median(timing[CLOCKS[args.clock]])
            log(f"  {side.label:9s} timing  round {round_index + 1}: {round_median:.2f} ms ({args.clock})")
    return {"workload": name, "mode": WORKLOADS[name].mode, **entries}


def describe(entry: dict, key: str, unit: str) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']} ({entry.get('error')})"
    return f"{entry[key]:.2f} {unit}"


# ---------------------------------------------------------------------------------------------------------------
# Report


def cell(entry: dict | None, key: str) -> str:
    if entry is None:
        return "-"
    if entry["status"] != "ok":
        return entry["status"]
    value = entry.get(key)
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def ratio(result: dict, key: str) -> str:
    ours, reference = result.get("ours"), result.get("reference")
    if not ours or not reference or ours["status"] != "ok" or reference["status"] != "ok":
        return "-"
    if not reference.get(key):
        return "-"
    return f"{ours[key] / reference[key]:.2f}"


def markdown_table(results: list[dict]) -> str:
    header = "| workload | ours ms | ref ms | time ratio (ours/ref) | ours peak MB | ref peak MB | memory ratio |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for result in results:
        ours, reference = result.get("ours"), result.get("reference")
        row = [
            result["workload"],
            cell(ours, "time_ms"),
            cell(reference, "time_ms"),
            ratio(result, "time_ms"),
            cell(ours, "peak_mb"),
            cell(reference, "peak_mb"),
            ratio(result, "peak_mb"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def limit_ratios(results: list[dict]) -> dict:
    """Time of the VQ encode workload over the bare matmul it cannot avoid, per side."""
    by_name = {result["workload"]: result for result in results}
    quantizer, matmul = (by_name.get(name) for name in LIMIT_PAIR)
    if quantizer is None or matmul is None or matmul["ours"]["status"] != "ok":
        return {}
    ratios = {}
    for label in ("ours", "reference"):
        entry = quantizer.get(label)
        if entry and entry["status"] == "ok":
            ratios[label] = entry["time_ms"] / matmul["ours"]["time_ms"]
    return ratios


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            models = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def run_meta(args, argv, sides: list[Side], seconds: float) -> dict:
    """The settings and the machine of a run, for the JSON report."""
    keys = ("device", "quick", "warmup", "repeats", "min_time", "rounds", "threads", "clock", "memory_repeats")
    return {
        **machine_description(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        **{key: getattr(args, key) for key in keys},
        "one_process": args.one_process,
        "sides": {side.label: side.python for side in sides},
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> int:
    """Measure the selected workloads, print the table, write the JSON; 1 if one of ours failed, 2 if ``--only``
    matches nothing."""
    args = parse_args(argv)
    # On SIGTERM (e.g. `timeout`), raise so subprocess.run kills the running worker instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.list:
        for name, workload in WORKLOADS.items():
            print(f"{name}  ({workload.mode})")
        return 0
    names = select_workloads(args.only)
    if not names:
        print(f"no workload matches --only {args.only}; see --list", file=sys.stderr)
        return 2
    sides = make_sides(args)
    if not args.no_reference and not args.reference_python:
        print("note: no --reference-python given, running ours only", file=sys.stderr)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    results = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vq-bench-") as cwd:
        for index, name in enumerate(names, 1):
            log(f"[{index}/{len(names)}] {name} ({WORKLOADS[name].mode})")
            results.append(measure_workload(name, sides, args, cwd, log))

    table = markdown_table(results)
    print(table)
    clock = "wall clock" if args.clock == "wall" else "CPU time of the worker process"
    if args.clock == "wall" and args.device.startswith("cuda"):
        clock = "CUDA event time (device time of each iteration)"
    print(f"\ntimes: medians of {clock}, torch threads: {args.threads or 'default'}")
    ratios = limit_ratios(results)
    if ratios:
        parts = ", ".join(f"{label} {value:.2f}x" for label, value in ratios.items())
        print(f"\nlimit ratio ({LIMIT_PAIR[0]} / {LIMIT_PAIR[1]}): {parts}")

    report = {
        "meta": run_meta(args, argv, sides, time.time() - started),
        "results": results,
        "limit_ratio": ratios,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")

    failed = [result["workload"] for result in results if result["ours"]["status"] == "error"]
    if failed:
        log(f"ours failed on: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
