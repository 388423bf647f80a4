"""Shared parts of the MNIST autoencoder examples: data, model, training loop, evaluation and plots.

Each ``examples/autoencoder*.py`` script describes its quantizer with an :class:`Example` (how to build it, how
to call it, how many codes it has) and hands it to :func:`main`, which trains a small convolutional
autoencoder with that quantizer between encoder and decoder::

    image (b, 1, 28, 28) -> encoder -> z (b, dim, 7, 7) -> quantizer -> decoder -> reconstruction

then reports, on the 10,000 MNIST test images, the reconstruction MSE, the codebook usage (share of codes used
at least once) and the perplexity (exp of the entropy of the code histogram). Multi-codebook indices
(``(b, 7, 7, c)``, e.g. one code per residual layer) are counted per codebook and the two numbers averaged over
the codebooks.

Under ``torchrun --nproc_per_node N`` each process takes 1/N of every batch (``--batch-size`` is the global
batch), the autoencoder is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU) and only rank 0 prints
and writes files.

Needs torch, tqdm and matplotlib; MNIST is read from ``data/mnist`` with gzip (no torchvision, no network).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.util
import inspect
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning made 2 threads 10x slower than 1.
# OpenMP reads it when torch loads, so only a process that has not imported torch yet is changed.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "mnist"

# Use the installed vector_quantize_pytorch, or the one in this checkout when none is installed.
if importlib.util.find_spec("vector_quantize_pytorch") is None and (REPO_ROOT / "vector_quantize_pytorch").is_dir():
    sys.path.insert(0, str(REPO_ROOT))

QuantizeFn = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Example:
    """What an example script tells the shared loop about its quantizer.

    Args:
        name: example name, used for the default output folder ``out/<name>/``.
        make_quantizer: ``dim -> nn.Module``, the quantizer for a ``(b, dim, 7, 7)`` latent.
        quantize: ``(quantizer, z) -> (quantized, indices, aux_loss)`` with ``z`` and ``quantized`` of shape
            ``(b, dim, 7, 7)``, integer ``indices`` of shape ``(b, 7, 7)`` or ``(b, 7, 7, c)`` for ``c``
            codebooks, and a scalar auxiliary loss that is added to the reconstruction loss.
        codebook_size: number of codes of each codebook.
        num_codebooks: ``c`` above (1 when the indices have no codebook axis).
        dim: channels of the latent feature map.
        lr: default learning rate.
        distribute: how to wrap the autoencoder when there are several processes (default: DDP,
            :func:`wrap_data_parallel`); e.g. ``fully_shard`` for FSDP2 (``autoencoder.py --fsdp``).
    """

    name: str
    make_quantizer: Callable[[int], nn.Module]
    quantize: QuantizeFn
    codebook_size: int
    num_codebooks: int = 1
    dim: int = 32
    lr: float = 2e-3
    distribute: Callable[[nn.Module], nn.Module] | None = None


# ----------------------------------------------------------------------------------------------- data


def read_idx(path: Path) -> Tensor:
    """Read a gzipped IDX file of MNIST: images as ``(n, 28, 28)`` uint8, labels as ``(n,)`` uint8."""
    with gzip.open(path, "rb") as f:
        raw = bytearray(f.read())
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if magic == 2049:
        return torch.frombuffer(raw, dtype=torch.uint8, offset=8, count=count).clone()
    if magic != 2051:
        raise ValueError(f"{path}: IDX magic number {magic}, expected 2051 (images) or 2049 (labels)")
    rows, cols = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
    pixels = torch.frombuffer(raw, dtype=torch.uint8, offset=16, count=count * rows * cols)
    return pixels.view(count, rows, cols).clone()


def load_mnist_images(data_dir: Path, split: str, subset: int | None = None) -> Tensor:
    """MNIST images of ``split`` ("train" or "test") as float ``(n, 1, 28, 28)`` in [0, 1]; first ``subset``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    path = Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass --data DIR, a folder with the four MNIST .gz files")
    images = read_idx(path)[:subset]
    return images.unsqueeze(1).float().div_(255.0)


