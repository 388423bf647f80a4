"""The MNIST autoencoder examples: each script runs a few steps on a slice of MNIST and writes valid outputs.

The scripts run in subprocesses with this checkout first on PYTHONPATH. A script whose quantizer class is not
exported by vector_quantize_pytorch fails (it is never skipped).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import vector_quantize_pytorch

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402  (examples/ is not a package)

SCRIPTS = {
    "autoencoder.py": "VectorQuantize",
    "autoencoder_fsq.py": "FSQ",
    "autoencoder_lfq.py": "LFQ",
    "autoencoder_sim_vq.py": "SimVQ",
    "autoencoder_residual_vq.py": "ResidualVQ",
    "autoencoder_latent_quantization.py": "LatentQuantize",
    "autoencoder_fsp.py": "FSP",
}
SMALL_RUN = ["--steps", "5", "--batch-size", "16", "--train-subset", "256", "--test-subset", "256", "--threads", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FINAL_LINE = re.compile(r"^test_mse=(\S+) usage=(\S+) perplexity=(\S+)$")


def run_script(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def require_quantizer(script: str) -> None:
    name = SCRIPTS[script]
    assert name in vector_quantize_pytorch.__all__, (
        f"{script} needs {name}, which vector_quantize_pytorch no longer exports"
    )
    assert hasattr(vector_quantize_pytorch, name), name


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature, the CRC of every chunk and the final IEND."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    offset, chunk_types = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunk = data[offset + 4 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(chunk) == crc, f"{path}: bad CRC in chunk {chunk[:4]!r}"
        chunk_types.append(chunk[:4])
        offset += 12 + length
    assert chunk_types[0] == b"IHDR" and chunk_types[-1] == b"IEND" and b"IDAT" in chunk_types
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------- the scripts

_RUNS: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}


def small_run(script: str, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``script`` once on a slice of MNIST (cached for the session); returns the process and its out folder."""
    if script not in _RUNS:
        out = tmp_path_factory.mktemp(script.removesuffix(".py"))
        args = [sys.executable, str(EXAMPLES / script), *SMALL_RUN, "--out", str(out)]
        _RUNS[script] = (run_script(args), out)
    return _RUNS[script]


# the VQ example and the multi-codebook one in the default run; the other five (the same loop with another
# quantizer, which its own tests cover) with `pytest -m slow`
FAST_SCRIPTS = {"autoencoder.py", "autoencoder_residual_vq.py"}


SCRIPT_PARAMS = [pytest.param(s, marks=() if s in FAST_SCRIPTS else pytest.mark.slow) for s in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPT_PARAMS)
def test_example_runs_and_writes_outputs(script, tmp_path_factory):
    require_quantizer(script)
    result, out = small_run(script, tmp_path_factory)
    assert result.returncode == 0, result.stderr[-3000:]

    # 2 x 16 test images above 2 x 16 reconstructions, 30 x 30 px per digit with its border, drawn 2x, and a
    # margin on the left for the row labels ("input", "reconstruction")
    assert png_size(out / "reconstructions.png") == (_common.RECONSTRUCTION_LABEL_WIDTH + 16 * 60, 4 * 60)
    width, height = png_size(out / "training_curves.png")
    assert width > 100 and height > 100

    metrics = json.loads((out / "metrics.json").read_text())
    # after 5 steps the decoder is still near its start: 0.21-0.22 measured (autoencoder, autoencoder_lfq); on these
    # 256 test images a constant 0.5 output scores 0.232 and all zeros 0.101. 0.3 leaves room for the other
    # quantizers while an output outside [0, 1] or unrelated to the images lands above it
    assert math.isfinite(metrics["test_mse"]) and 0.01 < metrics["test_mse"] < 0.3
    assert 0 < metrics["usage"] <= 1
    assert 1 <= metrics["perplexity"] <= metrics["codebook_size"]
    assert metrics["steps"] == 5 and metrics["test_images"] == 256 and metrics["world_size"] == 1

    final = FINAL_LINE.match(result.stdout.strip().splitlines()[-1])
    assert final, result.stdout[-500:]
    printed = [float(value) for value in final.groups()]
    expected = [metrics["test_mse"], metrics["usage"], metrics["perplexity"]]
    for value, exact, decimals in zip(printed, expected, (5, 4, 1)):  # printed with these decimals
        assert abs(value - exact) <= 0.5 * 10**-decimals + 1e-12


