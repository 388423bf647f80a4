"""LFQ / BSQ: reference equality, exact entropies against enumeration, masks, layouts and argument checks."""

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vector_quantize_pytorch.lookup_free_quantization import LFQ, LossBreakdown, Return, sample_token_subset

FIXTURE = Path(__file__).parent / "fixtures" / "lfq_codebook256.pt"


def fixed_input(*shape):
    """A deterministic input, the same in any torch build: ``2.5 * sin(0.7 * i)`` over the flat index."""
    return (torch.arange(math.prod(shape), dtype=torch.float64) * 0.7).sin().mul(2.5).float().reshape(shape)


def brute_force_entropies(h, inv_temperature, code_value, mask=None):
    """Per-sample and batch entropy of ``softmax_c(2 * T * <h, c>)`` over every corner ``c`` of
    ``{-v, +v}^K``, enumerated in float64. ``h``: ``(N, c, K)`` quantizer-space tokens."""
    num_bits = h.shape[-1]
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=num_bits)), dtype=torch.float64) * code_value
    probs = (2 * inv_temperature * h.double() @ corners.T).softmax(dim=-1)
    if mask is not None:
        probs = probs[mask]

    def entropy(p):
        return torch.where(p > 0, -p * p.log(), torch.zeros_like(p)).sum(-1)

    return entropy(probs).mean(), entropy(probs.mean(0)).mean()


# the reference's usage examples


def test_seed_example_image():
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
    assert quantized.shape == (1, 16, 32, 32) and indices.shape == (1, 32, 32) and entropy_aux_loss.shape == ()
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_seed_example_sequence_and_video():
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert seq.shape == quantized.shape
    video_feats = torch.randn(1, 16, 10, 32, 32)
    quantized, *_ = quantizer(video_feats)
    assert video_feats.shape == quantized.shape


def test_seed_example_multiple_codebooks():
    quantizer = LFQ(codebook_size=4096, dim=16, num_codebooks=4)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats)
    assert quantized.shape == (1, 16, 32, 32) and indices.shape == (1, 32, 32, 4) and entropy_aux_loss.shape == ()
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


# the reference's numbers

# Produced by running the reference (vector-quantize-pytorch 1.32.0, ~/ref-venv/bin/python):
#   LFQ(codebook_size=16, commitment_loss_weight=0.5)(fixed_input(2, 5, 4) * 0.2, inv_temperature=T,
#   return_loss_breakdown=True) in training mode; values: (loss, per_sample_entropy, batch_entropy, commitment).
REFERENCE_INDICES = [[7, 8, 7, 12, 3], [14, 1, 15, 0, 15]]
REFERENCE_LOSSES = {
    1.0: (0.18559055030345917, 2.042961359024048, 2.6502506732940674, 0.4926389753818512),
    100.0: (0.05341872572898865, 0.08495334535837173, 2.013960838317871, 0.4926389753818512),
}


@pytest.mark.parametrize("inv_temperature", sorted(REFERENCE_LOSSES))
def test_default_outputs_equal_the_reference(inv_temperature):
    quantizer = LFQ(codebook_size=16, commitment_loss_weight=0.5)
    x = fixed_input(2, 5, 4) * 0.2
    (quantized, indices, loss), breakdown = quantizer(x, inv_temperature=inv_temperature, return_loss_breakdown=True)
    assert indices.dtype == torch.int64 and indices.tolist() == REFERENCE_INDICES
    assert torch.equal(quantized, torch.where(x > 0, 1.0, -1.0))
    expected = REFERENCE_LOSSES[inv_temperature]
    actual = (loss, *breakdown)
    for value, reference in zip(actual, expected):
        assert value.item() == pytest.approx(reference, rel=1e-5)


