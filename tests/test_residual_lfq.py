"""ResidualLFQ and GroupedResidualLFQ: the seed example, exact decoding round trips (sequences, images, video,
projections, groups, quantize dropout), layer scales and aux losses against a brute-force softmax over every code,
masks, the reference's numbers on a fixed input, quantize dropout, gradients and argument validation."""

import math

import pytest
import torch
from residual_helpers import fixed_input, kept_layers

from vector_quantize_pytorch import GroupedResidualLFQ, ResidualLFQ


def all_codes(bits, scale):
    """Every code of ``bits`` bits in index order (most significant bit first), values ``+-scale``: ``(2^K, K)``."""
    index = torch.arange(2**bits).unsqueeze(-1)
    return (((index >> torch.arange(bits - 1, -1, -1)) & 1) * 2 - 1).double() * scale


def entropy(p):
    return -torch.special.xlogy(p, p).sum(-1)


def residual_lfq_by_hand(
    tokens, num_quantizers, soft_clamp=None, entropy_weight=0.1, commitment_weight=0.0, mask=None, tau=100.0
):
    """ResidualLFQ without projections in float64 from the MAGVIT-v2 definitions, with the softmax over all codes.

    Layer ``i`` has codes ``+-2^-i``; it sees the residual (soft-clamped to ``soft_clamp * 2^-i``), quantizes it to
    its sign and, over the tokens where ``mask`` is True, its loss is
    ``entropy_weight * (mean_x H(q(.|x)) - H(mean_x q(.|x))) + commitment_weight * mse`` with
    ``q(c|x) = softmax_c(2 tau <x, c>)``. ``tokens``: ``(N, K)``.
    Returns (quantized, indices ``(N, q)``, losses ``(q,)``).
    """
    tokens = tokens.double()
    bits = tokens.shape[-1]
    weights = torch.ones(tokens.shape[0], dtype=torch.float64) if mask is None else mask.double()
    weights = weights / weights.sum()
    residual, out, all_indices, losses = tokens, torch.zeros_like(tokens), [], []
    for layer in range(num_quantizers):
        scale = 2.0**-layer
        z = residual if soft_clamp is None else torch.tanh(residual / (soft_clamp * scale)) * soft_clamp * scale
        codes = all_codes(bits, scale)
        quantized = torch.where(z > 0, scale, -scale)
        all_indices.append(((z > 0).long() * 2 ** torch.arange(bits - 1, -1, -1)).sum(-1))
        probs = torch.softmax(2 * tau * z @ codes.T, dim=-1)
        per_sample = (entropy(probs) * weights).sum()
        batch = entropy((probs * weights.unsqueeze(-1)).sum(0))
        commitment = ((z - quantized).square().mean(-1) * weights).sum()
        losses.append(entropy_weight * (per_sample - batch) + commitment_weight * commitment)
        residual = residual - quantized
        out = out + quantized
    return out, torch.stack(all_indices, dim=-1), torch.stack(losses)


# ------------------------------------------------------ the reference's usage example


def test_seed_residual_lfq_example():
    residual_lfq = ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    residual_lfq.eval()
    quantized, indices, commit_loss = residual_lfq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)
    assert indices.dtype == torch.int64
    quantized_out = residual_lfq.get_output_from_indices(indices)
    assert quantized_out.shape == (1, 1024, 256)
    assert torch.all(quantized == quantized_out)


# ---------------------------------------------------------------- exact round trips

