"""benchmarks/codebook_health.py: a tiny grid runs, resumes and reports; LFQ at 2^10 uses its codes or warns.

The smoke test runs the script in a subprocess with this checkout first on PYTHONPATH. The slow test is the
issue's reproduction: ``LFQ(codebook_size=1024, dim=10, entropy_loss_weight=0.02)`` in the benchmark's MNIST
autoencoder (Adam 2e-3, batch 128, 400 steps) either uses >= 90% of its codes on the test set or has warned
(:class:`CodebookCollapseWarning`, naming the remedies) before step 400.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "codebook_health.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--sizes", "256", "--seeds", "0", "--steps", "3", "--lfq-steps", "3", "--batch-size", "16",
        "--train-subset", "256", "--test-subset", "64", "--threads", "1"]  # fmt: skip


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip


def test_tiny_grid_writes_rows_resumes_and_reports(tmp_path):
    out, plot = tmp_path / "rows.jsonl", tmp_path / "health.png"
    result = run_script(*TINY, "--variants", "lfq-spherical", "--out", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 6 families x 2 encoders, then the variant (measured at 2^10 codes)
    assert len(rows) == 13
    assert {(r["family"], r["norm"]) for r in rows if not r["variant"]} == {
        (f, n) for f in ("vq", "simvq", "fsq", "lfq", "latent", "rvq") for n in ("none", "norm")
    }
    assert [(r["variant"], r["size"]) for r in rows if r["variant"]] == [("lfq-spherical", 1024)]
    for row in rows:
        assert math.isfinite(row["test_mse"]) and 0 < row["test_mse"] < 1
        assert 0 < row["usage"] <= 1 and 1 <= row["perplexity"] <= row["codes"] + 1e-6
        assert row["steps"] == 3
    occupancy = {r["family"]: r["occupancy"] for r in rows if r["norm"] == "none" and not r["variant"]}
    assert occupancy["vq"] is None and occupancy["fsq"]["levels"] == [8, 6, 5]
    assert occupancy["lfq"]["levels"] == [2] * 8 and 0 < occupancy["lfq"]["box"] <= 1
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert "| lfq | lfq-spherical | none | 1024 | 3 |" in result.stdout

    again = run_script(*TINY, "--variants", "lfq-spherical", "--out", str(out), "--plot", str(plot))
    assert again.returncode == 0 and "0 runs to do (13 in" in again.stderr
    assert len(out.read_text().splitlines()) == 13
    report = run_script("--report", "--out", str(out), "--plot", str(plot))
    assert report.returncode == 0 and report.stdout == result.stdout


@pytest.mark.slow
def test_lfq_at_1024_codes_uses_its_codes_or_warns_before_step_400():
    sys.path.insert(0, str(SCRIPT.parent))
    import codebook_health
    from _common import DEFAULT_DATA, load_mnist_images

    from vector_quantize_pytorch.core import health

    torch.set_num_threads(1)
    args = argparse.Namespace(batch_size=128, lr=2e-3, device="cpu")
    job = dict(family="lfq", variant=None, size=1024, norm="none", seed=0, steps=400)
    images = load_mnist_images(DEFAULT_DATA, "train"), load_mnist_images(DEFAULT_DATA, "test")
    with health.health_check(True):
        row = codebook_health.run_one(job, args, *images)
    warned = [w for w in row["warnings"] if w["category"] == "CodebookCollapseWarning"]
    assert row["usage"] >= 0.9 or (warned and warned[0]["step"] < 400), row
    if warned:
        message = warned[0]["message"]
        assert "spherical=True" in message and "soft_clamp_input_value" in message and "normalization" in message