def test_reference_checkpoint_gives_the_reference_outputs():
    fixture = torch.load(FIXTURE, weights_only=True)
    quantizer = LFQ(**fixture["config"])
    quantizer.load_state_dict(fixture["state_dict"], strict=True)
    quantizer.eval()
    with torch.no_grad():
        quantized, indices, loss = quantizer(fixture["input"])
        decoded = quantizer.indices_to_codes(indices)
    assert torch.equal(indices, fixture["outputs"]["indices"])
    torch.testing.assert_close(quantized, fixture["outputs"]["quantized"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(decoded, fixture["outputs"]["decoded"], atol=1e-6, rtol=1e-6)
    assert loss.shape == () and loss.item() == 0.0


def test_state_dict_keys_match_the_reference():
    state = LFQ(codebook_size=256, dim=16).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "mask": (8,),
        "project_in.weight": (8, 16),
        "project_in.bias": (8,),
        "project_out.weight": (16, 8),
        "project_out.bias": (16,),
    }
    assert state["mask"].tolist() == [128, 64, 32, 16, 8, 4, 2, 1]
    assert list(LFQ(codebook_size=16, orthogonal_rotation=True).state_dict()) == ["orthogonal_rot", "mask"]
    cosine = LFQ(codebook_size=256, dim=16, cosine_sim_project_in=True).state_dict()
    assert tuple(cosine["project_in.weight"].shape) == (16, 8) and "project_in.bias" not in cosine


# exact entropies


ENTROPY_CASES = {
    "3_bits": (dict(codebook_size=8), 2.0),
    "8_bits_scaled": (dict(codebook_size=256, codebook_scale=0.5), 1.5),
    "12_bits": (dict(codebook_size=4096), 1.0),
    "two_codebooks": (dict(codebook_size=32, num_codebooks=2), 1.0),
    "spherical": (dict(codebook_size=64, spherical=True, codebook_scale=2.0), 3.0),
}


@pytest.mark.parametrize("name", sorted(ENTROPY_CASES))
def test_entropies_equal_enumeration(name):
    config, inv_temperature = ENTROPY_CASES[name]
    torch.manual_seed(0)
    quantizer = LFQ(**config, entropy_loss_weight=1.0)
    x = torch.randn(3, 20, quantizer.dim) * 0.7
    _, (sample_entropy, batch_entropy, _) = quantizer(x, inv_temperature=inv_temperature, return_loss_breakdown=True)

    k, scale = quantizer.codebook_dim, quantizer.codebook_scale
    h = x.double().reshape(60, quantizer.num_codebooks, k)
    code_value = scale
    if quantizer.spherical:
        h, code_value = F.normalize(h, dim=-1) * scale, scale / math.sqrt(k)
    expected_sample, expected_batch = brute_force_entropies(h, inv_temperature, code_value)
    assert sample_entropy.item() == pytest.approx(expected_sample.item(), rel=1e-5)
    assert batch_entropy.item() == pytest.approx(expected_batch.item(), rel=1e-5)


def test_loss_is_per_sample_minus_gamma_batch_entropy():
    """The loss against float64 enumeration and a hand-written commitment (not against its own breakdown)."""
    quantizer = LFQ(codebook_size=64, entropy_loss_weight=0.3, diversity_gamma=0.7, commitment_loss_weight=2.0)
    x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(4))
    (_, _, loss), breakdown = quantizer(x, inv_temperature=2.0, return_loss_breakdown=True)
    sample_entropy, batch_entropy = brute_force_entropies(x.double().reshape(18, 1, 6), 2.0, 1.0)
    commitment = (x.double() - torch.where(x > 0, 1.0, -1.0).double()).square().mean()
    expected = 0.3 * (sample_entropy - 0.7 * batch_entropy) + 2.0 * commitment
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert breakdown.commitment.item() == pytest.approx(commitment.item(), rel=1e-6)


def test_huge_codebook_trains():
    quantizer = LFQ(codebook_size=2**32)
    x = torch.randn(2, 8, 32, requires_grad=True)
    (quantized, indices, loss), breakdown = quantizer(x, inv_temperature=1.0, return_loss_breakdown=True)
    (quantized.sum() + loss).backward()
    assert indices.dtype == torch.int64 and indices.min() >= 0 and (indices < 2**32).all()
    assert torch.isfinite(x.grad).all() and loss.shape == ()
    # the grouped estimate (an upper bound of the exact entropy) stays within [0, 32 bits]
    assert 0 < breakdown.batch_entropy.item() <= 32 * math.log(2)
    quantizer.eval()
    with torch.no_grad():
        out, indices, _ = quantizer(x)
    assert torch.equal(quantizer.indices_to_codes(indices), out)


# masks and token subsets


