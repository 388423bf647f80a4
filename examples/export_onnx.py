"""Deploy the MNIST VQ autoencoder as two ONNX graphs: images -> codes and codes -> images.

Trains the autoencoder of ``autoencoder.py`` briefly (or loads the weights of an earlier run with ``--load``),
then exports with ``torch.onnx.export(..., dynamo=True)``, dynamic batch axis:

    encoder.onnx   images (b, 1, 28, 28) float32 -> indices (b, 7, 7) int64    (encoder + quantizer)
    decoder.onnx   indices (b, 7, 7) int64 -> images (b, 1, 28, 28) float32    (quantizer's codes + decoder)

runs both in ONNX Runtime on the test images and prints the round-trip test MSE next to the eager model's:

    python examples/export_onnx.py                 # ~30 s on 2 CPU cores: 300 training steps, export, check
    python examples/export_onnx.py --load out/export_onnx/autoencoder.pt --steps 0   # export saved weights

Needs the ``[export]`` extra (``pip install -e ".[export]"``: onnx, onnxscript, onnxruntime) and tqdm.
Writes out/export_onnx/{autoencoder.pt, encoder.onnx, decoder.onnx}; ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import (
    DEFAULT_DATA,
    Autoencoder,
    Example,
    Process,
    add_data_arguments,
    evaluate,
    load_mnist_images,
    train,
)
from autoencoder import CODEBOOK_SIZE, make_quantizer, quantize
from torch import Tensor, nn

EXAMPLE = Example("export_onnx", make_quantizer, quantize, codebook_size=CODEBOOK_SIZE)


class ImagesToCodes(nn.Module):
    """Encoder + quantizer: ``(b, 1, 28, 28)`` images -> ``(b, 7, 7)`` code indices."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.encoder, self.quantizer = model.encoder, model.quantizer

    def forward(self, images: Tensor) -> Tensor:
        _, indices, _ = self.quantizer(self.encoder(images))
        return indices


class CodesToImages(nn.Module):
    """Quantizer's codes + decoder: ``(b, 7, 7)`` code indices -> ``(b, 1, 28, 28)`` images."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.quantizer, self.decoder = model.quantizer, model.decoder

    def forward(self, indices: Tensor) -> Tensor:
        return self.decoder(self.quantizer.get_output_from_indices(indices))  # (b, dim, 7, 7) -> images


def export(module: nn.Module, example: Tensor, path: Path, input_name: str, output_name: str) -> None:
    """ONNX graph of ``module`` with a dynamic batch axis, written to ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.13's exporter: a deprecated pytree check
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            dynamic_shapes={input_name: {0: torch.export.Dim.DYNAMIC}},
            input_names=[input_name],
            output_names=[output_name],
            verbose=False,
        )
    program.save(str(path))


def run_onnx(encoder_path: Path, decoder_path: Path, images: Tensor, threads: int, batch_size: int = 500):
    """Indices and reconstructions of ``images`` by the two graphs in ONNX Runtime (CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    encoder = ort.InferenceSession(str(encoder_path), options, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), options, providers=["CPUExecutionProvider"])
    all_indices, reconstructions = [], []
    for chunk in images.split(batch_size):
        (indices,) = encoder.run(None, {"images": chunk.numpy()})
        (reconstruction,) = decoder.run(None, {"indices": indices})
        all_indices.append(torch.from_numpy(indices))
        reconstructions.append(torch.from_numpy(reconstruction))
    return torch.cat(all_indices), torch.cat(reconstructions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export the MNIST VQ autoencoder to ONNX and check it in ONNX Runtime."
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300; 0 with --load)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=EXAMPLE.lr, help=f"Adam learning rate (default {EXAMPLE.lr})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data order")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime CPU threads (default 1)")
    parser.add_argument("--load", type=Path, default=None, help="load the autoencoder's state_dict from this file")
    parser.add_argument("--out", type=Path, default=Path("out") / EXAMPLE.name, help="output folder")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "threads", "train_subset", "test_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.steps < 0 or (args.steps == 0 and args.load is None):
        parser.error(f"--steps must be positive (or 0 with --load), got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        missing = f"error: {error.name} is missing: pip install -e '.[export]' (onnx, onnxscript, onnxruntime)"
        raise SystemExit(missing) from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    process = Process(0, 1, torch.device("cpu"))
    try:
        test_images = load_mnist_images(args.data, "test", args.test_subset)
        train_images = load_mnist_images(args.data, "train", args.train_subset) if args.steps else None
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None

    model = Autoencoder(EXAMPLE.make_quantizer(EXAMPLE.dim), EXAMPLE.quantize, dim=EXAMPLE.dim)
    if args.load is not None:
        model.load_state_dict(torch.load(args.load, map_location="cpu", weights_only=True))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.steps:
        train(model, train_images, args, EXAMPLE, process)
        torch.save(model.state_dict(), args.out / "autoencoder.pt")
    eager_metrics, _ = evaluate(model, test_images, EXAMPLE, process)  # also puts the model in eval mode

    start = time.perf_counter()
    encoder_path, decoder_path = args.out / "encoder.onnx", args.out / "decoder.onnx"
    example_images = test_images[:3]
    export(ImagesToCodes(model), example_images, encoder_path, "images", "indices")
    with torch.no_grad():
        example_indices = ImagesToCodes(model)(example_images)
    export(CodesToImages(model), example_indices, decoder_path, "indices", "images")
    export_seconds = time.perf_counter() - start

    indices, reconstructions = run_onnx(encoder_path, decoder_path, test_images, args.threads)
    with torch.no_grad():
        eager_indices = torch.cat([ImagesToCodes(model)(chunk) for chunk in test_images.split(500)])
    onnx_mse = (reconstructions.double() - test_images.double()).pow(2).mean().item()
    same = (indices == eager_indices).sum().item()

    print(f"wrote {encoder_path} and {decoder_path} (exported in {export_seconds:.1f} s)")
    print(f"indices equal to eager: {same}/{indices.numel()} over {len(test_images)} test images")
    print(f"test_mse eager={eager_metrics['test_mse']:.6f} onnx={onnx_mse:.6f}")
    return {"eager_mse": eager_metrics["test_mse"], "onnx_mse": onnx_mse, "indices_equal": same == indices.numel()}


if __name__ == "__main__":
    if not DEFAULT_DATA.is_dir() and "--data" not in sys.argv:
        print(f"note: {DEFAULT_DATA} not found; pass --data DIR", file=sys.stderr)
    main()