def batch_order(num_items: int, batch_size: int, steps: int, seed: int):
    """Indices of the training batches: a fresh permutation per epoch (from ``seed``), incomplete batches dropped."""
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = num_items // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"--batch-size {batch_size} is larger than the {num_items} training images")
    step = 0
    while True:
        permutation = torch.randperm(num_items, generator=generator)
        for start in range(0, batches_per_epoch * batch_size, batch_size):
            if step == steps:
                return
            yield permutation[start : start + batch_size]
            step += 1


# ---------------------------------------------------------------------------------------------- model


class Autoencoder(nn.Module):
    """Convolutional autoencoder with a quantizer on its 7x7 latent feature map.

    Args:
        quantizer: the quantizer module (registered, so DDP and ``state_dict`` see it).
        quantize: the example's adapter, see :class:`Example`.
        dim: channels of the latent.
        width: channels of the hidden layers.

    Shape:
        ``(b, 1, 28, 28)`` -> reconstruction ``(b, 1, 28, 28)`` in (0, 1), indices ``(b, 7, 7[, c])``,
        auxiliary loss ``()``.
    """

    def __init__(self, quantizer: nn.Module, quantize: QuantizeFn, dim: int = 32, width: int = 32):
        super().__init__()
        half = width // 2
        self.encoder = nn.Sequential(
            nn.Conv2d(1, half, 3, stride=2, padding=1),  # 28 -> 14
            nn.GELU(),
            nn.Conv2d(half, width, 3, stride=2, padding=1),  # 14 -> 7
            nn.GELU(),
            nn.Conv2d(width, dim, 1),
        )
        self.quantizer = quantizer
        self.quantize = quantize
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(width, half, 4, stride=2, padding=1),  # 7 -> 14
            nn.GELU(),
            nn.ConvTranspose2d(half, 1, 4, stride=2, padding=1),  # 14 -> 28
            nn.Sigmoid(),
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, aux_loss = self.quantize(self.quantizer, self.encoder(images))
        return self.decoder(quantized), indices, aux_loss


# -------------------------------------------------------------------------------------------- metrics


def usage_meter(example: Example, device: torch.device, sync: bool | None = None):
    """A :class:`~vector_quantize_pytorch.CodebookUsage` for the example's indices ``(b, 7, 7[, c])``: one histogram
    per codebook, negative indices (dropped or masked positions) not counted, summed over ranks when ``sync``."""
    from vector_quantize_pytorch import CodebookUsage

    codebooks = example.num_codebooks if example.num_codebooks > 1 else ()
    return CodebookUsage(example.codebook_size, codebooks, sync=sync, device=device)


# -------------------------------------------------------------------------------------- distribution


@dataclass(frozen=True)
class Process:
    """Where this process stands: rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_process(device_name: str) -> Process:
    """Join the process group when launched by torchrun (env WORLD_SIZE), else run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process(0, 1, torch.device(device_name))
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(t: Tensor, process: Process) -> Tensor:
    if process.world_size > 1:
        dist.all_reduce(t)
    return t


def wrap_data_parallel(model: nn.Module) -> nn.Module:
    """DistributedDataParallel that does not copy rank 0's buffers over the others' before each forward.

    The quantizers keep their codebook statistics equal on all ranks themselves; :func:`replicas_disagree`
    checks it at the end.
    """
    # the last ConvTranspose2d has 1 output channel: its weight's gradient differs from the weight only in the
    # stride of that size-1 axis, which DDP reports although it is harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:  # newer torch; broadcast_buffers deprecated
        return ddp(model, forward_sync_buffers=False)
    return ddp(model, broadcast_buffers=False)


def replicas_disagree(model: nn.Module, process: Process) -> list[str]:
    """Names of the floating buffers (codebooks, EMA statistics) that differ between ranks."""
    names = []
    for name, buffer in model.named_buffers():
        if process.world_size == 1 or not buffer.is_floating_point():
            continue
        high, low = buffer.detach().clone(), buffer.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.equal(high, low):
            names.append(name)
    return names


