"""ResidualFSQ and GroupedResidualFSQ: the seed example, exact decoding round trips (sequences, channel-first
images and video, projections, groups, quantize dropout), the layer scales against a hand-written residual loop,
the reference's indices on a fixed input, quantize dropout, gradients and argument validation."""

import math

import pytest
import torch
from residual_helpers import fixed_input, kept_layers

from vector_quantize_pytorch import GroupedResidualFSQ, ResidualFSQ

LEVELS = [8, 5, 5, 3]


def residual_fsq_by_hand(h, levels, num_quantizers):
    """ResidualFSQ without projections written out from the paper's formulas (arXiv 2411.19842, 3.2).

    ``h``: ``(..., d)`` input before the soft clamp. Returns (quantized, indices ``(..., q)`` int64).
    """
    L = torch.tensor(levels, dtype=torch.float32)
    clamp = 1 + 1 / (L - 1)
    residual = torch.tanh(h / clamp) * clamp
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    out = torch.zeros_like(h)
    all_indices = []
    for layer in range(num_quantizers):
        scale = L**-layer
        z = (residual / scale).clamp(-1.0, 1.0)
        level_index = torch.floor((L - 1) * (z + 1) / 2 + 0.5)
        code = (2 / (L - 1) * level_index - 1) * scale
        all_indices.append((level_index.long() * basis).sum(-1))
        residual = residual - code
        out = out + code
    return out, torch.stack(all_indices, dim=-1)


# ------------------------------------------------------ the reference's usage example


def test_seed_residual_fsq_example():
    residual_fsq = ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_fsq.eval()
    quantized, indices = residual_fsq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8)
    assert indices.dtype == torch.int32
    quantized_out = residual_fsq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)


# ---------------------------------------------------------------- exact round trips

ROUND_TRIPS = {
    "sequence": (dict(levels=LEVELS, num_quantizers=4), (2, 10, 4)),
    "projection": (dict(levels=LEVELS, num_quantizers=4, dim=12), (2, 10, 12)),
    "channel_first_sequence": (dict(levels=LEVELS, num_quantizers=3, dim=6, is_channel_first=True), (2, 6, 9)),
    "channel_first_image": (dict(levels=LEVELS, num_quantizers=3, dim=6, is_channel_first=True), (2, 6, 3, 5)),
    "channel_first_video": (dict(levels=[5, 3], num_quantizers=2, is_channel_first=True), (2, 2, 2, 3, 4)),
    "soft_clamp_no_hard_clamp": (
        dict(levels=LEVELS, num_quantizers=3, bound_hard_clamp=False, soft_clamp_input_value=[1.5, 1.2, 1.2, 1.0]),
        (2, 10, 4),
    ),
    "no_clamp": (dict(levels=[7, 7], num_quantizers=5, bound_hard_clamp=False), (2, 10, 2)),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_output_equals_decoded_indices_exactly(name, mode):
    kwargs, shape = ROUND_TRIPS[name]
    torch.manual_seed(0)
    rfsq = getattr(ResidualFSQ(**kwargs), mode)()
    x = torch.randn(*shape) * 2
    quantized, indices, all_codes = rfsq(x, return_all_codes=True)
    channel_first = kwargs.get("is_channel_first", False)
    spatial = shape[2:] if channel_first else shape[1:-1]
    q, d = kwargs["num_quantizers"], len(kwargs["levels"])
    assert quantized.shape == x.shape
    assert indices.shape == (shape[0], *spatial, q) and indices.dtype == torch.int32
    assert all_codes.shape == (q, shape[0], *spatial, d)
    assert ((indices >= 0) & (indices < rfsq.codebook_size)).all()
    assert torch.equal(rfsq.get_output_from_indices(indices), quantized)
    assert torch.equal(rfsq.get_codes_from_indices(indices), all_codes)


def test_channel_first_matches_channel_last():
    torch.manual_seed(0)
    last = ResidualFSQ(levels=LEVELS, num_quantizers=3, dim=6).eval()
    first = ResidualFSQ(levels=LEVELS, num_quantizers=3, dim=6, is_channel_first=True).eval()
    first.load_state_dict(last.state_dict())
    image = torch.randn(2, 6, 3, 5)
    quantized, indices = first(image)
    expected_quantized, expected_indices = last(image.movedim(1, -1).reshape(2, 15, 6))
    assert torch.equal(indices.reshape(2, 15, 3), expected_indices)  # the q axis stays last
    assert torch.allclose(quantized.movedim(1, -1).reshape(2, 15, 6), expected_quantized, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_output_keeps_the_input_dtype(dtype):
    torch.manual_seed(0)
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=3).eval()  # no projections: the module has no weights to cast
    x = torch.randn(2, 10, 4).to(dtype)
    quantized, indices = rfsq(x)
    assert quantized.dtype == dtype and indices.dtype == torch.int32
    assert torch.equal(rfsq.get_output_from_indices(indices).to(dtype), quantized)


def test_fewer_layers_of_indices_decode_as_a_coarser_output():
    torch.manual_seed(0)
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=4).eval()
    quantized, indices, all_codes = rfsq(torch.randn(2, 10, 4), return_all_codes=True)
    coarse = rfsq.get_output_from_indices(indices[..., :2])
    assert torch.allclose(coarse, all_codes[:2].sum(0), atol=1e-7)
    padded = torch.cat((indices[..., :2], torch.full_like(indices[..., 2:], -1)), dim=-1)
    assert torch.equal(coarse, rfsq.get_output_from_indices(padded))
    with pytest.raises(ValueError, match="layers"):
        rfsq.get_output_from_indices(torch.zeros(2, 10, 5, dtype=torch.int32))