ROUND_TRIPS = {
    "sequence": (dict(dim=4, codebook_size=16, num_quantizers=4), (2, 10, 4)),
    "projection": (dict(dim=12, codebook_size=16, num_quantizers=4), (2, 10, 12)),
    "image": (dict(dim=6, codebook_size=16, num_quantizers=3), (2, 6, 3, 5)),
    "image_no_projection": (dict(dim=4, codebook_size=16, num_quantizers=3), (2, 4, 3, 5)),
    "video": (dict(dim=6, codebook_size=8, num_quantizers=2), (2, 6, 2, 3, 4)),
    "soft_clamp_commitment": (
        dict(dim=8, codebook_size=32, num_quantizers=3, soft_clamp_input_value=2.0, commitment_loss_weight=0.5),
        (2, 10, 8),
    ),
    "spherical": (dict(dim=4, codebook_size=16, num_quantizers=3, spherical=True), (2, 10, 4)),
    # codes +-2^-i / sqrt(3) are not dyadic: only a sum in layer order decodes exactly
    "spherical_odd_bits": (dict(dim=3, codebook_size=8, num_quantizers=8, spherical=True), (4, 50, 3)),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_output_equals_decoded_indices_exactly(name, mode):
    kwargs, shape = ROUND_TRIPS[name]
    torch.manual_seed(0)
    rlfq = getattr(ResidualLFQ(**kwargs), mode)()
    x = torch.randn(*shape)
    quantized, indices, losses, codes = rlfq(x, return_all_codes=True)
    spatial = shape[2:] if len(shape) >= 4 else shape[1:-1]
    q, bits = kwargs["num_quantizers"], int(math.log2(kwargs["codebook_size"]))
    assert quantized.shape == x.shape
    assert indices.shape == (shape[0], *spatial, q) and indices.dtype == torch.int64
    assert losses.shape == (q,) and losses.dtype == torch.float32
    assert codes.shape == (q, shape[0], *spatial, bits)
    assert ((indices >= 0) & (indices < kwargs["codebook_size"])).all()
    assert torch.equal(rlfq.get_output_from_indices(indices), quantized)
    assert torch.equal(rlfq.get_codes_from_indices(indices), codes)
    if mode == "eval":
        assert not losses.any()
    else:
        assert (losses != 0).all()


def test_image_matches_its_tokens():
    torch.manual_seed(0)
    rlfq = ResidualLFQ(dim=6, codebook_size=16, num_quantizers=3).train()
    image = torch.randn(2, 6, 3, 5)
    quantized, indices, losses = rlfq(image)
    tokens = image.movedim(1, -1).reshape(2, 15, 6)
    expected_quantized, expected_indices, expected_losses = rlfq(tokens)
    assert torch.equal(indices.reshape(2, 15, 3), expected_indices)
    assert torch.allclose(quantized.movedim(1, -1).reshape(2, 15, 6), expected_quantized, atol=1e-6)
    assert torch.allclose(losses, expected_losses, atol=1e-6)


def test_fewer_layers_of_indices_decode_as_a_coarser_output():
    torch.manual_seed(0)
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=4).eval()
    _, indices, _, codes = rlfq(torch.randn(2, 10, 4), return_all_codes=True)
    assert torch.allclose(rlfq.get_output_from_indices(indices[..., :2]), codes[:2].sum(0))


# ---------------------------------------------------------------- layers, scales and losses


def test_layer_scales_halve_and_soft_clamps_halve():
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=4, soft_clamp_input_value=1.5)
    codebooks = rlfq.codebooks
    assert codebooks.shape == (4, 16, 4)
    for i, layer in enumerate(rlfq.layers):
        assert layer.codebook_scale == 2.0**-i and not layer.has_projections
        assert layer.soft_clamp_input_value == 1.5 * 2.0**-i
        assert torch.equal(codebooks[i].double(), all_codes(4, 2.0**-i))
    assert ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2).layers[1].soft_clamp_input_value is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(soft_clamp_input_value=1.5, commitment_loss_weight=0.25),
        dict(entropy_loss_weight=0.3, commitment_loss_weight=1.0),
    ],
)
def test_training_outputs_and_losses_match_a_brute_force_softmax(kwargs):
    torch.manual_seed(0)
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, **kwargs).train()
    x = torch.randn(2, 12, 4) * 0.5
    quantized, indices, losses = rlfq(x)
    expected_quantized, expected_indices, expected_losses = residual_lfq_by_hand(
        x.reshape(-1, 4),
        3,
        soft_clamp=kwargs.get("soft_clamp_input_value"),
        entropy_weight=kwargs.get("entropy_loss_weight", 0.1),
        commitment_weight=kwargs.get("commitment_loss_weight", 0.0),
    )
    assert torch.equal(indices.reshape(-1, 3), expected_indices)
    assert torch.equal(quantized.reshape(-1, 4).double(), expected_quantized)
    assert torch.allclose(losses.double(), expected_losses, atol=1e-5, rtol=1e-5)


def test_matches_the_reference_on_a_fixed_input():
    """Indices and aux losses of vector-quantize-pytorch 1.32.0 in training mode (no projections) on
    :func:`fixed_input`. Every code probability that matters is far above the reference's 1e-5 log clamp here,
    so the losses agree although ours are the exact entropies."""
    expected_indices = [
        [[7, 11, 12], [8, 4, 7], [7, 9, 2], [12, 10, 3], [3, 4, 9], [14, 13, 1]],
        [[1, 2, 12], [15, 6, 8], [0, 9, 6], [15, 3, 4], [8, 4, 3], [7, 9, 2]],
    ]
    cases = {
        "plain": (dict(), 1.0, [-0.19297146797180176, -0.19356001913547516, -0.2107454389333725]),
        "small": (dict(), 0.01, [-0.1279444694519043, -0.19792047142982483, -0.19792047142982483]),
        "clamp": (
            dict(soft_clamp_input_value=1.5, commitment_loss_weight=0.25),
            1.0,
            [-0.1443897932767868, -0.17560499906539917, -0.20841428637504578],
        ),
    }
    for kwargs, factor, expected_losses in cases.values():
        rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, **kwargs).train()
        _, indices, losses = rlfq(fixed_input() * factor)
        if factor == 1.0:
            assert indices.tolist() == expected_indices
        assert torch.allclose(losses, torch.tensor(expected_losses), atol=2e-6)


