"""Compare quantizers on MNIST as the codebook grows: test MSE, codebook usage and perplexity.

Trains the autoencoder of the other examples (``_common.Autoencoder``, same data, loop and metrics) once per
quantizer and codebook size, each run from the same seed, and checks at small scale three published claims:

- FSQ (Mentzer et al. 2023, arXiv 2309.15505) keeps its codebook in use at every size, plain VQ does not;
- SimVQ (Zhu et al. 2024, arXiv 2411.02038) keeps its codebook in use where plain VQ collapses;
- the rotation trick (Fifty et al. 2024, arXiv 2410.06424), with k-means init and dead-code expiry, raises the
  usage of VQ and lowers its quantization error.

Quantizers (``--quantizers``):

- ``vq-ste``: ``VectorQuantize`` with the straight-through estimator, EMA codebook, random init, no expiry;
- ``vq-rot``: ``VectorQuantize`` with the rotation trick, k-means init and dead-code expiry (threshold 2);
- ``simvq``: ``SimVQ``, a frozen random codebook seen through one learned linear map;
- ``fsq``: ``FSQ`` with the levels of the FSQ paper's table for about that many codes (e.g. [8, 5, 5, 5]);
- ``lfq``: ``LFQ`` with entropy loss and a soft clamp of its input, as ``autoencoder_lfq.py``.

    python examples/compare.py --threads 1                 # the default 5 quantizers x 3 sizes
    python examples/compare.py --quantizers vq-ste simvq --sizes 1024 8192

Writes ``out/compare/results.md`` (the table), ``results.json`` (the same numbers and the settings) and
``compare.png`` (test MSE and usage against the codebook size); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from _common import (
    Autoencoder,
    Example,
    Process,
    add_data_arguments,
    evaluate,
    load_mnist_images,
    parse_positive_counts,
    train,
)

# isort: split
# torch after _common, which sets the OpenMP wait policy before torch loads
import torch
from torch import Tensor, nn

from vector_quantize_pytorch import FSQ, LFQ, SimVQ, VectorQuantize

LATENT_DIM = 32
LEARNING_RATE = 2e-3

# FSQ paper (arXiv 2309.15505), Table 1: levels recommended for about 2^8 ... 2^16 codes
FSQ_LEVELS = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
}

DESCRIPTIONS = {
    "vq-ste": "VQ, straight-through",
    "vq-rot": "VQ, rotation trick + k-means + expiry",
    "simvq": "SimVQ",
    "fsq": "FSQ",
    "lfq": "LFQ",
}
# quantizers whose output approximates their input, so that ||z - q||^2 / ||z||^2 means something
QUANTIZE_IN_LATENT_SPACE = {"vq-ste", "vq-rot", "simvq"}

DEFAULT_QUANTIZERS = list(DESCRIPTIONS)
DEFAULT_SIZES = [2**8, 2**10, 2**12]
DEFAULT_STEPS = 800


# ------------------------------------------------------------------------------------------ quantizers


def returns_aux_loss(quantizer: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adapter of the quantizers that return ``(quantized, indices, aux_loss)``."""
    return quantizer(z)