# ---------------------------------------------------------------- layers and scales


def test_layers_quantize_the_residual_scaled_by_levels_to_the_minus_layer():
    torch.manual_seed(0)
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=4).eval()
    x = torch.randn(3, 50, 4) * 2
    quantized, indices = rfsq(x)
    expected_quantized, expected_indices = residual_fsq_by_hand(x, LEVELS, 4)
    assert torch.equal(indices.long(), expected_indices)
    assert torch.allclose(quantized, expected_quantized, atol=1e-6)
    L = torch.tensor(LEVELS, dtype=torch.float32)
    assert torch.allclose(rfsq.scales, torch.stack([L**-i for i in range(4)]))
    for layer in rfsq.layers:
        assert layer.preserve_symmetry and layer.bound_hard_clamp and not layer.has_projections
    # each layer resolves a finer grid: the reconstruction error shrinks with every layer
    clamp = rfsq.soft_clamp_input_value
    h = torch.tanh(x / clamp) * clamp
    errors = [(rfsq.get_output_from_indices(indices[..., : i + 1]) - h).abs().max() for i in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_codes_of_layer_i_are_its_fsq_codes_times_the_scale():
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=3)
    codebook = rfsq.layers[0].implicit_codebook
    indices = torch.arange(rfsq.codebook_size, dtype=torch.int32)
    for layer in range(3):
        only_this_layer = torch.full((1, rfsq.codebook_size, 3), -1, dtype=torch.int32)
        only_this_layer[..., layer] = indices
        codes = rfsq.get_codes_from_indices(only_this_layer)
        expected = codebook * torch.tensor(LEVELS, dtype=torch.float32) ** -layer
        assert torch.allclose(codes[layer, 0], expected) and not codes[torch.arange(3) != layer].any()
    assert rfsq.codebooks.shape == (3, 8 * 5 * 5 * 3, 4)
    assert torch.equal(rfsq.codebooks[2], codebook)  # unscaled, as in the reference


def test_soft_clamp_values():
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=2)
    assert torch.allclose(rfsq.soft_clamp_input_value, 1 + 1 / (torch.tensor(LEVELS, dtype=torch.float32) - 1))
    assert ResidualFSQ(levels=LEVELS, num_quantizers=2, bound_hard_clamp=False).soft_clamp_input_value is None
    custom = ResidualFSQ(levels=LEVELS, num_quantizers=2, bound_hard_clamp=False, soft_clamp_input_value=2.0)
    assert torch.equal(custom.soft_clamp_input_value, torch.tensor(2.0))
    x = torch.full((1, 1, 4), 100.0)
    # the default clamp keeps a huge input at the outermost level of the first layer
    quantized, indices = rfsq.eval()(x)
    assert torch.equal(indices[0, 0, 0], torch.tensor(8 * 5 * 5 * 3 - 1, dtype=torch.int32))


