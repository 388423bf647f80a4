"""examples/compare.py: a tiny comparison run writes a sane table, JSON and plot, and repeats its numbers exactly.

The script runs in subprocesses with this checkout first on PYTHONPATH; the argument checks and the quantizer
table are tested in-process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import compare  # noqa: E402  (examples/ is not a package)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_RUN = ["--sizes", "256", "--steps", "4", "--batch-size", "16", "--train-subset", "128", "--test-subset", "100",
            "--threads", "1"]  # fmt: skip
KEYS = ("test_mse", "usage", "perplexity", "quantization_error")


def run_compare(quantizers: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(EXAMPLES / "compare.py"), "--quantizers", *quantizers, *TINY_RUN, "--out", str(out)]
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("compare")
    return run_compare(["vq-rot", "fsq"], out), out


def test_tiny_run_writes_table_json_and_plot(tiny_run):
    result, out = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]

    data = json.loads((out / "results.json").read_text())
    rows = {row["quantizer"]: row for row in data["results"]}
    assert list(rows) == ["vq-rot", "fsq"]
    assert rows["vq-rot"]["codebook_size"] == 256 and rows["fsq"]["codebook_size"] == 8 * 6 * 5
    for row in rows.values():
        # 4 steps: the decoder is still near its start (about 0.22; a constant 0.5 output scores 0.23 on MNIST,
        # all zeros 0.10); an output outside [0, 1] or unrelated to the images lands above 0.3
        assert math.isfinite(row["test_mse"]) and 0.01 < row["test_mse"] < 0.3
        assert 0 < row["usage"] <= 1
        # at least one code, at most every code, and never more codes than 100 test images x 49 positions
        assert 1 <= row["perplexity"] <= min(row["codebook_size"], 100 * 49) + 1e-9
        assert row["usage"] * row["codebook_size"] <= 100 * 49
        assert row["train_seconds"] >= 0
    assert 0 <= rows["vq-rot"]["quantization_error"] < 1
    assert rows["fsq"]["quantization_error"] is None  # FSQ quantizes a projection of z
    settings = data["settings"]
    assert (settings["steps"], settings["train_images"], settings["test_images"]) == (4, 128, 100)

    table = (out / "results.md").read_text()
    assert "| quantizer | codebook size | test MSE | usage % | perplexity |" in table
    for row in rows.values():
        assert f"| {row['description']} | {row['codebook_size']} | {row['test_mse']:.5f} |" in table
        assert f"| {100 * row['usage']:.1f} | {row['perplexity']:.1f} |" in table
    assert "--quantizers vq-rot fsq" in table  # the command that made it

    png = (out / "compare.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 500 and height > 200


def test_same_seed_same_numbers_whatever_ran_before(tiny_run):
    # in-process, on the same data as the subprocess: every run is seeded on its own, so neither a second run of
    # the same quantizer nor the order of the quantizers changes the numbers
    _, out = tiny_run
    from_script = {row["quantizer"]: row for row in json.loads((out / "results.json").read_text())["results"]}
    args = compare.parse_args(["--quantizers", "fsq", "vq-rot", *TINY_RUN])
    train_images = compare.load_mnist_images(args.data, "train", args.train_subset)
    test_images = compare.load_mnist_images(args.data, "test", args.test_subset)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            torch.set_num_threads(1)  # as the script: another thread count may change the last digits
            rows = [compare.run_one(name, 256, args, train_images, test_images) for name in ("fsq", "vq-rot", "fsq")]
    finally:
        torch.set_num_threads(threads)
    assert [rows[0][k] for k in KEYS] == [rows[2][k] for k in KEYS]
    for row in rows:
        assert [row[k] for k in KEYS] == [from_script[row["quantizer"]][k] for k in KEYS]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quantizers", "fsq", "--sizes", "1000"], "fsq takes a codebook size from the FSQ paper's table"),
        (["--quantizers", "lfq", "--sizes", "1000"], "lfq needs a power of 2 of at least 2 codes, got 1000"),
        (["--quantizers", "simvq", "--sizes", "1"], "simvq needs at least 2 codes, got 1"),
        (["--quantizers", "vq"], "invalid choice: 'vq'"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_refused_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults():
    args = compare.parse_args([])
    assert args.quantizers == ["vq-ste", "vq-rot", "simvq", "fsq", "lfq"]
    assert args.sizes == [256, 1024, 4096] and args.out == Path("out/compare") and args.threads == 1


def test_fsq_levels_follow_the_paper_table():
    for size, levels in compare.FSQ_LEVELS.items():
        assert 0.85 * size <= math.prod(levels) <= 1.1 * size  # "about" 2^k codes
        assert list(levels) == sorted(levels, reverse=True) and min(levels) >= 5


@pytest.mark.parametrize("name", list(compare.DESCRIPTIONS))
def test_every_quantizer_fits_the_autoencoder(name):
    torch.manual_seed(0)
    example = compare.make_example(name, 256)
    model = compare.Autoencoder(example.make_quantizer(example.dim), example.quantize, dim=example.dim)
    model.eval()
    with torch.no_grad():
        reconstruction, indices, aux_loss = model(torch.rand(2, 1, 28, 28))
    assert reconstruction.shape == (2, 1, 28, 28) and indices.shape == (2, 7, 7) and aux_loss.shape == ()
    assert 0 <= int(indices.min()) and int(indices.max()) < example.codebook_size


def test_unknown_quantizer_names_the_choices():
    with pytest.raises(ValueError, match="unknown quantizer 'pq'; expected one of vq-ste, vq-rot, simvq, fsq, lfq"):
        compare.make_example("pq", 256)
