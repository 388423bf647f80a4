"""Exact at the edges: top-1 of topk is the nearest code, per-sample masks, mask and lens values, k-means on too
few rows, the reference-compatible exception of LatentQuantize, FSP's CDF round trips, and an unbiased sampled
per-sample entropy under a mask."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import vector_quantize_pytorch as vqp
from vector_quantize_pytorch.finite_scalar_perturbation import build_cdf_act

# ---------------------------------------------------------------- top-1 of topk is the plain search


def test_topk_1_quantizes_exactly_as_the_plain_search_over_200_seeds():
    for seed in range(200):
        torch.manual_seed(seed)
        plain = vqp.VectorQuantize(dim=16, codebook_size=64)
        top1 = vqp.VectorQuantize(dim=16, codebook_size=64)
        top1.load_state_dict(plain.state_dict())
        x = torch.randn(1, 96, 16)
        mask = torch.rand(1, 96) > 0.5
        quantized, indices, loss = plain(x, mask=mask)
        top_quantized, top_indices, losses = top1(x, mask=mask, topk=1, ema_update=False)
        assert torch.equal(top_indices[..., 0], indices), seed
        assert torch.equal(top_quantized[..., 0, :], quantized), seed
        assert torch.allclose(losses.sum() / mask.sum(), loss, rtol=1e-5, atol=1e-7), seed


def test_topk_ranks_the_others_by_distance_after_the_nearest():
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=8, codebook_size=32).eval()
    x = torch.randn(2, 20, 8)
    _, indices, _ = vq(x, topk=5)
    distances = torch.cdist(x.reshape(-1, 8), vq.codebook).reshape(2, 20, 32)
    chosen = distances.gather(-1, indices)
    assert torch.equal(indices, distances.argsort(-1)[..., :5])
    assert (chosen[..., 1:] >= chosen[..., :-1]).all()


# ---------------------------------------------------------------- masks and lengths

PER_SAMPLE_MASK_CASES = {
    "VectorQuantize": (lambda: vqp.VectorQuantize(dim=8, codebook_size=16), (2, 6, 8)),
    "VectorQuantize-image": (lambda: vqp.VectorQuantize(dim=8, codebook_size=16, accept_image_fmap=True), (2, 8, 3, 2)),
    "ResidualVQ": (lambda: vqp.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2), (2, 6, 8)),
    "SimVQ": (lambda: vqp.SimVQ(dim=8, codebook_size=16), (2, 6, 8)),
    "LFQ-image": (lambda: vqp.LFQ(dim=8, codebook_size=16), (2, 8, 3, 2)),
    "ResidualLFQ": (lambda: vqp.ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2), (2, 6, 8)),
}


@pytest.mark.parametrize("name", PER_SAMPLE_MASK_CASES)
def test_a_per_sample_mask_means_every_token_of_those_samples(name):
    make, shape = PER_SAMPLE_MASK_CASES[name]
    torch.manual_seed(0)
    per_sample, per_token = make().train(), make().train()
    per_token.load_state_dict(per_sample.state_dict())
    x = torch.randn(shape)
    tokens = math.prod(shape[2:]) if len(shape) == 4 else shape[1]
    sample_mask = torch.tensor([True, False])
    token_mask = sample_mask[:, None].expand(2, tokens)
    if len(shape) == 4:
        token_mask = token_mask.reshape(2, *shape[2:])
    torch.manual_seed(1)
    a = per_sample(x, mask=sample_mask)
    torch.manual_seed(1)
    b = per_token(x, mask=token_mask)
    for left, right in zip(a, b):
        assert torch.equal(left, right), name
    for (key, left), right in zip(per_sample.state_dict().items(), per_token.state_dict().values()):
        assert torch.equal(left, right), key


def test_a_float_mask_must_hold_only_zeros_and_ones():
    vq = vqp.VectorQuantize(dim=4, codebook_size=8)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="mask must be boolean"):
        vq(x, mask=torch.full((2, 5), 0.5))
    quantized, indices, _ = vq.eval()(x, mask=torch.tensor([[1.0, 1, 0, 0, 1]] * 2))
    assert (indices[:, 2:4] == -1).all() and (indices[:, [0, 1, 4]] >= 0).all()


@pytest.mark.parametrize("lens", [[5, 6], [-1, 3]])
def test_lens_must_lie_in_zero_to_the_sequence_length(lens):
    vq = vqp.VectorQuantize(dim=4, codebook_size=8)
    with pytest.raises(ValueError, match=r"lens must lie in \[0, seq\] = \[0, 5\]"):
        vq(torch.randn(2, 5, 4), lens=torch.tensor(lens))


def test_lens_must_be_integers():
    with pytest.raises(TypeError, match="lens must be an integer tensor"):
        vqp.VectorQuantize(dim=4, codebook_size=8)(torch.randn(2, 5, 4), lens=torch.tensor([2.0, 3.0]))


def test_lens_at_both_ends_of_the_range_are_legal():
    vq = vqp.VectorQuantize(dim=4, codebook_size=8).eval()
    _, indices, _ = vq(torch.randn(2, 5, 4), lens=torch.tensor([0, 5]))
    assert (indices[0] == -1).all() and (indices[1] >= 0).all()


@pytest.mark.parametrize(
    "make,shape,option",
    [
        (lambda: vqp.VectorQuantize(dim=8, codebook_size=16), (2, 8, 4, 4), "accept_image_fmap=True"),
        (lambda: vqp.VectorQuantize(dim=8, codebook_size=16), (2, 8, 5), "channel_last=False"),
        (lambda: vqp.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2), (2, 8, 4, 4), "accept_image_fmap=True"),
        (lambda: vqp.SimVQ(dim=8, codebook_size=16), (2, 8, 5), "channel_first=True"),
    ],
)
def test_features_on_axis_1_get_an_error_naming_the_option(make, shape, option):
    with pytest.raises(ValueError, match=f"pass {option}"):
        make()(torch.randn(shape))


# ---------------------------------------------------------------- k-means on too few rows


def test_kmeans_on_fewer_valid_rows_than_codes_warns_once():
    vq = vqp.VectorQuantize(dim=4, codebook_size=64, kmeans_init=True)
    with pytest.warns(UserWarning, match="k-means initialisation of 64 codes got only 10 valid rows"):
        vq(torch.randn(1, 10, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vq(torch.randn(1, 10, 4))  # initialised: no second warning


def test_kmeans_on_enough_rows_does_not_warn_and_zero_iterations_are_legal():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, kmeans_iters=0)(torch.randn(1, 10, 4))
    with pytest.raises(ValueError, match="kmeans_iters must be >= 0"):
        vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, kmeans_iters=-1)


# ---------------------------------------------------------------- exceptions code written for 1.32 catches


def test_latent_quantize_int_levels_without_codebook_dim_is_a_value_and_a_runtime_error():
    for error in (ValueError, RuntimeError):
        with pytest.raises(error, match="codebook_dim must be >= 1 when levels is a single int"):
            vqp.LatentQuantize(levels=5, dim=16)


def test_latent_quantize_reads_series_channel_first_when_the_last_axis_lacks_the_features():
    lq = vqp.LatentQuantize(levels=[5, 5, 8], dim=16).eval()
    series = torch.randn(2, 16, 30)
    out, indices, _ = lq(series)
    assert out.shape == series.shape and indices.shape == (2, 30)
    channel_last, _, _ = lq(series.transpose(1, 2))
    assert torch.equal(channel_last, out.transpose(1, 2))


# ---------------------------------------------------------------- FSP's CDF activations


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "normal", "laplace", "cauchy"])
def test_cdf_activations_round_trip_to_float32_resolution(name):
    """Below zero the round trip is exact to a few ulps of p times the inverse's slope; above, float32 resolves
    p near 1 only to 6e-8, so the error is that resolution times the slope (under 1e-4 up to z = 3)."""
    cdf, inverse = build_cdf_act(name)
    z = torch.linspace(-6, 3, 20001)
    error = (inverse(cdf(z)) - z).abs()
    assert error[z <= 0].max() < 2e-5, name
    assert error.max() < 1e-4, name


# ---------------------------------------------------------------- sampled per-sample entropy


def test_sampled_per_sample_entropy_is_unbiased_under_a_per_sample_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16, 16)
    mask = torch.tensor([True, False])
    full = vqp.LFQ(codebook_size=2**16, dim=16, frac_per_sample_entropy=1.0)
    sampled = vqp.LFQ(codebook_size=2**16, dim=16, frac_per_sample_entropy=0.1)
    (_, exact) = full(x, inv_temperature=100.0, return_loss_breakdown=True, mask=mask)
    draws = torch.stack(
        [
            sampled(x, inv_temperature=100.0, return_loss_breakdown=True, mask=mask)[1].per_sample_entropy
            for _ in range(300)
        ]
    )
    standard_error = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - exact.per_sample_entropy) < 4 * standard_error


def test_out_of_range_indices_are_a_value_and_an_index_error():
    """1.32 failed inside the embedding lookup with IndexError; code that catches that still catches ours."""
    vq = vqp.VectorQuantize(dim=16, codebook_size=8)
    for error in (ValueError, IndexError):
        with pytest.raises(error, match=r"indices must lie in \[0, codebook_size\) = \[0, 8\)"):
            vq.get_output_from_indices(torch.tensor([[3, 9]]))
