"""FSQ: reference equality, exact mixed-radix indices, layouts, dtypes and argument checks."""

import math
import random
from pathlib import Path

import pytest
import torch

from vector_quantize_pytorch.core.radix import digits_to_index, index_to_digits, radix_basis
from vector_quantize_pytorch.finite_scalar_quantization import FSQ

FIXTURE = Path(__file__).parent / "fixtures" / "fsq_projection.pt"


def fixed_input(*shape):
    """A deterministic input, the same in any torch build: ``2.5 * sin(0.7 * i)`` over the flat index."""
    return (torch.arange(math.prod(shape), dtype=torch.float64) * 0.7).sin().mul(2.5).float().reshape(shape)


def test_seed_example():
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == (1, 1024, 4) and indices.shape == (1, 1024)
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


# Produced by running the reference (vector-quantize-pytorch 1.32.0, ~/ref-venv/bin/python) on fixed_input:
#   FSQ([8, 5, 5, 5])(fixed_input(1, 6, 4)) and FSQ([8, 6, 5], preserve_symmetry=True)(fixed_input(1, 5, 3))
REFERENCE_DEFAULT_OUT = [
    [0.0, 1.0, 1.0, 1.0],
    [0.5, -0.5, -1.0, -1.0],
    [-1.0, 0.0, 1.0, 1.0],
    [0.75, 0.5, -0.5, -1.0],
    [-1.0, -1.0, 0.0, 1.0],
    [0.75, 1.0, 0.5, -0.5],
]
REFERENCE_DEFAULT_INDICES = [996, 14, 976, 71, 880, 359]
REFERENCE_SYMMETRIC_OUT = [
    [0.14285719394683838, 1.0, 1.0],
    [1.0, 0.6000000238418579, -0.5],
    [-1.0, -1.0, -1.0],
    [0.14285719394683838, 1.0, 1.0],
    [1.0, 0.6000000238418579, -0.5],
]
REFERENCE_SYMMETRIC_INDICES = [236, 87, 0, 236, 87]


def test_default_outputs_equal_the_reference():
    out, indices = FSQ([8, 5, 5, 5])(fixed_input(1, 6, 4))
    assert torch.equal(out, torch.tensor([REFERENCE_DEFAULT_OUT]))
    assert torch.equal(indices, torch.tensor([REFERENCE_DEFAULT_INDICES], dtype=torch.int32))


def test_symmetric_outputs_equal_the_reference():
    out, indices = FSQ([8, 6, 5], preserve_symmetry=True)(fixed_input(1, 5, 3))
    assert torch.equal(out, torch.tensor([REFERENCE_SYMMETRIC_OUT]))
    assert torch.equal(indices, torch.tensor([REFERENCE_SYMMETRIC_INDICES], dtype=torch.int32))