def no_aux_loss(quantizer: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adapter of FSQ, which returns ``(quantized, indices)``."""
    quantized, indices = quantizer(z)
    return quantized, indices, z.new_zeros(())


def check_size(name: str, size: int) -> str | None:
    """Why ``name`` cannot have ``size`` codes, or None when it can."""
    if name == "fsq" and size not in FSQ_LEVELS:
        return f"fsq takes a codebook size from the FSQ paper's table {sorted(FSQ_LEVELS)}, got {size}"
    if name == "lfq" and (size < 2 or size & (size - 1)):
        return f"lfq needs a power of 2 of at least 2 codes, got {size}"
    if size < 2:
        return f"{name} needs at least 2 codes, got {size}"
    return None


def make_example(name: str, size: int) -> Example:
    """The :class:`Example` of quantizer ``name`` with ``size`` codes (FSQ: the levels its paper gives for it)."""
    if name == "vq-ste":
        make = lambda dim: VectorQuantize(dim, size, accept_image_fmap=True, rotation_trick=False)
        return Example(f"{name}-{size}", make, returns_aux_loss, size, dim=LATENT_DIM, lr=LEARNING_RATE)
    if name == "vq-rot":
        make = lambda dim: VectorQuantize(
            dim, size, accept_image_fmap=True, rotation_trick=True, kmeans_init=True, threshold_ema_dead_code=2
        )
        return Example(f"{name}-{size}", make, returns_aux_loss, size, dim=LATENT_DIM, lr=LEARNING_RATE)
    if name == "simvq":
        make = lambda dim: SimVQ(dim=dim, codebook_size=size, channel_first=True)
        return Example(f"{name}-{size}", make, returns_aux_loss, size, dim=LATENT_DIM, lr=LEARNING_RATE)
    if name == "fsq":
        levels = FSQ_LEVELS[size]
        make = lambda dim: FSQ(levels=levels, dim=dim)  # a (b, dim, 7, 7) input is taken as channel-first
        return Example(f"{name}-{size}", make, no_aux_loss, math.prod(levels), dim=LATENT_DIM, lr=LEARNING_RATE)
    if name == "lfq":
        make = lambda dim: LFQ(
            dim=dim, codebook_size=size, entropy_loss_weight=0.1, diversity_gamma=1.0, soft_clamp_input_value=4.0
        )
        return Example(f"{name}-{size}", make, returns_aux_loss, size, dim=LATENT_DIM, lr=LEARNING_RATE)
    raise ValueError(f"unknown quantizer {name!r}; expected one of {', '.join(DESCRIPTIONS)}")


# ---------------------------------------------------------------------------------------------- runs


@torch.no_grad()
def quantization_error(model: Autoencoder, images: Tensor, device: torch.device, batch_size: int = 500) -> float:
    """``sum ||z - q||^2 / sum ||z||^2`` over ``images``: the share of the latent's energy lost by quantizing."""
    model.eval()
    error = torch.zeros((), dtype=torch.float64)
    energy = torch.zeros((), dtype=torch.float64)
    for chunk in images.split(batch_size):
        z = model.encoder(chunk.to(device))
        quantized, _, _ = model.quantize(model.quantizer, z)
        error += (quantized.double() - z.double()).pow(2).sum().cpu()
        energy += z.double().pow(2).sum().cpu()
    return (error / energy).item()


def run_one(name: str, size: int, args: argparse.Namespace, train_images: Tensor, test_images: Tensor) -> dict:
    """Train and test the autoencoder with one quantizer; returns its row of the results."""
    process = Process(rank=0, world_size=1, device=torch.device(args.device))
    torch.manual_seed(args.seed)  # every run starts from the same seed, whatever ran before it
    example = make_example(name, size)
    model = Autoencoder(example.make_quantizer(example.dim), example.quantize, dim=example.dim).to(process.device)

    start = time.perf_counter()
    train(model, train_images, args, example, process)
    train_seconds = time.perf_counter() - start
    metrics, _ = evaluate(model, test_images, example, process)
    error = quantization_error(model, test_images, process.device) if name in QUANTIZE_IN_LATENT_SPACE else None
    return {
        "quantizer": name,
        "description": DESCRIPTIONS[name],
        "requested_size": size,
        "codebook_size": example.codebook_size,
        "test_mse": metrics["test_mse"],
        "usage": metrics["usage"],
        "perplexity": metrics["perplexity"],
        "quantization_error": error,
        "train_seconds": round(train_seconds, 1),
    }


# -------------------------------------------------------------------------------------------- outputs


def results_table(rows: list[dict]) -> str:
    """Markdown table of the results, one row per quantizer and size."""
    lines = [
        "| quantizer | codebook size | test MSE | usage % | perplexity | ‖z − q‖² / ‖z‖² | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        error = "n/a" if row["quantization_error"] is None else f"{row['quantization_error']:.3f}"
        lines.append(
            f"| {row['description']} | {row['codebook_size']} | {row['test_mse']:.5f} | {100 * row['usage']:.1f} "
            f"| {row['perplexity']:.1f} | {error} | {row['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def results_markdown(rows: list[dict], settings: dict) -> str:
    header = (
        f"# Quantizer comparison on MNIST\n\n"
        f"`{settings['command']}`\n\n"
        f"{settings['steps']} steps of batch {settings['batch_size']}, Adam lr {settings['lr']}, seed "
        f"{settings['seed']}, {settings['train_images']} training and {settings['test_images']} test images, "
        f"latent 7 x 7 x {LATENT_DIM}; torch {settings['torch']} on {settings['device']} "
        f"(`--threads {settings['threads']}`). Usage: share of the codes used at least once over the test images. "
        f"‖z − q‖² / ‖z‖²: share of the latent's energy lost by quantizing (n/a: FSQ and LFQ quantize a "
        f"projection of z).\n\n"
        f"Total wall time {settings['total_seconds']:.0f} s.\n\n"
    )
    return header + results_table(rows) + "\n"


def save_plot(rows: list[dict], path: Path) -> None:
    """Two panels against the codebook size (log2 axis): test MSE and usage, one line per quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mse_ax, usage_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(row["quantizer"] for row in rows):
        own = sorted((row for row in rows if row["quantizer"] == name), key=lambda row: row["codebook_size"])
        sizes = [row["codebook_size"] for row in own]
        label = DESCRIPTIONS[name]
        mse_ax.plot(sizes, [row["test_mse"] for row in own], marker="o", label=label)
        usage_ax.plot(sizes, [100 * row["usage"] for row in own], marker="o", label=label)
    for ax, title in ((mse_ax, "test MSE (lower is better)"), (usage_ax, "codes used on the test set (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    mse_ax.set_yscale("log")
    usage_ax.set_ylim(0, 105)
    handles, labels = mse_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("MNIST autoencoder, 7 x 7 latent: one code per position")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare quantizers on MNIST as the codebook grows.")
    names = ", ".join(DESCRIPTIONS)
    parser.add_argument("--quantizers", nargs="+", default=DEFAULT_QUANTIZERS, choices=list(DESCRIPTIONS),
                        metavar="NAME", help=f"quantizers to train (default: all of {names})")  # fmt: skip
    parser.add_argument("--sizes", nargs="+", type=int, default=DEFAULT_SIZES,
                        help="codebook sizes (default 256 1024 4096; FSQ takes 2^8, 2^10, ..., 2^16)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help=f"Adam learning rate (default {LEARNING_RATE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run's weights and data order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out", type=Path, default=Path("out") / "compare", help="output folder (default out/compare/)"
    )
    add_data_arguments(parser)
    args = parse_positive_counts(parser, argv)
    for name in args.quantizers:
        for size in args.sizes:
            problem = check_size(name, size)
            if problem:
                parser.error(f"--sizes: {problem}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Train every quantizer at every size, then write results.md, results.json and compare.png."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        train_images = load_mnist_images(args.data, "train", args.train_subset)
        test_images = load_mnist_images(args.data, "test", args.test_subset)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None

    start = time.perf_counter()
    rows = []
    for name in dict.fromkeys(args.quantizers):
        for size in sorted(set(args.sizes)):
            rows.append(run_one(name, size, args, train_images, test_images))
            print(results_table(rows[-1:]).splitlines()[-1], flush=True)
    settings = {
        "command": " ".join(["python examples/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": str(args.device),
        "threads": args.threads,
        "torch": torch.__version__,
        "train_images": len(train_images),
        "test_images": len(test_images),
        "total_seconds": round(time.perf_counter() - start, 1),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(results_markdown(rows, settings))
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    save_plot(rows, args.out / "compare.png")
    print(f"wrote {args.out}/results.md, results.json, compare.png in {settings['total_seconds']:.0f} s")
    return rows


if __name__ == "__main__":
    main()
