"""Memory and time of an LFQ training step with the entropy loss, against the number of bits K.

LFQ's entropy loss needs, per token, the softmax over all ``2^K`` codes (MAGVIT-v2). The reference builds that
``tokens x 2^K`` matrix; ours never does (see ``vector_quantize_pytorch/core/entropy.py``):

* **exact**: the exact batch ("codebook") entropy, streamed over chunks of codes and of tokens, each chunk's mean a
  matrix product of two per-bit-product tables; its gradient is formed in the same pass. Memory is bounded by the
  chunk budgets whatever K; time grows as ``tokens x 2^K``. Ours uses it up to ``EXACT_CODE_ENTROPY_MAX_BITS`` (24)
  bits; ``--exact-max-bits`` raises that constant in the point process to measure it further.
* **bound**: the bits split into groups of at most ``BOUND_GROUP_MAX_BITS`` (16) and the group entropies summed
  (BSQ's grouped estimate, an upper bound). Ours switches to it above 24 bits; this script forces it at every K by
  setting ``EXACT_CODE_ENTROPY_MAX_BITS`` to 0 (the constant is read at each call). For ``K <= 16`` the bound has
  one group, which is the exact entropy.
* **reference**: vector-quantize-pytorch 1.32.0, for the K whose predicted memory (7 x tokens x 2^K x 4 bytes,
  the factor measured for its entropy loss on a CPU; benchmarks/README.md) fits ``--reference-max-mb``.

One point = one fresh process: ``LFQ(dim=K, codebook_size=2**K)`` (no projections, entropy_loss_weight 0.1,
diversity_gamma 1), an input of ``--tokens`` tokens that requires grad, and a training step (forward, the loss
``mean(quantized) + aux_loss``, backward) as in ``_worker.py``. After one warm-up step, the peak memory of one
step over what the process held before it (``_worker.measure_memory``: VmHWM after clear_refs minus VmRSS
before), then up to ``--repeats`` timed steps (median wall-clock time, and in the JSON the median CPU time of the
process, ``cpu_ms``; fewer steps when a step is slow, see ``--point-seconds``).
Points run with one torch thread (``--threads``): on a shared 2-core machine two threads wait for each other and a
10 ms step can take 500 ms.

Usage (from the repository root)::

    python benchmarks/lfq_entropy_scaling.py --reference-python ~/ref-venv/bin/python
    python benchmarks/lfq_entropy_scaling.py --bits 10 16 24 32 --no-reference     # a few points, ours only
    python benchmarks/lfq_entropy_scaling.py --from-json benchmarks/results/lfq_entropy_scaling.json  # replot

Prints a markdown table, writes JSON (``--out``) and the plot (``--image``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
DEFAULT_OUT = BENCHMARKS_DIR / "results" / "lfq_entropy_scaling.json"
DEFAULT_IMAGE = BENCHMARKS_DIR / "images" / "lfq_entropy_scaling.png"
SERIES = ("exact", "bound", "reference")
OURS_EXACT_MAX_BITS = 24  # EXACT_CODE_ENTROPY_MAX_BITS, the default of --exact-max-bits
REFERENCE_MEMORY_FACTOR = 7  # reference peak ~ 7 x tokens x 2^K x 4 bytes (measured on a CPU)
RESULT_PREFIX = "LFQ_SCALING_RESULT "


# ---------------------------------------------------------------- one point, in a fresh process


def force_grouped_bound() -> int:
    """Make LFQ use the grouped bound at every K; returns the bound's group size."""
    from vector_quantize_pytorch.core import entropy

    entropy.EXACT_CODE_ENTROPY_MAX_BITS = 0
    return entropy.BOUND_GROUP_MAX_BITS


def allow_exact(bits: int) -> bool:
    """Make LFQ compute the exact batch entropy at ``bits``; True when the package's limit had to be raised."""
    from vector_quantize_pytorch.core import entropy

    if bits <= entropy.EXACT_CODE_ENTROPY_MAX_BITS:
        return False
    entropy.EXACT_CODE_ENTROPY_MAX_BITS = bits
    return True


