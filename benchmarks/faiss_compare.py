"""Search speed against faiss (CPU) on identical codebooks and inputs, with identical codes.

Workloads (``--quick``: tiny sizes, a smoke test whose numbers mean nothing):

- ``nearest``: the nearest of ``K`` codes for ``N`` vectors: ``VectorQuantize`` in eval mode (forward, no
  gradient) against ``faiss.IndexFlatL2.search(x, 1)``.
- ``rvq``: residual encoding through ``M`` layers of ``K`` codes: ``ResidualVQ`` in eval mode against
  ``faiss.ResidualQuantizer.compute_codes``, greedily (beam 1) or with a beam of 4 (faiss's
  ``max_beam_size``; ``ResidualVQ``'s ``eval_beam_size``, whose default score is faiss's). faiss runs with and
  without its look-up tables (``use_beam_LUT``, the tables built beforehand by ``compute_codebook_tables``);
  its faster setting is reported.

Data: ``tanh(z A) + 0.1 noise`` with ``z`` of rank ``d / 4`` (seeded). Residual codebooks: each layer's codes
are residuals of a disjoint sample of 20k training vectors, refined by 4 Lloyd iterations. Both sides read
the same arrays (an ``.npz`` file).

Every measurement is a fresh process (``--worker``) that sets the thread count (``torch.set_num_threads``,
``faiss.omp_set_num_threads``, ``OMP_NUM_THREADS``), runs ``--warmup`` untimed calls and ``--repeats`` timed
ones and reports their median. Both sides run with ``OMP_WAIT_POLICY=PASSIVE`` by default (``--wait-policy``):
on a shared machine an OpenMP thread that spins while its partner is descheduled slows either side down
several times over, torch's many short parallel regions most. ``--rounds`` rounds alternate the order of the
two sides; the table gives the median over rounds, the ratio of the medians and the range of the per-round
ratios. Codes and MSE come from the last round of each side: "codes identical" compares every index of every
vector.

Usage (from the repository root, with ``pip install faiss-cpu`` or ``pip install -e .[bench]``)::

    python benchmarks/faiss_compare.py --readme          # measure, print, write README table and plot
    python benchmarks/faiss_compare.py --readme --threads 1
    python benchmarks/faiss_compare.py --only rvq --rounds 3
    python benchmarks/faiss_compare.py --quick           # tiny sizes (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
README = BENCHMARKS_DIR / "README.md"
IMAGES = BENCHMARKS_DIR / "images"
RESULT_PREFIX = "FAISS_COMPARE_RESULT "

# (name, kind, tokens N, dim d, layers M, codes K, beam)
WORKLOADS = [
    ("nearest N16384 d128 K8192", "nearest", 16384, 128, 1, 8192, 1),
    ("rvq greedy d32 8x256", "rvq", 5000, 32, 8, 256, 1),
    ("rvq beam4 d32 8x256", "rvq", 5000, 32, 8, 256, 4),
    ("rvq beam4 d64 4x1024", "rvq", 5000, 64, 4, 1024, 4),
    ("rvq beam4 d64 8x1024", "rvq", 5000, 64, 8, 1024, 4),
    ("rvq beam4 d128 4x1024", "rvq", 5000, 128, 4, 1024, 4),
    ("rvq beam4 d128 8x1024", "rvq", 5000, 128, 8, 1024, 4),
]
QUICK = [
    ("nearest N64 d8 K32", "nearest", 64, 8, 1, 32, 1),
    ("rvq greedy d8 3x16", "rvq", 50, 8, 3, 16, 1),
    ("rvq beam4 d8 3x16", "rvq", 50, 8, 3, 16, 4),
]


# ---------------------------------------------------------------------------------------------------------------
# problems


def make_problem(kind: str, tokens: int, dim: int, layers: int, codes: int, seed: int = 0) -> dict:
    """Inputs ``x`` ``(N, d)`` and codebooks ``(M, K, d)`` as float32 numpy arrays (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(max(2, dim // 4), dim, generator=g)

    def data(n):
        return torch.tanh(torch.randn(n, mixing.shape[0], generator=g) @ mixing) + 0.1 * torch.randn(
            n, dim, generator=g
        )

    x = data(tokens)
    if kind == "nearest":
        books = data(codes).unsqueeze(0)
    else:
        books = residual_codebooks(data(max(20000, 4 * codes)), layers, codes, g)
    return {"x": x.numpy(), "codebooks": books.numpy()}


def residual_codebooks(train, layers: int, codes: int, generator, iterations: int = 4):
    """Greedy residual codebooks: per layer, codes drawn from a disjoint sample of the residuals, then Lloyd."""
    import torch

    residual, books = train.clone(), []
    for _ in range(layers):
        book = residual[torch.randperm(len(residual), generator=generator)[:codes]].clone()
        for _ in range(iterations):
            nearest = torch.cdist(residual, book).argmin(1)
            sums = torch.zeros_like(book).index_add_(0, nearest, residual)
            counts = torch.bincount(nearest, minlength=codes).unsqueeze(1)
            book = torch.where(counts > 0, sums / counts.clamp(min=1), book)
        books.append(book)
        residual = residual - book[torch.cdist(residual, book).argmin(1)]
    return torch.stack(books)


# ---------------------------------------------------------------------------------------------------------------
# workers: one measurement in a fresh process


def timed(call, warmup: int, repeats: int) -> list:
    import time

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def ours(problem: dict, kind: str, beam: int, args) -> dict:
    """Time our module; return times, codes ``(N, M)`` and the MSE (squared error summed over features)."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    torch.set_num_threads(args.threads)
    x, books = torch.from_numpy(problem["x"]), torch.from_numpy(problem["codebooks"])
    layers, size, dim = books.shape
    if kind == "nearest":
        module = VectorQuantize(dim=dim, codebook_size=size).eval()
        targets = [module]
    else:
        module = ResidualVQ(dim=dim, num_quantizers=layers, codebook_size=size, eval_beam_size=beam).eval()
        targets = list(module.layers)
    with torch.no_grad():
        for target, book in zip(targets, books):
            target._codebook.embed.copy_(book.unsqueeze(0))
        call = lambda: module(x.unsqueeze(0))  # noqa: E731
        times = timed(call, args.warmup, args.repeats)
        quantized, indices = call()[:2]
    indices = indices.reshape(len(x), -1)
    return {"times": times, "codes": indices.numpy(), "mse": float((quantized[0] - x).pow(2).sum(-1).mean())}


def unpack_codes(packed, layers: int, bits: int):
    """faiss's packed codes (``bits`` per index, least significant bit first) -> ``(N, M)`` int64."""
    import numpy as np

    flat = np.unpackbits(packed, axis=1, bitorder="little")[:, : layers * bits].reshape(len(packed), layers, bits)
    return (flat.astype(np.int64) << np.arange(bits)).sum(-1)


def theirs(problem: dict, kind: str, beam: int, args) -> dict:
    """Time faiss; for the residual quantizer the faster of its two encoders (with and without tables)."""
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(args.threads)
    x, books = problem["x"], problem["codebooks"]
    layers, size, dim = books.shape
    if kind == "nearest":
        index = faiss.IndexFlatL2(dim)
        index.add(books[0])
        times = timed(lambda: index.search(x, 1), args.warmup, args.repeats)
        codes = index.search(x, 1)[1]
        return {"times": times, "codes": codes, "mse": float(((x - books[0][codes[:, 0]]) ** 2).sum(-1).mean())}
    bits = int(size).bit_length() - 1
    quantizer = faiss.ResidualQuantizer(dim, layers, bits)
    faiss.copy_array_to_vector(np.ascontiguousarray(books).ravel(), quantizer.codebooks)
    quantizer.is_trained, quantizer.max_beam_size = True, beam
    quantizer.compute_codebook_tables()
    best = None
    for lut in (0, 1):
        quantizer.use_beam_LUT = lut
        times = timed(lambda: quantizer.compute_codes(x), args.warmup, args.repeats)
        if best is None or statistics.median(times) < statistics.median(best[0]):
            best = (times, lut)
    quantizer.use_beam_LUT = best[1]
    packed = quantizer.compute_codes(x)
    mse = float(((x - quantizer.decode(packed)) ** 2).sum(-1).mean())
    return {"times": best[0], "codes": unpack_codes(packed, layers, bits), "mse": mse, "setting": f"LUT={best[1]}"}


def run_worker(args) -> int:
    import numpy as np

    problem = dict(np.load(args.problem))
    result = (ours if args.side == "ours" else theirs)(problem, args.kind, args.beam, args)
    np.save(args.codes_out, np.asarray(result.pop("codes"), dtype=np.int64))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# driver


def measure(side: str, kind: str, beam: int, problem_path: Path, codes_path: Path, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.wait_policy.upper()
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--side", side, "--kind", kind]
    command += ["--beam", str(beam), "--problem", str(problem_path), "--codes-out", str(codes_path)]
    command += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} worker failed ({kind}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def compare(workload, args, workdir: Path) -> dict:
    """Measure one workload, alternating the two sides over ``args.rounds`` rounds."""
    import numpy as np

    name, kind, tokens, dim, layers, size, beam = workload
    problem_path = workdir / "problem.npz"
    np.savez(problem_path, **make_problem(kind, tokens, dim, layers, size))
    medians = {"ours": [], "faiss": []}
    last = {}
    for round_index in range(args.rounds):
        order = ("ours", "faiss") if round_index % 2 == 0 else ("faiss", "ours")
        for side in order:
            result = measure(side, kind, beam, problem_path, workdir / f"{side}.npy", args)
            medians[side].append(statistics.median(result["times"]))
            last[side] = result
        print(f"  {name}: round {round_index + 1}: ours {medians['ours'][-1]:.1f} ms, "
              f"faiss {medians['faiss'][-1]:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
    codes = {side: np.load(workdir / f"{side}.npy") for side in medians}
    differing = (
        int((codes["ours"] != codes["faiss"]).any(-1).sum()) if codes["ours"].shape == codes["faiss"].shape else -1
    )
    ratios = [o / f for o, f in zip(medians["ours"], medians["faiss"])]
    return dict(
        workload=name,
        ours_ms=statistics.median(medians["ours"]),
        faiss_ms=statistics.median(medians["faiss"]),
        ratio=statistics.median(medians["ours"]) / statistics.median(medians["faiss"]),
        ratio_range=(min(ratios), max(ratios)),
        differing_rows=differing,
        vectors=tokens,
        mse_ours=last["ours"]["mse"],
        mse_faiss=last["faiss"]["mse"],
        faiss_setting=last["faiss"].get("setting", ""),
    )


def markdown(results: list, args) -> str:
    header = "| workload | ours ms | faiss ms | ratio (ours/faiss) | per-round ratios | codes identical | MSE ours "
    lines = [header + "| MSE faiss |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        same = "yes" if r["differing_rows"] == 0 else f"no ({r['differing_rows']} of {r['vectors']} vectors)"
        setting = f" ({r['faiss_setting']})" if r["faiss_setting"] else ""
        low, high = r["ratio_range"]
        lines.append(
            f"| {r['workload']} | {r['ours_ms']:.1f} | {r['faiss_ms']:.1f}{setting} | {r['ratio']:.2f} | "
            f"{low:.2f}-{high:.2f} | {same} | {r['mse_ours']:.5g} | {r['mse_faiss']:.5g} |"
        )
    lines.append("")
    lines.append(
        f"{args.threads} thread{'s' if args.threads > 1 else ''} each (OMP_WAIT_POLICY {args.wait_policy}), "
        f"median of {args.repeats} calls per "
        f"process, {args.rounds} rounds."
    )
    return "\n".join(lines)


def plot(results: list, path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    names = [r["workload"] for r in results]
    ratios = [r["ratio"] for r in results]
    low = [r["ratio"] - r["ratio_range"][0] for r in results]
    high = [r["ratio_range"][1] - r["ratio"] for r in results]
    colors = ["tab:green" if ratio <= 1 else "tab:red" for ratio in ratios]
    ax.barh(names, ratios, xerr=[low, high], color=colors, capsize=3)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("time ours / faiss (lower is faster; bars: median, whiskers: per-round range)")
    ax.set_title(f"Search against faiss-cpu, {threads} thread{'s' if threads > 1 else ''}, identical codes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme(table: str, command: str, plot_path: Path, threads: int) -> None:
    """Put the command, table and plot between this thread count's markers in README.md (a new block at the end
    of the file when they are missing)."""
    begin, end = f"<!-- faiss_compare:begin threads={threads} -->", f"<!-- faiss_compare:end threads={threads} -->"
    text = README.read_text()
    image = plot_path.relative_to(BENCHMARKS_DIR).as_posix()
    block = f"{begin}\n\n```text\n{command}\n```\n\n{table}\n\n![ratios]({image})\n\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    README.write_text(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: checks that everything runs")
    parser.add_argument("--only", action="append", default=[], help="workloads whose name contains this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--wait-policy",
        choices=("passive", "active", "default"),
        default="passive",
        help="OMP_WAIT_POLICY of both sides (passive: idle threads sleep, so a busy shared machine does not "
        "make them spin; default: leave the environment alone)",
    )
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument(
        "--png", type=Path, default=None, help="plot path (with --readme: images/faiss_compare_<N>t.png)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("ours", "faiss"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("nearest", "rvq"), help=argparse.SUPPRESS)
    parser.add_argument("--beam", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--problem", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--codes-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("faiss is not installed: pip install faiss-cpu (or pip install -e .[bench])", file=sys.stderr)
        return 3
    workloads = QUICK if args.quick else WORKLOADS
    if args.quick:
        args.rounds, args.repeats, args.warmup = 1, 1, 1
    workloads = [w for w in workloads if not args.only or any(part in w[0] for part in args.only)]
    if not workloads:
        print("no workload matches --only", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for workload in workloads:
            results.append(compare(workload, args, Path(workdir)))
    table = markdown(results, args)
    print(table)
    png = args.png or (IMAGES / f"faiss_compare_{args.threads}t.png" if args.readme else None)
    if png is not None:
        plot(results, png, args.threads)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    if args.readme:
        command = "python benchmarks/faiss_compare.py --readme" + (
            "" if args.threads == 2 else f" --threads {args.threads}"
        )
        write_readme(table, command, png, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