def test_reference_checkpoint_gives_the_reference_outputs():
    fixture = torch.load(FIXTURE, weights_only=True)
    quantizer = FSQ(**fixture["config"])
    quantizer.load_state_dict(fixture["state_dict"], strict=True)
    quantizer.eval()
    with torch.no_grad():
        out, indices = quantizer(fixture["input"])
        decoded = quantizer.indices_to_codes(indices)
    assert torch.equal(indices, fixture["outputs"]["indices"])
    torch.testing.assert_close(out, fixture["outputs"]["quantized"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(decoded, fixture["outputs"]["decoded"], atol=1e-6, rtol=1e-6)


def test_state_dict_keys_match_the_reference():
    assert list(FSQ([8, 5, 5, 5]).state_dict()) == []
    state = FSQ([8, 5, 5, 5], dim=16).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "project_in.weight": (4, 16),
        "project_in.bias": (4,),
        "project_out.weight": (16, 4),
        "project_out.bias": (16,),
    }
    state = FSQ([5, 5, 5], orthogonal_rotation=True).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {"orthogonal_rot": (3, 3)}


def test_implicit_codebook_is_built_only_when_read():
    quantizer = FSQ([8, 5, 5, 5])
    assert all(buffer.numel() <= 4 for buffer in quantizer.buffers())
    codebook = quantizer.implicit_codebook
    assert codebook.shape == (1000, 4)
    assert torch.equal(quantizer.codes_to_indices(codebook), torch.arange(1000, dtype=torch.int32))
    assert torch.equal(codebook, quantizer.indices_to_codes(torch.arange(1000)))
    assert len(torch.unique(codebook, dim=0)) == 1000


CONFIGS = {
    "default": (dict(levels=[8, 5, 5, 5]), (2, 7, 4)),
    "even_levels": (dict(levels=[8, 6, 4]), (2, 7, 3)),
    "symmetric_level2": (dict(levels=[2, 3, 4], preserve_symmetry=True), (2, 7, 3)),
    "hard_clamp": (dict(levels=[7, 5], bound_hard_clamp=True), (2, 7, 2)),
    "codebooks": (dict(levels=[5, 4, 3], num_codebooks=2), (2, 7, 6)),
    "projections": (dict(levels=[8, 5, 5, 5], dim=16), (2, 7, 16)),
    "image": (dict(levels=[8, 5, 5, 5], dim=8), (2, 8, 3, 5)),
    "video": (dict(levels=[5, 5, 5]), (2, 3, 2, 3, 4)),
    "channel_first_sequence": (dict(levels=[5, 5, 5], channel_first=True), (2, 3, 9)),
    "single_token": (dict(levels=[5, 5, 5]), (6, 3)),
    "rotation": (dict(levels=[5, 5, 5], orthogonal_rotation=True), (2, 7, 3)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoding_indices_gives_the_eval_output_exactly(name):
    config, shape = CONFIGS[name]
    torch.manual_seed(0)
    quantizer = FSQ(**config).eval()
    x = torch.randn(*shape) * 2
    with torch.no_grad():
        out, indices = quantizer(x)
        decoded = quantizer.indices_to_codes(indices)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(decoded, out)
    assert indices.min() >= 0 and indices.max() < quantizer.codebook_size


@pytest.mark.parametrize(
    ("config", "shape", "index_shape"),
    [
        (dict(levels=[5, 5, 5]), (2, 9, 3), (2, 9)),
        (dict(levels=[5, 5, 5]), (2, 3), (2,)),
        (dict(levels=[5, 5, 5], dim=8), (2, 8, 4, 5), (2, 4, 5)),
        (dict(levels=[5, 5, 5], dim=8), (2, 8, 2, 4, 5), (2, 2, 4, 5)),
        (dict(levels=[5, 5, 5], channel_first=True), (2, 3, 9), (2, 9)),
        (dict(levels=[5, 5, 5], num_codebooks=2), (2, 9, 6), (2, 9, 2)),
        (dict(levels=[5, 5, 5], num_codebooks=2, dim=16), (2, 16, 4, 5), (2, 4, 5, 2)),
        (dict(levels=[5, 5, 5], keep_num_codebooks_dim=True), (2, 9, 3), (2, 9, 1)),
    ],
)
def test_shapes(config, shape, index_shape):
    out, indices = FSQ(**config)(torch.randn(*shape))
    assert out.shape == shape
    assert indices.shape == index_shape and indices.dtype == torch.int32


def test_return_indices_false_gives_none():
    out, indices = FSQ([8, 5, 5, 5], return_indices=False)(torch.randn(2, 3, 4))
    assert indices is None and out.shape == (2, 3, 4)


@pytest.mark.parametrize("seed", range(8))
def test_index_arithmetic_round_trips_for_random_levels(seed):
    rng = random.Random(seed)
    levels = [rng.randint(2, 9) for _ in range(rng.randint(1, 6))]
    quantizer = FSQ(levels, preserve_symmetry=2 in levels or rng.random() < 0.5)
    size = quantizer.codebook_size
    assert size == math.prod(levels)
    indices = torch.randint(0, size, (50,))
    digits = quantizer.indices_to_level_indices(indices)
    assert ((digits >= 0) & (digits < torch.tensor(levels))).all()
    assert torch.equal(quantizer.codes_to_indices(quantizer.indices_to_codes(indices)), indices.int())
    # codes of the forward pass are decoded exactly (the index of a code is unique)
    out, forward_indices = quantizer(torch.randn(3, 40, len(levels)) * 2)
    assert torch.equal(quantizer.indices_to_codes(forward_indices), out)


def test_radix_helpers_are_the_mixed_radix_number_system():
    levels = [8, 5, 5, 5]
    basis = radix_basis(levels)
    assert basis.tolist() == [1, 8, 40, 200]
    digits = torch.tensor([[7, 4, 4, 4], [1, 2, 3, 4], [0, 0, 0, 0]])
    indices = digits_to_index(digits, basis)
    assert indices.tolist() == [999, 1 + 2 * 8 + 3 * 40 + 4 * 200, 0]
    assert torch.equal(index_to_digits(indices, basis, torch.tensor(levels)), digits)


def test_huge_codebook_indices_are_exact_without_enumeration():
    quantizer = FSQ(levels=[4] * 24)
    assert quantizer.codebook_size == 4**24 and quantizer.index_dtype == torch.int64
    assert all(buffer.numel() <= 24 for buffer in quantizer.buffers())
    out, indices = quantizer(torch.randn(2, 64, 24) * 2)
    assert indices.dtype == torch.int64
    assert indices.min() >= 0 and (indices < 4**24).all()
    assert torch.equal(quantizer.indices_to_codes(indices), out)
    top = torch.tensor([4**24 - 1, 4**24 - 2, 2**40 + 12345])
    assert torch.equal(quantizer.codes_to_indices(quantizer.indices_to_codes(top)), top)
    with pytest.raises(RuntimeError, match="indices_to_codes"):
        _ = quantizer.implicit_codebook


def test_indices_up_to_2_pow_62_are_exact():
    quantizer = FSQ(levels=[2] * 62, preserve_symmetry=True)
    top = torch.tensor([2**62 - 1, 2**61 + 1, 0])
    codes = quantizer.indices_to_codes(top)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(quantizer.codes_to_indices(codes), top)


def fsq_sweep(levels, points_per_dim):
    axis = torch.linspace(-2.5, 2.5, points_per_dim)
    return torch.cartesian_prod(*[axis] * len(levels)).reshape(1, -1, len(levels))


def test_bf16_autocast_uses_every_code_of_the_grid():
    """The reference's issue #114: quantizing in bf16 collapsed about half the codes (bf16 cannot hold the
    index sum). A uniform sweep over the input range must reach every one of the 1000 codes."""
    levels = [8, 5, 5, 5]
    quantizer = FSQ(levels)
    sweep = fsq_sweep(levels, 24).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, indices = quantizer(sweep)
    assert out.dtype == torch.bfloat16
    assert indices.unique().numel() == 1000
    assert torch.equal(quantizer.indices_to_codes(indices).bfloat16(), out)


def test_autocast_with_projections_keeps_the_input_dtype_and_exact_indices():
    torch.manual_seed(0)
    quantizer = FSQ([8, 5, 5, 5], dim=16)
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, indices = quantizer(x)
    assert out.dtype == torch.float32
    # the indices are those of the bf16 projection, quantized in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = quantizer.project_in(x)
    assert projected.dtype == torch.bfloat16
    assert torch.equal(indices, quantizer.codes_to_indices(quantizer.quantize(projected.float())))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_output_dtype_is_input_dtype(dtype):
    out, indices = FSQ([8, 5, 5, 5])(torch.randn(2, 5, 4).to(dtype))
    assert out.dtype == dtype and indices.dtype == torch.int32


def test_noise_dropout_keeps_indices_in_range_and_noise_free():
    """The reference's issue #240: noise dropout gave negative / out-of-range indices."""
    torch.manual_seed(0)
    quantizer = FSQ([3, 4, 5], preserve_symmetry=True, noise_dropout=0.5)
    x = torch.randn(4, 200, 3) * 3
    out, indices = quantizer.train()(x)
    assert indices.min() >= 0 and indices.max() < quantizer.codebook_size
    assert out.abs().max() <= 1.0
    clean_out, clean_indices = quantizer.eval()(x)
    assert torch.equal(indices, clean_indices)
    assert not torch.equal(out, clean_out)


def test_codes_to_indices_clamps_out_of_range_codes():
    quantizer = FSQ([5, 5])
    assert quantizer.codes_to_indices(torch.tensor([[-3.0, 7.0], [1.2, -1.2]])).tolist() == [20, 4]


def test_gradients_flow_straight_through():
    quantizer = FSQ([8, 5, 5, 5], dim=16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out, _ = quantizer(x)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert quantizer.project_in.weight.grad.abs().sum() > 0
    # the rounding itself has an identity gradient: d/dz of clamp(z + shift) * h / (L // 2) is h / (L // 2)
    z = torch.zeros(1, 1, 4, requires_grad=True)
    FSQ([8, 5, 5, 5], bound_hard_clamp=True).quantize(z).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[[3.5035 / 4, 2.002 / 2, 2.002 / 2, 2.002 / 2]]]))


def test_level_two_with_symmetry_quantizes_to_signs():
    quantizer = FSQ([2, 2, 2], preserve_symmetry=True)
    out, indices = quantizer(torch.tensor([[[-0.3, 0.2, 5.0]]]))
    assert out.tolist() == [[[-1.0, 1.0, 1.0]]]
    assert indices.tolist() == [[0 + 2 + 4]]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(levels=[8, 1, 5]), ValueError, "levels"),
        (dict(levels=[8, 2, 5]), ValueError, "preserve_symmetry"),
        (dict(levels=[]), ValueError, "levels"),
        (dict(levels=[8.5, 5]), TypeError, "levels"),
        (dict(levels=5), TypeError, "levels"),
        (dict(levels=[5, 5], num_codebooks=0), ValueError, "num_codebooks"),
        (dict(levels=[5, 5], num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
        (dict(levels=[5, 5], dim=0), ValueError, "dim"),
        (dict(levels=[5, 5], dim="16"), TypeError, "dim"),
        (dict(levels=[5, 5], noise_dropout=0.1), ValueError, "noise_dropout"),
        (dict(levels=[5, 5], noise_dropout=1.5, preserve_symmetry=True), ValueError, "noise_dropout"),
        (dict(levels=[5, 5], allowed_dtypes=("float32",)), TypeError, "allowed_dtypes"),
        (dict(levels=[5, 5], channel_first=1), TypeError, "channel_first"),
        (dict(levels=[5, 5], scale="big"), TypeError, "scale"),
        (dict(levels=[4] * 32), ValueError, "int64"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, name):
    with pytest.raises(error, match=name):
        FSQ(**kwargs)


def test_huge_codebook_is_allowed_without_indices():
    out, indices = FSQ([4] * 32, return_indices=False)(torch.randn(1, 3, 32))
    assert indices is None and out.shape == (1, 3, 32)


def test_wrong_input_raises_naming_the_expected_size():
    quantizer = FSQ([8, 5, 5, 5])
    with pytest.raises(ValueError, match="4 features"):
        quantizer(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="floating point"):
        quantizer(torch.ones(2, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook_dim|4 values"):
        quantizer.codes_to_indices(torch.zeros(3, 5))
