"""How time and peak memory of VectorQuantize grow with the codebook size and the number of tokens.

For ours and the reference, each point is one fresh process (see ``_worker.py`` for how memory and time are
measured): a training step (forward and backward) and an eval encode of ``VectorQuantize(dim=64)``,

- against the codebook size ``K = 2^8 .. 2^18`` with 4096 tokens, and
- against the number of tokens ``N = 2^10 .. 2^16`` with 4096 codes.

Our search holds at most ``CPU_POLICY.search_scores`` scores at once, so once ``N x K`` exceeds it the peak memory
stops growing with ``K`` (what remains is the codebook and its EMA statistics, linear in ``K``, and the
per-token tensors, linear in ``N``). The reference builds the whole ``N x K`` distance matrix, several times
in a training step; it is measured only while its previous point stayed under ``--ref-max-mb`` and
``--ref-max-seconds``.

Writes a PNG plot (``--png``, default ``benchmarks/images/scaling.png``), a JSON file and prints markdown
tables (pasted into benchmarks/README.md, "Scaling").

Usage (from the repository root)::

    python benchmarks/scaling.py --reference-python ~/ref-venv/bin/python
    python benchmarks/scaling.py --no-reference --max-log2-codes 12        # quick look, ours only
    python benchmarks/scaling.py --reference-from benchmarks/results/scaling.json  # remeasure ours only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
DIM = 64
FIXED_TOKENS = 4096
FIXED_CODES = 4096
MODES = ("train", "encode")


# ---------------------------------------------------------------------------------------------------------------
# Worker: one measurement in this (fresh) process


def run_point(args) -> dict:
    """Build ``VectorQuantize(dim=64, codebook_size=K)`` and ``(1, N, 64)`` inputs; measure memory or time."""
    sys.path.insert(0, str(BENCHMARKS_DIR))
    import torch
    from _worker import RESULT_PREFIX, import_package, make_step, measure_memory, measure_time

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    package, location = import_package(str(REPO_ROOT), args.expect_repo)
    torch.manual_seed(0)
    module = package.VectorQuantize(dim=DIM, codebook_size=args.codes)
    x = torch.randn(1, args.tokens, DIM, requires_grad=args.mode == "train")
    step = make_step(module, (x,), args.mode)
    for _ in range(args.warmup):
        step()
    module.zero_grad(set_to_none=True)
    x.grad = None
    device = torch.device("cpu")
    if args.phase == "memory":
        result = measure_memory(step, device)
    else:
        timing = measure_time(step, device, args.repeats)
        result = {"times_ms": timing["times_ms"], "cpu_times_ms": timing["cpu_times_ms"]}
    print(RESULT_PREFIX + json.dumps({"status": "ok", "package_file": location, **result}), flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Driver


def point_command(python: str, mode: str, phase: str, codes: int, tokens: int, args, ours: bool) -> list[str]:
    command = [python, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--phase", phase]
    command += ["--codes", str(codes), "--tokens", str(tokens), "--warmup", str(args.warmup)]
    command += ["--repeats", str(args.repeats)] + ["--expect-repo"] * ours
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    return command


def measure(side: dict, mode: str, codes: int, tokens: int, args, cwd: str) -> dict:
    """Peak MB (one process) and median time in ms (another process) of one point, or an error."""
    sys.path.insert(0, str(BENCHMARKS_DIR))
    from _worker import RESULT_PREFIX
    from run import Side, worker_env

    env = worker_env(Side(side["label"], side["python"], on_repo_path=side["ours"]))
    point = {"codes": codes, "tokens": tokens}
    for phase in ("memory", "timing"):
        command = point_command(side["python"], mode, phase, codes, tokens, args, side["ours"])
        try:
            done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {**point, "error": f"timed out after {args.timeout:.0f} s"}
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {**point, "error": tail}
        result = json.loads(lines[-1][len(RESULT_PREFIX) :])
        if phase == "memory":
            point["peak_mb"] = result["peak_mb"]
        else:
            samples = sorted(result["cpu_times_ms" if args.clock == "cpu" else "times_ms"])
            point["time_ms"] = samples[len(samples) // 2]
    return point


def sweep(side: dict, mode: str, axis: str, values: list[int], args, cwd: str, log) -> list[dict]:
    """Measure every value of the axis in order; the reference stops once a point exceeds its limits."""
    points = []
    for value in values:
        codes, tokens = (value, FIXED_TOKENS) if axis == "codes" else (FIXED_CODES, value)
        point = measure(side, mode, codes, tokens, args, cwd)
        points.append(point)
        shown = point.get("error") or f"{point['time_ms']:.1f} ms, {point['peak_mb']:.1f} MB"
        log(f"  {side['label']:9s} {mode:6s} K={codes:<7d} N={tokens:<6d} {shown}")
        if side["ours"]:
            continue
        # the next point is twice as large, and so, about, are the reference's memory and time
        too_big = "error" in point or 2 * point["peak_mb"] > args.ref_max_mb
        if too_big or 2 * point["time_ms"] > args.ref_max_seconds * 1000:
            log(f"  reference stops after {axis} = {value} (limits: {args.ref_max_mb} MB, {args.ref_max_seconds} s)")
            break
    return points


def markdown(results: dict, axis: str, mode: str) -> str:
    label = "codebook size K" if axis == "codes" else "tokens N"
    fixed = f"N = {FIXED_TOKENS}" if axis == "codes" else f"K = {FIXED_CODES}"
    lines = [
        f"{mode}, {fixed}:",
        "",
        f"| {label} | ours ms | ref ms | ours peak MB | ref peak MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_side = {side: {p[axis]: p for p in results[side][axis][mode]} for side in results}
    for value in sorted(by_side["ours"]):
        row = [f"2^{value.bit_length() - 1}"]
        for key in ("time_ms", "peak_mb"):
            for side in ("ours", "reference"):
                point = by_side.get(side, {}).get(value)
                if point is None:
                    row.append("-")
                elif "error" in point:
                    row.append("error")
                else:
                    row.append(f"{point[key]:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, png: Path, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = {"ours": "tab:blue", "reference": "tab:red"}
    styles = {"train": "-", "encode": "--"}
    for row, axis in enumerate(("codes", "tokens")):
        for column, key in enumerate(("time_ms", "peak_mb")):
            ax = axes[row][column]
            for side, by_axis in results.items():
                for mode in MODES:
                    points = [p for p in by_axis[axis][mode] if "error" not in p]
                    if not points:
                        continue
                    xs, ys = [p[axis] for p in points], [max(p[key], 1e-3) for p in points]
                    ax.plot(xs, ys, styles[mode], marker="o", color=colors[side], label=f"{side} {mode}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            fixed = f"N = {FIXED_TOKENS}" if axis == "codes" else f"K = {FIXED_CODES}"
            ax.set_xlabel(("codebook size K" if axis == "codes" else "tokens N") + f" ({fixed}, d = {DIM})")
            time_label = "ms per iteration" + (" (CPU time)" if clock == "cpu" else "")
            ax.set_ylabel(time_label if key == "time_ms" else "peak extra memory, MiB")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("VectorQuantize: training step (solid) and encode (dashed), ours vs reference 1.32.0")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="interpreter with the reference installed")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--min-log2-codes", type=int, default=8)
    parser.add_argument("--max-log2-codes", type=int, default=18)
    parser.add_argument("--min-log2-tokens", type=int, default=10)
    parser.add_argument("--max-log2-tokens", type=int, default=16)
    parser.add_argument(
        "--reference-from",
        type=Path,
        default=None,
        help="reuse the reference's points from an earlier JSON output instead of measuring them again",
    )
    parser.add_argument("--ref-max-mb", type=float, default=8192, help="reference: stop before points above this")
    parser.add_argument("--ref-max-seconds", type=float, default=10, help="reference: stop before slower points")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="time shown (default: CPU time)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--png", type=Path, default=BENCHMARKS_DIR / "images" / "scaling.png")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_DIR / "results" / "scaling.json")
    # worker mode (one point in a fresh process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("memory", "timing"), help=argparse.SUPPRESS)
    parser.add_argument("--codes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expect-repo", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_point(args)
        return 0

    def log(message):
        print(message, file=sys.stderr, flush=True)

    sides = [{"label": "ours", "python": sys.executable, "ours": True}]
    if args.reference_python and not args.no_reference:
        sides.append({"label": "reference", "python": os.path.expanduser(args.reference_python), "ours": False})
    axes = {
        "codes": [2**i for i in range(args.min_log2_codes, args.max_log2_codes + 1)],
        "tokens": [2**i for i in range(args.min_log2_tokens, args.max_log2_tokens + 1)],
    }
    results = {}
    if args.reference_from is not None:
        results["reference"] = json.loads(args.reference_from.read_text())["results"]["reference"]
        sides = [side for side in sides if side["ours"]]
    with tempfile.TemporaryDirectory(prefix="vq-scaling-") as cwd:
        for side in sides:
            results[side["label"]] = {
                axis: {mode: sweep(side, mode, axis, values, args, cwd, log) for mode in MODES}
                for axis, values in axes.items()
            }
    for axis in axes:
        for mode in MODES:
            print(markdown(results, axis, mode) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "clock": args.clock, "repeats": args.repeats, "dim": DIM}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    plot(results, args.png, args.clock)
    log(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