def test_matches_the_reference_on_a_fixed_input():
    """Indices and output of vector-quantize-pytorch 1.32.0 (``ResidualFSQ(levels=[8, 5, 5, 3],
    num_quantizers=3)``, no projections) on :func:`fixed_input`, train and eval mode alike."""
    expected_indices = [
        [[588, 312, 232], [13, 347, 285], [537, 380, 386], [70, 295, 383], [488, 86, 577], [359, 49, 55]],
        [[240, 223, 516], [398, 460, 246], [2, 506, 371], [596, 282, 11], [13, 337, 260], [577, 229, 260]],
    ]
    expected_first_values = [0.0022321939, 0.74, 0.96, 1.0, 0.41741076, -0.44, -0.9, -1.0]
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=3)
    for mode in ("train", "eval"):
        quantized, indices = getattr(rfsq, mode)()(fixed_input())
        assert indices.tolist() == expected_indices
        assert torch.allclose(quantized.flatten()[:8], torch.tensor(expected_first_values), atol=1e-6)


def test_large_codebooks_get_int64_indices():
    rfsq = ResidualFSQ(levels=[2**16, 2**16 + 1], num_quantizers=2).eval()
    quantized, indices = rfsq(torch.rand(1, 20, 2) * 2 - 1)
    assert indices.dtype == torch.int64 and (indices >= 0).all() and indices.max() > 2**31


# ---------------------------------------------------------------- quantize dropout


@pytest.mark.parametrize("cutoff_index,multiple_of", [(0, 1), (2, 1), (0, 2), (1, 4)])
def test_dropout_respects_cutoff_and_multiple_and_decodes_the_training_output(cutoff_index, multiple_of):
    torch.manual_seed(0)
    num_quantizers = 6
    rfsq = ResidualFSQ(
        levels=LEVELS,
        num_quantizers=num_quantizers,
        dim=8,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=cutoff_index,
        quantize_dropout_multiple_of=multiple_of,
    ).train()
    x = torch.randn(2, 5, 8)
    seen = set()
    for seed in range(40):
        quantized, indices = rfsq(x, rand_quantize_dropout_fixed_seed=seed)
        kept = kept_layers(indices)
        assert (kept == kept.flatten()[0]).all()  # one cutoff per batch
        count = int(kept.flatten()[0])
        seen.add(count)
        assert count >= cutoff_index + 1
        assert count % multiple_of == 0 or count == num_quantizers
        assert torch.equal(rfsq.get_output_from_indices(indices), quantized)
    expected = {min(math.ceil(c / multiple_of) * multiple_of, num_quantizers) for c in range(cutoff_index + 1, 7)}
    assert seen == expected


def test_dropout_seed_reproduces_and_eval_or_no_grad_keep_every_layer():
    torch.manual_seed(0)
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=6, quantize_dropout=True).train()
    x = torch.randn(2, 5, 4)
    assert torch.equal(rfsq(x, rand_quantize_dropout_fixed_seed=3)[1], rfsq(x, rand_quantize_dropout_fixed_seed=3)[1])
    with torch.no_grad():
        assert (rfsq(x)[1] >= 0).all()
    assert (rfsq.eval()(x)[1] >= 0).all()


def test_per_sample_dropout_draws_a_cutoff_per_sample():
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=6, quantize_dropout=True, quantize_dropout_per_sample=True)
    x = torch.randn(16, 5, 4)
    quantized, indices = rfsq.train()(x, rand_quantize_dropout_fixed_seed=0)
    kept = kept_layers(indices)
    assert (kept == kept[:, :1]).all() and len(kept[:, 0].unique()) > 1
    assert torch.equal(rfsq.get_output_from_indices(indices), quantized)