def test_same_seed_gives_same_numbers(tmp_path, tmp_path_factory):
    require_quantizer("autoencoder.py")
    first, first_out = small_run("autoencoder.py", tmp_path_factory)
    second = run_script([sys.executable, str(EXAMPLES / "autoencoder.py"), *SMALL_RUN, "--out", str(tmp_path)])
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    keys = ("test_mse", "usage", "perplexity")
    first_metrics = json.loads((first_out / "metrics.json").read_text())
    second_metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [first_metrics[k] for k in keys] == [second_metrics[k] for k in keys]


@pytest.mark.slow  # multi-process; tests/distributed spawns 2 gloo processes in the default run
def test_autoencoder_under_torchrun_with_two_processes(tmp_path):
    require_quantizer("autoencoder.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_script([*launcher, str(EXAMPLES / "autoencoder.py"), *SMALL_RUN, "--out", str(tmp_path)], timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks ended with different buffers" not in result.stderr
    assert sum(bool(FINAL_LINE.match(line)) for line in result.stdout.splitlines()) == 1  # rank 0 only
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert math.isfinite(metrics["test_mse"]) and 0 < metrics["usage"] <= 1


# ---------------------------------------------------------------------------------------- the helpers


def test_read_idx_reads_images_and_labels(tmp_path):
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 3, 4)
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 2, 3, 4) + images.numpy().tobytes()))
    assert torch.equal(_common.read_idx(path), images)

    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">II", 2049, 3) + bytes([7, 2, 1])))
    assert _common.read_idx(path).tolist() == [7, 2, 1]

    path.write_bytes(gzip.compress(struct.pack(">II", 1234, 0)))
    with pytest.raises(ValueError, match="magic number 1234"):
        _common.read_idx(path)


def test_missing_data_names_the_file_and_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz not found: pass --data DIR"):
        _common.load_mnist_images(tmp_path, "test")


def test_mnist_files_in_the_repository():
    test_images = _common.load_mnist_images(_common.DEFAULT_DATA, "test", subset=8)
    assert test_images.shape == (8, 1, 28, 28) and test_images.dtype == torch.float32
    assert test_images.min() == 0 and test_images.max() == 1
    labels = _common.read_idx(_common.DEFAULT_DATA / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]


def test_batch_order_is_a_seeded_permutation_per_epoch():
    batches = list(_common.batch_order(num_items=10, batch_size=3, steps=6, seed=0))
    assert len(batches) == 6 and all(len(b) == 3 for b in batches)
    for epoch in (batches[:3], batches[3:]):  # 3 batches per epoch, the 10th item dropped
        items = torch.cat(epoch)
        assert len(set(items.tolist())) == 9
    assert all(torch.equal(a, b) for a, b in zip(batches, _common.batch_order(10, 3, 6, seed=0)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, _common.batch_order(10, 3, 6, seed=1)))


def test_usage_meter_counts_per_codebook_and_skips_negative_indices():
    """The examples' usage and perplexity come from CodebookUsage (tests/test_usage.py checks it by hand)."""
    meter = _common.usage_meter(_common.Example("x", None, None, codebook_size=4, num_codebooks=2), torch.device("cpu"))
    meter.update(torch.tensor([[[0, 2], [0, 1]], [[3, 2], [-1, 2]]]))  # (b=2, n=2, c=2), codebook size 4
    assert meter.counts().tolist() == [[2, 0, 0, 1], [0, 1, 3, 0]]
    report = meter.report()
    assert report["usage"] == pytest.approx((0.5 + 0.5) / 2)
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert report["perplexity"] == pytest.approx((math.exp(entropy[0]) + math.exp(entropy[1])) / 2)
    single = _common.usage_meter(_common.Example("x", None, None, codebook_size=4), torch.device("cpu"))
    single.update(torch.tensor([[1, 1], [3, 1]], dtype=torch.int32))
    assert single.counts().tolist() == [[0, 3, 0, 1]]