# ------------------------------------------------------------------------------------- train and test


def train(model: nn.Module, images: Tensor, args: argparse.Namespace, example: Example, process: Process) -> dict:
    """Train for ``args.steps`` steps; returns the per-step curves of rank 0's shard."""
    from tqdm import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    local_batch = args.batch_size // process.world_size
    curves = {"reconstruction": [], "aux": [], "usage": []}
    batches = batch_order(len(images), args.batch_size, args.steps, args.seed)
    bar = tqdm(batches, total=args.steps, disable=not process.is_main, desc=example.name, dynamic_ncols=True)
    batch_usage = usage_meter(example, process.device, sync=False)  # rank 0's shard of each batch
    model.train()
    for step, batch in enumerate(bar, start=1):
        # every rank takes its own contiguous slice of the global batch
        batch = images[batch[process.rank * local_batch : (process.rank + 1) * local_batch]].to(process.device)
        reconstruction, indices, aux_loss = model(batch)
        reconstruction_loss = F.mse_loss(reconstruction, batch)
        optimizer.zero_grad(set_to_none=True)
        (reconstruction_loss + aux_loss).backward()
        optimizer.step()

        batch_usage.update(indices.detach())
        curves["reconstruction"].append(reconstruction_loss.item())
        curves["aux"].append(float(aux_loss.detach()))
        curves["usage"].append(batch_usage.report(reset=True)["usage"])
        if step % 10 == 0 or step == 1:
            bar.set_postfix(rec=f"{curves['reconstruction'][-1]:.4f}", aux=f"{curves['aux'][-1]:.4f}",
                            used=f"{curves['usage'][-1]:.2f}")  # fmt: skip
    return curves


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, example: Example, process: Process, batch_size: int = 500):
    """Test MSE, usage and perplexity over all of ``images`` (sharded over ranks), and rank 0's first images."""
    model.eval()
    shard = images.tensor_split(process.world_size)[process.rank]
    squared_error = torch.zeros((), dtype=torch.float64, device=process.device)
    usage = usage_meter(example, process.device)
    first = None
    for chunk in shard.split(batch_size):
        chunk = chunk.to(process.device)
        reconstruction, indices, _ = model(chunk)
        squared_error += (reconstruction.double() - chunk.double()).pow(2).sum()
        usage.update(indices)
        if first is None:
            first = (chunk[:32].cpu(), reconstruction[:32].float().cpu())
    all_reduce_sum(squared_error, process)
    report = usage.report()  # summed over ranks
    mse = squared_error.item() / images.numel()
    metrics = {"test_mse": mse, "usage": report["usage"], "perplexity": report["perplexity"]}
    return metrics, first


# ---------------------------------------------------------------------------------------------- plots


RECONSTRUCTION_LABEL_WIDTH = 120  # px left of the grid for the row labels of reconstructions.png