def test_masked_tokens_change_neither_entropy_nor_commitment():
    torch.manual_seed(0)
    quantizer = LFQ(codebook_size=32, commitment_loss_weight=1.0, entropy_loss_weight=1.0)
    x = torch.randn(1, 12, 5)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :7] = True
    garbage = x.clone()
    garbage[:, 7:] = 100.0
    _, masked = quantizer(garbage, inv_temperature=1.5, return_loss_breakdown=True, mask=mask)
    _, kept_only = quantizer(x[:, :7], inv_temperature=1.5, return_loss_breakdown=True)
    for a, b in zip(masked, kept_only):
        torch.testing.assert_close(a, b)


def test_mask_for_images_may_be_spatial():
    """A (b, h, w) mask keeps the same positions as its row-major flattening: the entropies and commitment equal
    those of the kept tokens alone (float64 enumeration), so a transposed or shuffled mask fails."""
    quantizer = LFQ(codebook_size=16, commitment_loss_weight=1.0)  # dim 4, no projection
    generator = torch.Generator().manual_seed(6)
    image = torch.randn(2, 4, 3, 5, generator=generator)
    mask = torch.rand(2, 3, 5, generator=generator) > 0.5
    _, flat = quantizer(image, inv_temperature=2.0, return_loss_breakdown=True, mask=mask.flatten(1))
    _, spatial = quantizer(image, inv_temperature=2.0, return_loss_breakdown=True, mask=mask)
    kept = image.permute(0, 2, 3, 1)[mask]  # (tokens kept, 4)
    sample_entropy, batch_entropy = brute_force_entropies(kept.double().unsqueeze(1), 2.0, 1.0)
    commitment = (kept.double() - torch.where(kept > 0, 1.0, -1.0).double()).square().mean()
    for got in (flat, spatial):
        assert got.per_sample_entropy.item() == pytest.approx(sample_entropy.item(), rel=1e-5)
        assert got.batch_entropy.item() == pytest.approx(batch_entropy.item(), rel=1e-5)
        assert got.commitment.item() == pytest.approx(commitment.item(), rel=1e-5)
    transposed = mask.transpose(1, 2).reshape(2, 3, 5)  # same count, other positions
    _, wrong = quantizer(image, inv_temperature=2.0, return_loss_breakdown=True, mask=transposed)
    assert wrong.batch_entropy.item() != pytest.approx(batch_entropy.item(), rel=1e-5)


