"""The floor of an eager nearest-code search on a CPU: what its kernels cost alone, against faiss's fused loop.

One nearest-code search, or one greedy layer of a residual quantizer, is a matrix product and a row maximum:
``nearest_codes`` computes ``x.c - ||c||^2 / 2`` with one ``addmm`` and takes each row's first maximum. This
script times, for each problem ``(tokens N, codes K, dim d)``, the search and each kernel it is made of on the
same inputs, so that the search's time can be read against the sum of its kernels:

- ``nearest_codes``: the library's search (one call, chunked by the device's policy);
- ``addmm``: the scores with the bias folded in; ``mm``: the product alone;
- ``max``: the row maxima with their positions, of scores computed beforehand; ``amax``: without positions
  (a vectorised reduction, the lower bound of a row maximum on this CPU);
- ``addmm + max``: the bare search step, no chunking, no bookkeeping;
- ``compiled`` (``--compile``): ``torch.compile`` of ``argmax(mm + bias)``, Inductor's fused kernel;
- ``faiss``: ``IndexFlatL2.search(x, 1)``, the distances and a vectorised minimum in one loop (skipped, with
  a note, when faiss is not installed: ``pip install faiss-cpu``).

Every variant runs in one process, ``--rounds`` rounds in a rotated order, ``--repeats`` calls per round after
one untimed call; the table gives the median over rounds of each round's median (ms) and its ratio to faiss.
The indices of ``nearest_codes``, ``addmm + max``, ``compiled`` and faiss are compared.

Usage (from the repository root)::

    python benchmarks/search_floor.py                    # greedy layer (5000x256x32) and nearest (16384x8192x128)
    python benchmarks/search_floor.py --compile --threads 2
    python benchmarks/search_floor.py --shapes 5000x1024x64 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vector_quantize_pytorch.core import search  # noqa: E402

DEFAULT_SHAPES = ["5000x256x32", "16384x8192x128"]


def variants(x: torch.Tensor, codes: torch.Tensor, compile_step: bool) -> dict:
    """Name -> a call returning the indices it found (None for the kernels that find none)."""
    bias = codes.pow(2).sum(-1) * -0.5
    scores = torch.addmm(bias, x, codes.t())

    def kernel(call):  # timed for its cost only: it finds no indices
        def run():
            call()

        return run

    calls = {
        "nearest_codes": lambda: search.nearest_codes(x.unsqueeze(0), codes.unsqueeze(0))[0],
        "addmm": kernel(lambda: torch.addmm(bias, x, codes.t())),
        "mm": kernel(lambda: torch.mm(x, codes.t())),
        "max": kernel(lambda: scores.max(-1)),
        "amax": kernel(lambda: scores.amax(-1)),
        "addmm + max": lambda: torch.addmm(bias, x, codes.t()).max(-1).indices,
    }
    if compile_step:
        fused = torch.compile(lambda x, codes, bias: (torch.mm(x, codes.t()) + bias).argmax(-1), dynamic=False)
        calls["compiled"] = lambda: fused(x, codes, bias)
    faiss_search = faiss_call(x, codes)
    if faiss_search is not None:
        calls["faiss"] = faiss_search
    return calls


def faiss_call(x: torch.Tensor, codes: torch.Tensor):
    """``IndexFlatL2.search(x, 1)`` on the same arrays, or None without faiss."""
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(codes.shape[1])
    index.add(codes.numpy())
    queries = x.numpy()
    return lambda: torch.from_numpy(index.search(queries, 1)[1][:, 0])


def median_ms(call, repeats: int) -> float:
    """Median wall time in ms of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(calls: dict, rounds: int, repeats: int) -> dict:
    """Name -> median over rounds of the per-round median ms; each round runs the variants in a rotated order."""
    names, found = list(calls), {name: [] for name in calls}
    for name in names:  # warm-up (and compilation)
        calls[name]()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            found[name].append(median_ms(calls[name], repeats))
    return {name: statistics.median(times) for name, times in found.items()}


def agreement(calls: dict) -> str:
    """Whether every variant that finds indices finds the same ones."""
    results = {name: call() for name, call in calls.items()}
    found = {name: out for name, out in results.items() if out is not None}
    first = next(iter(found.values()))
    same = all(torch.equal(out.long(), first.long()) for out in found.values())
    return ("identical" if same else "DIFFERENT") + " indices: " + ", ".join(found)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxKxd problems")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile's fused argmax")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    print(f"torch {torch.__version__}, {args.threads} thread(s); median ms over {args.rounds} rounds of {args.repeats}")
    for shape in args.shapes:
        num_tokens, num_codes, dim = (int(v) for v in shape.split("x"))
        x = torch.randn(num_tokens, dim, generator=generator)
        codes = torch.randn(num_codes, dim, generator=generator)
        calls = variants(x, codes, args.compile)
        times = measure(calls, args.rounds, args.repeats)
        print(f"\nN x K x d = {shape}: {agreement(calls)}" + ("" if "faiss" in calls else " (faiss not installed)"))
        print("\n| kernel | ms | x faiss |\n|---|---:|---:|")
        for name, ms in times.items():
            ratio = f"{ms / times['faiss']:.2f}" if "faiss" in times else "n/a"
            print(f"| {name} | {ms:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