def test_losses_are_zero_in_eval_and_without_entropy_or_commitment():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 8)
    rlfq = ResidualLFQ(dim=8, codebook_size=16, num_quantizers=3, commitment_loss_weight=1.0)
    assert (rlfq.train()(x)[2] != 0).all()
    assert torch.equal(rlfq.eval()(x)[2], torch.zeros(3))
    silent = ResidualLFQ(dim=8, codebook_size=16, num_quantizers=3, entropy_loss_weight=0.0).train()
    assert torch.equal(silent(x)[2], torch.zeros(3))


# ---------------------------------------------------------------- masks


def test_masked_tokens_change_no_loss():
    torch.manual_seed(0)
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.5).train()
    x = torch.randn(2, 8, 4)
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 2 + [False] * 6])
    _, _, losses = rlfq(x, mask=mask)
    _, _, expected = residual_lfq_by_hand(x.reshape(-1, 4), 3, commitment_weight=0.5, mask=mask.flatten())
    assert torch.allclose(losses.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(losses, rlfq(x[mask].unsqueeze(0))[2], atol=1e-6)
    # whatever sits under the mask does not count
    assert torch.allclose(losses, rlfq(torch.where(mask.unsqueeze(-1), x, 100.0), mask=mask)[2], atol=1e-6)
    # and the mask does not change the quantization
    assert torch.equal(rlfq(x, mask=mask)[1], rlfq(x)[1])


def test_image_mask():
    torch.manual_seed(0)
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2).train()
    image = torch.randn(2, 4, 3, 3)
    mask = torch.rand(2, 3, 3) > 0.4
    _, _, losses = rlfq(image, mask=mask)
    tokens = image.movedim(1, -1)[mask].unsqueeze(0)
    assert torch.allclose(losses, rlfq(tokens)[2], atol=1e-6)


# ---------------------------------------------------------------- quantize dropout


@pytest.mark.parametrize("cutoff_index,multiple_of", [(0, 1), (2, 1), (0, 2), (1, 4)])
def test_dropout_respects_cutoff_and_multiple_and_decodes_the_training_output(cutoff_index, multiple_of):
    torch.manual_seed(0)
    num_quantizers = 6
    rlfq = ResidualLFQ(
        dim=8,
        codebook_size=16,
        num_quantizers=num_quantizers,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=cutoff_index,
        quantize_dropout_multiple_of=multiple_of,
    ).train()
    x = torch.randn(2, 5, 8)
    seen = set()
    for seed in range(40):
        quantized, indices, losses = rlfq(x, rand_quantize_dropout_fixed_seed=seed)
        kept = kept_layers(indices)
        assert (kept == kept.flatten()[0]).all()
        count = int(kept.flatten()[0])
        seen.add(count)
        assert count >= cutoff_index + 1
        assert count % multiple_of == 0 or count == num_quantizers
        assert (losses[:count] != 0).all() and not losses[count:].any()
        assert torch.equal(rlfq.get_output_from_indices(indices), quantized)
    expected = {min(math.ceil(c / multiple_of) * multiple_of, num_quantizers) for c in range(cutoff_index + 1, 7)}
    assert seen == expected


def test_no_dropout_in_eval_or_without_grad():
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=6, quantize_dropout=True).train()
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert (rlfq(x)[1] >= 0).all()
    assert (rlfq.eval()(x)[1] >= 0).all()


# ---------------------------------------------------------------- gradients


def test_gradients_reach_the_input_through_the_output_and_the_losses():
    torch.manual_seed(0)
    rlfq = ResidualLFQ(dim=8, codebook_size=16, num_quantizers=3, commitment_loss_weight=0.5).train()
    for use_output in (True, False):
        x = torch.randn(2, 10, 8, requires_grad=True)
        quantized, _, losses = rlfq(x)
        (quantized.square().sum() if use_output else losses.sum()).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert rlfq.project_in.weight.grad.abs().sum() > 0


def test_output_gradient_is_straight_through_without_projections():
    """Each layer's output is its input with the sign's gradient replaced by the identity and the residual between
    layers detached: d out / d x = number of layers."""
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3).train()
    x = torch.randn(2, 5, 4, requires_grad=True)
    rlfq(x)[0].sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


# ---------------------------------------------------------------- grouped


