"""ONNX: ``torch.onnx.export(..., dynamo=True)`` of the encode and decode graphs, run in ONNX Runtime (CPU).

For each quantizer below, both graphs are exported once (dynamic batch and sequence) and run on 1,000 random
input vectors, as batches of 1 and 4 sequences of 80 and 120 vectors: ONNX Runtime gives exactly the eager
indices (values and dtype) and the eager outputs to 1e-5. The decode graph takes the encode graph's indices,
so the two graphs also round-trip. Needs the ``[export]`` extra (onnx, onnxscript, onnxruntime); skipped
without it. Only VectorQuantize runs by default, the others are marked ``slow`` (an export takes seconds).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import BY_NAME, Decode, Encode, dims, eager, index_shapes  # tests/ is on sys.path

if torch.__version__ < "2.6":
    pytest.skip("the export tests are not run before torch 2.6", allow_module_level=True)
REASON = "needs the [export] extra: pip install -e '.[export]' (onnx, onnxscript, onnxruntime)"
pytest.importorskip("onnx", reason=REASON)
pytest.importorskip("onnxscript", reason=REASON)
ort = pytest.importorskip("onnxruntime", reason=REASON)

# torch 2.13's exporter pickles pytree specs with a deprecated LeafSpec check (torch's own warning)
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")

ONNX_CASES = (
    "VectorQuantize",
    "VectorQuantize-cosine",
    "VectorQuantize-heads",
    "VectorQuantize-separate-heads",
    "VectorQuantize-codebook_dim",
    "ResidualVQ",
    "GroupedResidualVQ",
    "FSQ",
    "ResidualFSQ",
    "LFQ",
    "ResidualLFQ",
    "SimVQ",
    "ResidualSimVQ",
    "LatentQuantize",
)
# 1,000 vectors: batch sizes 1 and 4 times sequence lengths 80 and 120 (1 * 200 + 4 * 200)
SHAPES = tuple((b, n) for b in (1, 4) for n in (80, 120))
# the ONNX graph keeps no guard on the token count: a searching quantizer also takes more than one search chunk
MANY_TOKENS = (64, 300)
TOLERANCE = 1e-5


def onnx_export(module: torch.nn.Module, args: tuple, dynamic_shapes, path, input_names, output_names):
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=input_names,
        output_names=output_names,
        verbose=False,
    )
    program.save(str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_matches(got: list, expected: tuple, what: str) -> None:
    assert len(got) == len(expected), what
    for position, (g, e) in enumerate(zip(got, expected)):
        e = e.numpy()
        assert g.dtype == e.dtype and g.shape == e.shape, (
            f"{what}[{position}]: {g.dtype} {g.shape} != {e.dtype} {e.shape}"
        )
        if np.issubdtype(e.dtype, np.integer):
            assert np.array_equal(g, e), f"{what}[{position}]: {np.count_nonzero(g != e)} indices differ"
        else:
            difference = np.abs(g.astype(np.float64) - e).max()
            assert difference <= TOLERANCE, f"{what}[{position}]: max difference {difference}"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(BY_NAME[name], id=name, marks=() if name == "VectorQuantize" else (pytest.mark.slow,))
        for name in ONNX_CASES
    ],
)
def test_onnx_runtime_reproduces_eager_encode_and_decode(case, tmp_path):
    module = case.module()
    encode, decoder = Encode(module), Decode(module, case.decode)
    traced = case.inputs(3, 5)
    encoder_session = onnx_export(
        encode, (traced,), {"x": dims(case.x_axes)}, tmp_path / "encode.onnx", ["x"], ["quantized", "indices"]
    )
    traced_indices = eager(encode, traced)[1]
    decoder_session = onnx_export(
        decoder,
        (traced_indices,),
        {"indices": index_shapes(case, traced_indices)},
        tmp_path / "decode.onnx",
        ["indices"],
        ["output"],
    )

    shapes = SHAPES + ((MANY_TOKENS,) if case.searches else ())
    tokens = 0
    for seed, (b, n) in enumerate(shapes, start=1):
        x = case.inputs(b, n, seed=seed)
        expected = eager(encode, x)
        got = encoder_session.run(None, {"x": x.numpy()})
        assert_matches(got, expected, f"{case.name} encode on {tuple(x.shape)}")
        decoded = decoder_session.run(None, {"indices": got[1]})
        assert_matches(decoded, eager(decoder, expected[1]), f"{case.name} decode of {tuple(x.shape)}")
        tokens += b * n if (b, n) in SHAPES else 0
    assert tokens == 1000


REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--steps", "5", "--batch-size", "16", "--train-subset", "256", "--test-subset", "256", "--threads", "1"]


def run_example(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    script = str(REPO_ROOT / "examples" / "export_onnx.py")
    done = subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_export_example_round_trips_through_onnx_runtime(tmp_path):
    """examples/export_onnx.py on a slice of MNIST: two ONNX files, indices and test MSE as eager; --load works."""
    out = run_example([*TINY_RUN, "--out", str(tmp_path)])
    for name in ("autoencoder.pt", "encoder.onnx", "decoder.onnx"):
        assert (tmp_path / name).is_file(), name
    same, total = map(int, re.search(r"indices equal to eager: (\d+)/(\d+) over 256 test images", out).groups())
    assert total == 256 * 49 and same >= total - 5, out  # a near-tie may round the other way (the encoder's convs)
    eager_mse, onnx_mse = map(float, re.search(r"test_mse eager=(\S+) onnx=(\S+)", out).groups())
    assert 0 < eager_mse < 1 and abs(onnx_mse - eager_mse) <= 1e-5, out

    reloaded = run_example(["--load", str(tmp_path / "autoencoder.pt"), "--steps", "0", "--test-subset", "256",
                            "--out", str(tmp_path / "reloaded")])  # fmt: skip
    assert f"test_mse eager={eager_mse:.6f}" in reloaded