def test_grouped_draws_a_dropout_seed_only_when_layers_drop():
    grfsq = GroupedResidualFSQ(dim=8, groups=2, levels=LEVELS, num_quantizers=3, quantize_dropout=True).train()
    x = torch.randn(2, 5, 8)
    state = torch.get_rng_state()
    with torch.no_grad():  # ResidualFSQ drops layers only while autograd records, as the reference
        grfsq(x)
    grfsq.eval()(x)
    assert torch.equal(torch.get_rng_state(), state)
    grfsq.train()(x)
    assert not torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- gradients


def test_gradients_reach_the_input_and_the_projections():
    torch.manual_seed(0)
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=3, dim=8).train()
    x = torch.randn(2, 10, 8, requires_grad=True)
    quantized, _ = rfsq(x)
    quantized.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert rfsq.project_in.weight.grad.abs().sum() > 0 and rfsq.project_out.weight.grad.abs().sum() > 0


def test_gradient_is_straight_through_for_every_layer():
    """Without projections every layer passes the gradient straight through, and the residual is detached between
    layers: d out / d h = number of layers whose scaled input lies inside the clamp range."""
    rfsq = ResidualFSQ(levels=[5, 5], num_quantizers=2, bound_hard_clamp=False).train()
    x = torch.tensor([[[0.05, -0.3]]], requires_grad=True)
    rfsq(x)[0].sum().backward()
    # layer 0 codes 0.05 -> 0 and -0.3 -> -0.5; layer 1 quantizes the residual times 5: 0.25 and 1.0. Each layer's
    # code is tanh-bounded, so its derivative is 1 - tanh^2 of what it sees (the 5 and 1/5 scales cancel)
    layer_1_input = (x.detach() - torch.tensor([0.0, -0.5])) * 5
    expected = (1 - torch.tanh(x.detach()) ** 2) + (1 - torch.tanh(layer_1_input) ** 2)
    assert torch.allclose(x.grad, expected, atol=1e-6)


# ---------------------------------------------------------------- grouped


@pytest.mark.parametrize("accept_image_fmap", [False, True])
def test_grouped_round_trip_and_shapes(accept_image_fmap):
    torch.manual_seed(0)
    grfsq = GroupedResidualFSQ(
        dim=16, groups=2, levels=LEVELS, num_quantizers=3, accept_image_fmap=accept_image_fmap
    ).eval()
    x = torch.randn(2, 16, 3, 5) if accept_image_fmap else torch.randn(2, 10, 16)
    quantized, indices, all_codes = grfsq(x, return_all_codes=True)
    spatial = (3, 5) if accept_image_fmap else (10,)
    assert quantized.shape == x.shape
    assert indices.shape == (2, 2, *spatial, 3) and indices.dtype == torch.int32
    assert all_codes.shape == (2, 3, 2, *spatial, 4)
    assert grfsq.codebooks.shape == (2, 3, 8 * 5 * 5 * 3, 4) and grfsq.codebook_size == 8 * 5 * 5 * 3
    assert torch.equal(grfsq.get_output_from_indices(indices), quantized)
    assert torch.equal(grfsq.get_codes_from_indices(indices), all_codes)
    # group g quantizes channels [8g, 8g + 8) with its own stack
    split = 1 if accept_image_fmap else -1
    for group, (rfsq, chunk) in enumerate(zip(grfsq.rvqs, x.chunk(2, dim=split))):
        assert torch.equal(rfsq(chunk)[1], indices[group])


def test_grouped_shares_the_dropout_cutoff_across_groups_and_decodes_the_training_output():
    torch.manual_seed(0)
    grfsq = GroupedResidualFSQ(dim=8, groups=4, levels=[5, 3], num_quantizers=6, quantize_dropout=True).train()
    x = torch.randn(2, 5, 8)
    seen = set()
    for _ in range(20):
        quantized, indices = grfsq(x)  # no seed given: one shared seed per call
        kept = kept_layers(indices)
        assert (kept == kept.flatten()[0]).all()
        seen.add(int(kept.flatten()[0]))
        assert torch.equal(grfsq.get_output_from_indices(indices), quantized)
    assert len(seen) > 1


