"""How the nearest-code search's chunk budget affects its speed: the measurement behind CPU_POLICY.search_scores.

``nearest_codes`` computes the scores of a chunk of tokens against (a chunk of) the codes with one matrix
product into a reused buffer, then the row maxima. This script times one call for several problem shapes
``(tokens N, codes K, dim d)`` and several budgets ``max_scores = 2^b`` (scores per chunk; codes are split
when fewer than ``MIN_TOKEN_CHUNK`` tokens fit beside all of them), and prints a markdown table of the best
CPU time of ``--repeats`` calls in milliseconds (CPU time of this thread, so that other processes on a shared
machine disturb it little; use ``--threads 1``, the default).

Usage (from the repository root)::

    python benchmarks/search_chunks.py
    python benchmarks/search_chunks.py --budgets 19 20 21 --shapes 4096x65536x64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vector_quantize_pytorch.core import search  # noqa: E402

DEFAULT_SHAPES = ["16384x8192x128", "4096x16384x256", "4096x65536x64", "4096x4096x256", "4096x1024x256"]


def best_cpu_ms(x: torch.Tensor, codes: torch.Tensor, max_scores: int, repeats: int) -> float:
    """Best CPU time of this thread, in ms, of ``repeats`` searches (after one untimed call)."""
    search.nearest_codes(x, codes, max_scores=max_scores)
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        search.nearest_codes(x, codes, max_scores=max_scores)
        times.append(time.thread_time() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxKxd problems")
    parser.add_argument("--budgets", nargs="+", type=int, default=[17, 18, 19, 20, 21, 22, 23, 24], help="log2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per nearest_codes call (best of {args.repeats})\n")
    print("| N x K x d | " + " | ".join(f"2^{b}" for b in args.budgets) + " |")
    print("|---|" + "---:|" * len(args.budgets))
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        num_tokens, num_codes, dim = (int(v) for v in shape.split("x"))
        x = torch.randn(1, num_tokens, dim, generator=generator)
        codes = torch.randn(1, num_codes, dim, generator=generator)
        cells = [f"{best_cpu_ms(x, codes, 2**b, args.repeats):.1f}" for b in args.budgets]
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