@pytest.mark.parametrize("accept_image_fmap", [False, True])
def test_grouped_round_trip_and_shapes(accept_image_fmap):
    torch.manual_seed(0)
    grlfq = GroupedResidualLFQ(
        dim=16, groups=2, codebook_size=16, num_quantizers=3, accept_image_fmap=accept_image_fmap
    ).train()
    x = torch.randn(2, 16, 3, 5) if accept_image_fmap else torch.randn(2, 10, 16)
    quantized, indices, losses, codes = grlfq(x, return_all_codes=True)
    spatial = (3, 5) if accept_image_fmap else (10,)
    assert quantized.shape == x.shape
    assert indices.shape == (2, 2, *spatial, 3) and indices.dtype == torch.int64
    assert losses.shape == (2, 3) and codes.shape == (2, 3, 2, *spatial, 4)
    assert grlfq.codebooks.shape == (2, 3, 16, 4)
    assert torch.equal(grlfq.get_output_from_indices(indices), quantized)
    assert torch.equal(grlfq.get_codes_from_indices(indices), codes)
    split = 1 if accept_image_fmap else -1
    for group, (rlfq, chunk) in enumerate(zip(grlfq.rvqs, x.chunk(2, dim=split))):
        _, group_indices, group_losses = rlfq(chunk)
        assert torch.equal(group_indices, indices[group]) and torch.allclose(group_losses, losses[group])
    grlfq.eval()
    assert not grlfq(x)[2].any()


def test_grouped_mask_reaches_every_group():
    torch.manual_seed(0)
    grlfq = GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=2).train()
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    assert torch.allclose(grlfq(x, mask=mask)[2], grlfq(x[:, :3])[2], atol=1e-6)


def test_grouped_shares_the_dropout_cutoff_across_groups_and_decodes_the_training_output():
    torch.manual_seed(0)
    grlfq = GroupedResidualLFQ(dim=8, groups=4, codebook_size=4, num_quantizers=6, quantize_dropout=True).train()
    x = torch.randn(2, 5, 8)
    seen = set()
    for _ in range(20):
        quantized, indices, losses = grlfq(x)  # no seed given: one shared seed per call
        kept = kept_layers(indices)
        count = int(kept.flatten()[0])
        assert (kept == count).all()
        assert not losses[:, count:].any()
        seen.add(count)
        assert torch.equal(grlfq.get_output_from_indices(indices), quantized)
    assert len(seen) > 1


def test_state_dict_keys_match_the_reference():
    keys = list(GroupedResidualLFQ(dim=32, groups=2, codebook_size=256, num_quantizers=2).state_dict())
    expected = [
        f"rvqs.{g}.{key}"
        for g in range(2)
        for key in (
            "project_in.weight",
            "project_in.bias",
            "project_out.weight",
            "project_out.bias",
            "layers.0.mask",
            "layers.1.mask",
        )
    ]
    assert keys == expected


# ---------------------------------------------------------------- validation

INVALID = [
    (dict(dim=8, codebook_size=12, num_quantizers=2), ValueError, "codebook_size"),
    (dict(dim=8, codebook_size=1, num_quantizers=2), ValueError, "codebook_size"),
    (dict(dim=8, codebook_size=16.0, num_quantizers=2), TypeError, "codebook_size"),
    (dict(dim=0, codebook_size=16, num_quantizers=2), ValueError, "dim"),
    (dict(dim=8, codebook_size=16, num_quantizers=0), ValueError, "num_quantizers"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, soft_clamp_input_value=0.0), ValueError, "soft_clamp"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, soft_clamp_input_value=0.5), ValueError, "soft_clamp"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, quantize_dropout=1), TypeError, "quantize_dropout"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, quantize_dropout_cutoff_index=2), ValueError, "cutoff_index"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, quantize_dropout_multiple_of=0), ValueError, "multiple_of"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, quantize_dropout_per_sample="no"), TypeError, "per_sample"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, entropy_loss_weight=-1.0), ValueError, "entropy_loss_weight"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, num_codebooks=2), ValueError, "num_codebooks"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, has_projections=True), ValueError, "has_projections"),
    (dict(dim=8, codebook_size=16, num_quantizers=2, channel_first=True), ValueError, "channel_first"),
]


@pytest.mark.parametrize("kwargs,error,name", INVALID)
def test_invalid_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        ResidualLFQ(**kwargs)


def test_invalid_grouped_arguments_and_inputs():
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualLFQ(dim=7, groups=2, codebook_size=16, num_quantizers=2)
    with pytest.raises(TypeError, match="accept_image_fmap"):
        GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=2, accept_image_fmap=1)
    rlfq = ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2)
    with pytest.raises(ValueError, match="features"):
        rlfq(torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="x"):
        rlfq(torch.randn(3, 8))
    with pytest.raises((ValueError, TypeError), match="mask"):
        rlfq(torch.randn(1, 3, 8), mask=torch.ones(1, 4, dtype=torch.bool))