def test_state_dict_keys_match_the_reference():
    keys = list(GroupedResidualFSQ(dim=16, groups=2, levels=[8, 5, 5, 5], num_quantizers=2).state_dict())
    expected = [
        f"rvqs.{g}.{p}.{t}" for g in range(2) for p in ("project_in", "project_out") for t in ("weight", "bias")
    ]
    assert keys == expected
    assert list(ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=2).state_dict()) == []


# ---------------------------------------------------------------- validation

INVALID = [
    (dict(levels=LEVELS, num_quantizers=0), ValueError, "num_quantizers"),
    (dict(levels=[8, 1], num_quantizers=2), ValueError, "levels"),
    (dict(levels=[], num_quantizers=2), ValueError, "levels"),
    (dict(levels=8, num_quantizers=2), TypeError, "levels"),
    (dict(levels=LEVELS, num_quantizers=2, dim=0), ValueError, "dim"),
    (dict(levels=LEVELS, num_quantizers=2, is_channel_first=1), TypeError, "is_channel_first"),
    (dict(levels=LEVELS, num_quantizers=2, quantize_dropout="yes"), TypeError, "quantize_dropout"),
    (dict(levels=LEVELS, num_quantizers=2, quantize_dropout_cutoff_index=2), ValueError, "cutoff_index"),
    (dict(levels=LEVELS, num_quantizers=2, quantize_dropout_cutoff_index=-1), ValueError, "cutoff_index"),
    (dict(levels=LEVELS, num_quantizers=2, quantize_dropout_cutoff_index="a"), TypeError, "cutoff_index"),
    (dict(levels=LEVELS, num_quantizers=2, quantize_dropout_multiple_of=0), ValueError, "multiple_of"),
    (dict(levels=LEVELS, num_quantizers=2, quantize_dropout_multiple_of=1.5), TypeError, "multiple_of"),
    (dict(levels=LEVELS, num_quantizers=2, quantize_dropout_per_sample=1), TypeError, "per_sample"),
    (dict(levels=LEVELS, num_quantizers=2, soft_clamp_input_value=2.0), ValueError, "soft_clamp_input_value"),
    (dict(levels=LEVELS, num_quantizers=2, bound_hard_clamp=None), TypeError, "bound_hard_clamp"),
    (
        dict(levels=LEVELS, num_quantizers=2, soft_clamp_input_value=-2.0, bound_hard_clamp=False),
        ValueError,
        "soft_clamp_input_value",
    ),
    (
        dict(levels=LEVELS, num_quantizers=2, soft_clamp_input_value=[1.0, 2.0], bound_hard_clamp=False),
        ValueError,
        "soft_clamp_input_value",
    ),
    (
        dict(levels=LEVELS, num_quantizers=2, soft_clamp_input_value="x", bound_hard_clamp=False),
        TypeError,
        "soft_clamp_input_value",
    ),
]


@pytest.mark.parametrize("kwargs,error,name", INVALID)
def test_invalid_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        ResidualFSQ(**kwargs)


def test_invalid_grouped_arguments_and_inputs():
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualFSQ(dim=5, groups=2, levels=LEVELS, num_quantizers=2)
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualFSQ(dim=4, groups=0, levels=LEVELS, num_quantizers=2)
    with pytest.raises(TypeError, match="accept_image_fmap"):
        GroupedResidualFSQ(dim=4, groups=2, levels=LEVELS, num_quantizers=2, accept_image_fmap=1)
    with pytest.raises(ValueError, match="features"):
        GroupedResidualFSQ(dim=16, groups=2, levels=LEVELS, num_quantizers=2)(torch.randn(1, 3, 12))
    rfsq = ResidualFSQ(levels=LEVELS, num_quantizers=2, dim=8)
    with pytest.raises(ValueError, match="features"):
        rfsq(torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="x"):
        rfsq(torch.randn(3, 8))
    with pytest.raises(TypeError, match="x"):
        rfsq(torch.ones(1, 3, 8, dtype=torch.long))