def entropy_groups(series: str, bits: int) -> int | None:
    """How many bit groups our batch entropy sums at this K (1 = the exact entropy)."""
    if series == "reference":
        return None
    from vector_quantize_pytorch.core import entropy

    return len(entropy.bit_groups(bits, entropy.EXACT_CODE_ENTROPY_MAX_BITS, entropy.BOUND_GROUP_MAX_BITS))


def measure_point(series: str, bits: int, tokens: int, repeats: int, point_seconds: float, threads) -> dict:
    sys.path.insert(0, str(BENCHMARKS_DIR))
    import torch
    from _worker import import_package, make_step, measure_memory

    if threads:
        torch.set_num_threads(threads)
    ours = series != "reference"
    if ours:
        sys.path.insert(0, str(REPO_ROOT))
    package, location = import_package(str(REPO_ROOT), expect_repo=ours)
    result = {"series": series, "bits": bits, "tokens": tokens, "package_file": location}
    if series == "exact":
        result["exact_limit_raised"] = allow_exact(bits)
    if series == "bound":
        force_grouped_bound()
    result["entropy_groups"] = entropy_groups(series, bits)

    torch.manual_seed(0)
    lfq = package.LFQ(dim=bits, codebook_size=2**bits, entropy_loss_weight=0.1, diversity_gamma=1.0)
    x = torch.randn(1, tokens, bits).requires_grad_()
    step = make_step(lfq, (x,), "train")
    start = time.perf_counter()
    step()  # warm-up
    warmup_s = time.perf_counter() - start
    result.update(measure_memory(step, torch.device("cpu")))
    times, cpu_times = [], []
    budget_start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - budget_start + times[-1] < point_seconds):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result.update(warmup_ms=warmup_s * 1000, times_ms=[t * 1000 for t in times])
    result["time_ms"] = statistics.median(result["times_ms"])
    result["cpu_ms"] = statistics.median(t * 1000 for t in cpu_times)  # less sensitive to a busy machine
    result["threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------- the sweep


def predicted_reference_mb(bits: int, tokens: int) -> float:
    return REFERENCE_MEMORY_FACTOR * tokens * 2**bits * 4 / 2**20


def run_point(python: str, series: str, bits: int, args) -> dict:
    """Run one point in a fresh process; the reference from a temporary directory, off the repository path."""
    command = [python, str(Path(__file__).resolve()), "--point", series, "--bits", str(bits)]
    command += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    command += ["--point-seconds", str(args.point_seconds)]
    command += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as cwd:
        try:
            done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"series": series, "bits": bits, "status": "timeout", "error": f"over {args.timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    message = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"series": series, "bits": bits, "status": "error", "error": f"exit {done.returncode}: {message}"}


def plan(args) -> list[tuple[str, int, str | None]]:
    """(series, bits, reason to skip or None) for every point of the sweep."""
    points = []
    for bits in args.bits:
        too_slow = f"exact measured up to {args.exact_max_bits} bits (--exact-max-bits)"
        points.append(("exact", bits, None if bits <= args.exact_max_bits else too_slow))
        points.append(("bound", bits, None))
        if args.reference_python:
            too_big = predicted_reference_mb(bits, args.tokens) > args.reference_max_mb
            points.append(("reference", bits, f"predicted > {args.reference_max_mb:.0f} MB" if too_big else None))
    return points


def cell(result: dict | None, key: str, fmt: str) -> str:
    if result is None:
        return ""
    if result.get("status") == "skipped":
        return "—"
    if result.get("status") != "ok":
        return result.get("status", "")
    return format(result[key], fmt)


def markdown_table(results: list[dict], bits_list: list[int]) -> str:
    by_key = {(r["series"], r["bits"]): r for r in results}
    header = "| bits K | exact MB | exact ms | bound groups | bound MB | bound ms | reference MB | reference ms |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bits in bits_list:
        exact, bound, ref = (by_key.get((s, bits)) for s in SERIES)
        groups = str(bound.get("entropy_groups", "")) if bound and bound.get("status") == "ok" else ""
        row = [str(bits), cell(exact, "peak_mb", ".1f"), cell(exact, "time_ms", ".0f"), groups]
        row += [cell(bound, "peak_mb", ".1f"), cell(bound, "time_ms", ".0f")]
        row += [cell(ref, "peak_mb", ".0f"), cell(ref, "time_ms", ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: list[dict], tokens: int, threads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"exact": ("ours, exact batch entropy", "o-"), "bound": ("ours, grouped bound", "s-")}
    styles["reference"] = ("reference 1.32.0", "^--")
    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for series, (label, style) in styles.items():
        points = sorted((r["bits"], r) for r in results if r["series"] == series and r.get("status") == "ok")
        if not points:
            continue
        bits = [b for b, _ in points]
        memory_axis.plot(bits, [max(r["peak_mb"], 0.1) for _, r in points], style, label=label)
        time_axis.plot(bits, [r["time_ms"] for _, r in points], style, label=label)
    for axis, ylabel in ((memory_axis, "peak extra memory of one step (MiB)"), (time_axis, "time of one step (ms)")):
        axis.set_yscale("log")
        axis.set_xlabel("bits K (codebook size 2^K)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    threads_text = f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads"
    figure.suptitle(f"LFQ training step with entropy loss, {tokens} tokens, CPU, {threads_text}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(10, 33, 2)), help="K values (10 ... 32)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    parser.add_argument("--reference-python", help="interpreter with the reference installed (~/ref-venv/bin/python)")
    parser.add_argument("--no-reference", action="store_true", help="ours only")
    parser.add_argument(
        "--exact-max-bits", type=int, default=OURS_EXACT_MAX_BITS, help="largest K of the exact series (time ~ 2^K)"
    )
    parser.add_argument("--reference-max-mb", type=float, default=8192, help="skip reference points predicted above")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (at most)")
    parser.add_argument("--point-seconds", type=float, default=30, help="stop timing a point after this long")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per point process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="PNG plot")
    parser.add_argument("--from-json", type=Path, help="no measuring: table and plot from an earlier --out file")
    parser.add_argument("--point", choices=SERIES, help=argparse.SUPPRESS)  # internal: measure one point
    args = parser.parse_args(argv)
    if args.no_reference:
        args.reference_python = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.point:
        (bits,) = args.bits
        result = measure_point(args.point, bits, args.tokens, args.repeats, args.point_seconds, args.threads)
        print(RESULT_PREFIX + json.dumps({"status": "ok", **result}), flush=True)
        return 0

    if args.from_json:
        report = json.loads(args.from_json.read_text())
        bits_list = sorted({r["bits"] for r in report["results"]})
        plot(report["results"], report["tokens"], report.get("threads", 0), args.image)
        print(markdown_table(report["results"], bits_list))
        return 0

    results = []
    for series, bits, skip in plan(args):
        if skip:
            results.append({"series": series, "bits": bits, "status": "skipped", "reason": skip})
            continue
        python = args.reference_python if series == "reference" else sys.executable
        print(f"{series} K={bits} ...", file=sys.stderr, flush=True)
        result = run_point(python, series, bits, args)
        results.append(result)
        summary = cell(result, "peak_mb", ".1f") + " MB, " + cell(result, "time_ms", ".0f") + " ms"
        print(f"    {summary if result.get('status') == 'ok' else result}", file=sys.stderr, flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "threads": args.threads, "results": results}, indent=1))
    plot(results, args.tokens, args.threads, args.image)
    print(markdown_table(results, args.bits))
    failed = [r for r in results if r["series"] != "reference" and r.get("status") not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