def test_frac_per_sample_entropy_subsamples_only_the_per_sample_entropy():
    """The reference's bug 13: it subsampled the tokens of the batch entropy too."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6)
    full = LFQ(codebook_size=64, entropy_loss_weight=1.0)
    sub = LFQ(codebook_size=64, entropy_loss_weight=1.0, frac_per_sample_entropy=0.25)
    _, (full_sample, full_batch, _) = full(x, inv_temperature=1.0, return_loss_breakdown=True)
    _, (sub_sample, sub_batch, _) = sub(x, inv_temperature=1.0, return_loss_breakdown=True)
    torch.testing.assert_close(sub_batch, full_batch)
    per_token = torch.stack([full(x[i : i + 1, j : j + 1], inv_temperature=1.0, return_loss_breakdown=True)[1][0]
                             for i in range(2) for j in range(16)])  # fmt: skip
    assert per_token.min() <= sub_sample <= per_token.max()
    assert not torch.allclose(sub_sample, full_sample)


def test_sample_token_subset_respects_the_mask_and_fraction():
    mask = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    for _ in range(5):
        subset = sample_token_subset(mask, 10, 0.5, "cpu")
        assert subset.sum() == 3 and not (subset & ~mask).any()
    assert sample_token_subset(None, 10, 0.35, "cpu").sum() == 3
    assert sample_token_subset(None, 10, 0.01, "cpu").sum() == 1


# decoding, layouts, dtypes


DECODE_CONFIGS = {
    "sequence": (dict(codebook_size=256, dim=16), (2, 7, 16)),
    "no_projection": (dict(codebook_size=64), (2, 7, 6)),
    "image": (dict(codebook_size=256, dim=16), (2, 16, 3, 4)),
    "video": (dict(codebook_size=256, dim=16), (1, 16, 2, 3, 4)),
    "codebooks": (dict(codebook_size=16, dim=12, num_codebooks=3), (2, 7, 12)),
    "codebooks_image": (dict(codebook_size=4096, dim=16, num_codebooks=4), (1, 16, 4, 4)),
    "spherical": (dict(codebook_size=64, spherical=True, codebook_scale=0.5), (2, 7, 6)),
    "rotation": (dict(codebook_size=64, orthogonal_rotation=True), (2, 7, 6)),
    "scaled": (dict(codebook_size=64, codebook_scale=0.25), (2, 7, 6)),
    "channel_first_sequence": (dict(codebook_size=64, dim=8, channel_first=True), (2, 8, 9)),
    "channel_last_image": (dict(codebook_size=64, dim=8, channel_first=False), (2, 3, 4, 8)),
    "single_token": (dict(codebook_size=64, dim=8), (5, 8)),
}


@pytest.mark.parametrize("name", sorted(DECODE_CONFIGS))
def test_decoding_indices_gives_the_eval_output_exactly(name):
    config, shape = DECODE_CONFIGS[name]
    torch.manual_seed(0)
    quantizer = LFQ(**config).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        ret = quantizer(x)
        decoded = quantizer.indices_to_codes(ret.indices)
    assert isinstance(ret, Return) and ret.quantized.shape == x.shape
    assert torch.equal(decoded, ret.quantized)
    assert ret.entropy_aux_loss.shape == () and ret.entropy_aux_loss.item() == 0.0


@pytest.mark.parametrize(
    ("config", "shape", "index_shape"),
    [
        (dict(codebook_size=64, dim=8), (2, 9, 8), (2, 9)),
        (dict(codebook_size=64, dim=8), (2, 8, 4, 5), (2, 4, 5)),
        (dict(codebook_size=64, dim=8), (2, 8, 3, 4, 5), (2, 3, 4, 5)),
        (dict(codebook_size=64, dim=8), (3, 8), (3,)),
        (dict(codebook_size=16, dim=8, num_codebooks=2), (2, 9, 8), (2, 9, 2)),
        (dict(codebook_size=16, keep_num_codebooks_dim=True), (2, 9, 4), (2, 9, 1)),
    ],
)
def test_shapes(config, shape, index_shape):
    quantized, indices, loss = LFQ(**config)(torch.randn(*shape))
    assert quantized.shape == shape and indices.shape == index_shape and loss.shape == ()
    assert indices.dtype == torch.int64


def test_indices_are_bits_most_significant_first():
    quantizer = LFQ(codebook_size=8)
    _, indices, _ = quantizer(torch.tensor([[[1.0, -1.0, -1.0], [-1.0, -1.0, 2.0], [0.5, 0.0, 0.5]]]))
    assert indices.tolist() == [[4, 1, 5]]
    codebook = quantizer.codebook
    assert codebook.shape == (8, 3) and codebook[5].tolist() == [1.0, -1.0, 1.0]
    quantizer.eval()
    assert torch.equal(quantizer(codebook.unsqueeze(0)).indices[0], torch.arange(8))


def test_codebook_is_built_only_when_read():
    quantizer = LFQ(codebook_size=2**20)
    assert all(buffer.numel() <= 20 for buffer in quantizer.buffers())
    assert LFQ(codebook_size=16, codebook_scale=0.5).codebook.abs().unique().tolist() == [0.5]


def test_indices_to_codes_without_projection():
    quantizer = LFQ(codebook_size=16, dim=10, num_codebooks=2)
    codes = quantizer.indices_to_codes(torch.tensor([[[0, 15], [5, 10]]]), project_out=False)
    assert codes.tolist() == [[[-1.0] * 4 + [1.0] * 4, [-1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0]]]
    assert quantizer.bits_to_codes(torch.tensor([0.0, 1.0])).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_output_dtype_is_input_dtype(dtype):
    quantized, indices, loss = LFQ(codebook_size=64)(torch.randn(2, 5, 6).to(dtype))
    assert quantized.dtype == dtype and indices.dtype == torch.int64 and torch.isfinite(loss)


def test_autocast_keeps_the_input_dtype_and_float32_losses():
    quantizer = LFQ(codebook_size=256, dim=16)
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices, loss = quantizer(x)
    assert quantized.dtype == torch.float32 and loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = quantizer.project_in(x)
    assert torch.equal(indices, ((projected.float() > 0).long() * quantizer.mask).sum(-1))


def test_gradients_flow_to_input_and_projections():
    quantizer = LFQ(codebook_size=256, dim=16, commitment_loss_weight=0.25)
    x = torch.randn(2, 9, 16, requires_grad=True)
    quantized, _, loss = quantizer(x, inv_temperature=1.0)
    (quantized.square().sum() + loss).backward()
    assert x.grad.abs().sum() > 0 and quantizer.project_in.weight.grad.abs().sum() > 0
    # the auxiliary loss alone reaches the input as well
    x.grad = None
    _, _, loss = quantizer(x, inv_temperature=1.0)
    loss.backward()
    assert x.grad.abs().sum() > 0


def test_straight_through_activation_shapes_the_gradient_only():
    quantizer = LFQ(codebook_size=16, straight_through_activation=torch.nn.Tanh(), entropy_loss_weight=0.0)
    x = torch.tensor([[[0.5, -2.0, 0.0, 3.0]]], requires_grad=True)
    quantized, _, _ = quantizer(x)
    quantized.sum().backward()
    assert quantized.tolist() == [[[1.0, -1.0, -1.0, 1.0]]]
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_eval_losses_are_zero_scalars():
    quantizer = LFQ(codebook_size=64, commitment_loss_weight=1.0).eval()
    ret, breakdown = quantizer(torch.randn(2, 5, 6), return_loss_breakdown=True)
    assert isinstance(breakdown, LossBreakdown)
    assert all(t.shape == () and t.item() == 0.0 for t in (ret.entropy_aux_loss, *breakdown))


@pytest.mark.parametrize("offset", [0.0, 5.0, -3.0])
def test_softplus_entropy_loss_is_positive(offset):
    """weight * softplus(H_sample - gamma * H_batch + offset), the entropies from float64 enumeration."""
    quantizer = LFQ(codebook_size=64, experimental_softplus_entropy_loss=True, entropy_loss_offset=offset,
                    entropy_loss_weight=0.2, diversity_gamma=0.5)  # fmt: skip
    x = torch.randn(2, 30, 6, generator=torch.Generator().manual_seed(5))
    _, _, loss = quantizer(x, inv_temperature=3.0)
    sample_entropy, batch_entropy = brute_force_entropies(x.double().reshape(60, 1, 6), 3.0, 1.0)
    expected = 0.2 * F.softplus(sample_entropy - 0.5 * batch_entropy + offset)
    assert loss.item() > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_clamp_and_cosine_projection_run():
    quantizer = LFQ(codebook_size=16, dim=8, soft_clamp_input_value=2.0, cosine_sim_project_in=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    quantized, _, loss = quantizer(x)
    (quantized.sum() + loss).backward()
    assert quantizer.project_in.weight.grad is not None
    assert quantizer.project_in.scale == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(), ValueError, "dim or codebook_size"),
        (dict(codebook_size=100), ValueError, "power of 2"),
        (dict(codebook_size=1), ValueError, "codebook_size"),
        (dict(codebook_size=2.0**8), TypeError, "codebook_size"),
        (dict(dim=0), ValueError, "dim"),
        (dict(codebook_size=16, dim=8, has_projections=False), ValueError, "has_projections"),
        (dict(codebook_size=16, num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
        (dict(codebook_size=16, frac_per_sample_entropy=0.0), ValueError, "frac_per_sample_entropy"),
        (dict(codebook_size=16, frac_per_sample_entropy=1.5), ValueError, "frac_per_sample_entropy"),
        (dict(codebook_size=16, codebook_scale=0.0), ValueError, "codebook_scale"),
        (dict(codebook_size=16, soft_clamp_input_value=0.5), ValueError, "soft_clamp_input_value"),
        (dict(codebook_size=16, entropy_loss_weight="0.1"), TypeError, "entropy_loss_weight"),
        (dict(codebook_size=16, straight_through_activation="tanh"), TypeError, "straight_through_activation"),
        (dict(codebook_size=16, spherical=1), TypeError, "spherical"),
        (dict(codebook_size=16, channel_first="yes"), TypeError, "channel_first"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, name):
    with pytest.raises(error, match=name):
        LFQ(**kwargs)


def test_wrong_inputs_raise():
    quantizer = LFQ(codebook_size=16, dim=8)
    with pytest.raises(ValueError, match="8 features"):
        quantizer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="mask"):
        quantizer(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="inv_temperature"):
        quantizer(torch.randn(2, 5, 8), inv_temperature=-1.0)