def save_reconstructions(
    originals: Tensor, reconstructions: Tensor, path: Path, per_row: int = 16, scale: int = 2
) -> None:
    """PNG grid: rows of test images, each above the row of their reconstructions, ``scale`` px per pixel.

    Every row is labelled on its left, "input" or "reconstruction", in a margin of
    ``RECONSTRUCTION_LABEL_WIDTH`` px; the grid itself is drawn pixel for pixel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(originals) - len(originals) % per_row or len(originals)
    per_row = min(per_row, count)
    pairs = torch.stack([originals[:count], reconstructions[:count].clamp(0, 1)])  # (2, n, 1, 28, 28)
    pairs = F.pad(pairs, (1, 1, 1, 1), value=1.0)  # white border between digits
    rows = pairs.view(2, count // per_row, per_row, 30, 30).transpose(0, 1)  # (row, original|recon, col, h, w)
    grid = rows.permute(0, 1, 3, 2, 4).reshape(rows.shape[0] * 2 * 30, per_row * 30)
    grid = grid.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)  # nearest-neighbour upscale

    height, width = grid.shape
    margin = RECONSTRUCTION_LABEL_WIDTH
    dpi = 100
    fig = plt.figure(figsize=((margin + width) / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((margin / (margin + width), 0, width / (margin + width), 1))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    row_height = 30 * scale
    for row in range(height // row_height):
        label = "input" if row % 2 == 0 else "reconstruction"
        y = 1 - (row + 0.5) * row_height / height
        fig.text((margin - 8) / (margin + width), y, label, ha="right", va="center", fontsize=9)
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)


def save_curves(curves: dict, path: Path, title: str) -> None:
    """PNG of the training curves: reconstruction loss, auxiliary loss and share of codes in use per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "reconstruction": "reconstruction MSE",
        "aux": "auxiliary loss",
        "usage": "share of codes used in the batch",
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (key, label) in zip(axes, labels.items()):
        ax.plot(curves[key], linewidth=0.8)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--train-subset`` and ``--test-subset``: where MNIST is and how much of it to use."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the four MNIST .gz files")
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")


def parse_positive_counts(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then refuse counts below 1 (``--steps``, ``--batch-size``, ``--threads`` and the subsets)."""
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "train_subset", "test_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return args


def parse_args(example: Example, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"MNIST autoencoder with a quantizer ({example.name}).")
    parser.add_argument("--steps", type=int, default=1200, help="training steps (default 1200)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--lr", type=float, default=example.lr, help=f"Adam learning rate (default {example.lr})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default out/{example.name}/)")
    add_data_arguments(parser)
    args = parse_positive_counts(parser, argv)
    if args.out is None:
        args.out = Path("out") / example.name
    return args


def main(example: Example, argv: list[str] | None = None) -> dict:
    """Train the example's autoencoder, evaluate it on the test set and write PNGs and metrics.json."""
    args = parse_args(example, argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read at the first CUDA use
    process = setup_process(args.device)
    if args.batch_size % process.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {process.world_size} processes")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    try:
        train_images = load_mnist_images(args.data, "train", args.train_subset)
        test_images = load_mnist_images(args.data, "test", args.test_subset)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None

    model = Autoencoder(example.make_quantizer(example.dim), example.quantize, dim=example.dim).to(process.device)
    trained = (example.distribute or wrap_data_parallel)(model) if process.world_size > 1 else model

    start = time.perf_counter()
    curves = train(trained, train_images, args, example, process)
    train_seconds = time.perf_counter() - start
    metrics, (originals, reconstructions) = evaluate(model, test_images, example, process)
    disagreeing = replicas_disagree(model, process)

    if process.is_main:
        if disagreeing:
            print(f"warning: ranks ended with different buffers: {', '.join(disagreeing)}", file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        save_reconstructions(originals, reconstructions, args.out / "reconstructions.png")
        save_curves(curves, args.out / "training_curves.png", f"{example.name} on MNIST")
        record = {
            **metrics,
            "example": example.name,
            "codebook_size": example.codebook_size,
            "num_codebooks": example.num_codebooks,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "world_size": process.world_size,
            "train_seconds": round(train_seconds, 1),
            "test_images": len(test_images),
        }
        (args.out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        finite = all(math.isfinite(metrics[k]) for k in ("test_mse", "usage", "perplexity"))
        print(
            f"wrote {args.out}/reconstructions.png, training_curves.png, metrics.json" + ("" if finite else " (NaN!)")
        )
        print(f"test_mse={metrics['test_mse']:.5f} usage={metrics['usage']:.4f} perplexity={metrics['perplexity']:.1f}")
    if process.world_size > 1:
        # free the DDP model first: gloo work objects it keeps alive otherwise die during interpreter shutdown
        # and can abort the process ("terminate called without an active exception"; torch 2.13)
        del trained, model
        gc.collect()
        dist.destroy_process_group()
    return metrics
