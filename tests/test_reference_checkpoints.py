"""Checkpoints written by the reference library load into our package and give the same outputs.

Each file in tests/fixtures/ was written by vector-quantize-pytorch 1.32.0 (see tests/fixtures/README.md and
tests/fixtures/MANIFEST.md): a constructor config, the state_dict of a module trained for a few steps, an eval input and
what the reference's eval forward returned for it. For each fixture we build our class with the same
config, load the state_dict with strict=True, run the same eval forward and compare: indices exactly
(values, shape and dtype), float outputs to 1e-5.
"""

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import vector_quantize_pytorch

FIXTURE_DIR = Path(__file__).parent / "fixtures"
FIXTURE_PATHS = sorted(FIXTURE_DIR.glob("*.pt"))
FIXTURES = {path.stem: torch.load(path, weights_only=True) for path in FIXTURE_PATHS}
FIXTURES_WITH_DECODE = [name for name, fixture in FIXTURES.items() if fixture["decode_method"] is not None]

ATOL = RTOL = 1e-5
MAX_FIXTURE_BYTES = 200_000
# outputs compared by test_quantized_and_indices_match; everything else the forward returned is a loss
MAIN_OUTPUTS = ("quantized", "indices")


def our_class(class_name):
    """Our class with the reference's name."""
    return getattr(vector_quantize_pytorch, class_name)


def load_reference_checkpoint(fixture):
    module = our_class(fixture["class"])(**fixture["config"])
    module.load_state_dict(fixture["state_dict"], strict=True)
    return module.eval()


def eval_forward(module, fixture):
    """Named outputs of one eval forward on the fixture's input, in the reference's positional order."""
    with torch.no_grad():
        returned = module(fixture["input"], **fixture["forward_kwargs"])
    if isinstance(returned, torch.Tensor):
        returned = (returned,)
    names = fixture["output_names"]
    assert len(returned) == len(names), f"forward returned {len(returned)} values, the reference returns {names}"
    return dict(zip(names, returned))


def assert_indices_equal(actual, expected):
    assert_close(actual, expected, atol=0, rtol=0)


def test_fixtures_are_present_and_small():
    assert len(FIXTURES) >= 18, f"expected the reference fixtures in {FIXTURE_DIR}, found {sorted(FIXTURES)}"
    for path in FIXTURE_PATHS:
        assert path.stat().st_size < MAX_FIXTURE_BYTES, path.name
        assert FIXTURES[path.stem]["reference_version"] == "1.32.0"


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_quantized_and_indices_match(name):
    fixture = FIXTURES[name]
    outputs = eval_forward(load_reference_checkpoint(fixture), fixture)
    expected = fixture["outputs"]

    assert_indices_equal(outputs["indices"], expected["indices"])
    if "quantized" in expected:
        assert_close(outputs["quantized"], expected["quantized"], atol=ATOL, rtol=RTOL)


def loss_names(fixture):
    return [key for key in fixture["output_names"] if key not in MAIN_OUTPUTS]


FIXTURES_WITH_LOSSES = [name for name, fixture in FIXTURES.items() if loss_names(fixture)]


def test_some_eval_losses_are_not_zero():
    """Most classes return zero losses in eval mode (checked exactly below); SimVQ's commitment losses are not,
    so the comparison is not only 0 against 0. Training losses are compared in test_reference_training_steps."""
    nonzero = [name for name in FIXTURES_WITH_LOSSES if any(FIXTURES[name]["outputs"][k].abs().sum() > 0.1
                                                               for k in loss_names(FIXTURES[name]))]  # fmt: skip
    assert sorted(nonzero) == ["residual_simvq_2_quantizers", "simvq"]


@pytest.mark.parametrize("name", sorted(FIXTURES_WITH_LOSSES))
def test_eval_losses_match(name):
    fixture = FIXTURES[name]
    outputs = eval_forward(load_reference_checkpoint(fixture), fixture)
    for key in loss_names(fixture):
        expected = fixture["outputs"][key]
        # a zero reference loss (no loss in eval mode) must be exactly zero; a computed one agrees to 1e-5
        tolerance = dict(atol=0, rtol=0) if not expected.any() else dict(atol=ATOL, rtol=RTOL)
        assert_close(outputs[key], expected, **tolerance, msg=lambda msg, key=key: f"{key}: {msg}")


@pytest.mark.parametrize("name", FIXTURES_WITH_DECODE)
def test_decode_from_recorded_indices_matches(name):
    fixture = FIXTURES[name]
    module = load_reference_checkpoint(fixture)
    decode = getattr(module, fixture["decode_method"])
    with torch.no_grad():
        decoded = decode(fixture["outputs"]["indices"])
    assert_close(decoded, fixture["outputs"]["decoded"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_state_dict_round_trips(name):
    """After loading, our state_dict gives back the reference's keys, shapes, dtypes and values."""
    fixture = FIXTURES[name]
    ours = load_reference_checkpoint(fixture).state_dict()
    reference = fixture["state_dict"]
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert_close(ours[key], value, atol=0, rtol=0, msg=lambda msg, key=key: f"{key}: {msg}")
