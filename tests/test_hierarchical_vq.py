"""HierarchicalVQ: VAR multi-scale residual quantization against a step-by-step brute-force re-implementation,
the reference's numbers, decode round trips, masks, nested dropout and argument checks."""

import pytest
import torch
import torch.nn.functional as F

from vector_quantize_pytorch import HierarchicalVQ


def deterministic_image_model(**kwargs):
    """dim 3, 5 codes, scales (1, 2, 3): codebook and conv set by formula (no randomness)."""
    hvq = HierarchicalVQ(dim=3, codebook_size=5, scales=(1, 2, 3), accept_image_fmap=True, kmeans_init=False, **kwargs)
    with torch.no_grad():
        hvq.vq._codebook.embed.copy_(torch.arange(15.0).reshape(1, 5, 3).sin())
        hvq.phi_shared.conv.weight.copy_(torch.arange(81.0).reshape(3, 3, 3, 3).cos() * 0.1)
        hvq.phi_shared.conv.bias.copy_(torch.tensor([0.1, -0.2, 0.05]))
    return hvq.eval()


def deterministic_input():
    return torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5).mul(0.37).sin()


def brute_force_forward(hvq, x):
    """The algorithm written out for 2-d maps: pool, nearest code by exact distance, upsample, phi, subtract."""
    residual, reconstruction, all_indices = x.double(), 0, []
    codebook = hvq.vq.codebook.double()
    phi = hvq.phi_shared
    for s in hvq.level_shapes:
        pooled = F.adaptive_avg_pool2d(residual, s)
        tokens = pooled.flatten(2).transpose(1, 2)  # (b, n, c)
        indices = torch.cdist(tokens, codebook[None].expand(x.shape[0], -1, -1)).argmin(-1)
        codes = codebook[indices].transpose(1, 2).reshape(x.shape[0], x.shape[1], *s)
        if tuple(s) != tuple(x.shape[2:]):
            codes = F.interpolate(codes, size=x.shape[2:], mode="bilinear", align_corners=False)
        conv = F.conv2d(codes, phi.conv.weight.double(), phi.conv.bias.double(), padding=1)
        contribution = (1 - phi.resi_ratio) * codes + phi.resi_ratio * conv
        reconstruction = reconstruction + contribution
        residual = residual - contribution
        all_indices.append(indices.reshape(x.shape[0], *s))
    return reconstruction, all_indices


def test_matches_numbers_recorded_from_the_reference():
    # vector-quantize-pytorch 1.32.0 on the same deterministic model and input (eval forward)
    recon, indices, loss = deterministic_image_model()(deterministic_input())
    assert [i.tolist() for i in indices] == [
        [[[0]], [[1]]],
        [[[3, 3], [1, 4]], [[4, 4], [0, 3]]],
        [[[0, 3, 3], [1, 1, 1], [4, 4, 3]], [[4, 4, 2], [0, 0, 0], [3, 3, 4]]],
    ]
    torch.testing.assert_close(recon.sum(), torch.tensor(-0.2524488568305969))
    torch.testing.assert_close(
        recon[0, :, 0, 0], torch.tensor([0.3385573923587799, 0.2476121485233307, 0.5145695209503174])
    )
    torch.testing.assert_close(
        recon[1, :, 3, 4], torch.tensor([0.1452595740556717, -0.7137590646743774, -0.411604106426239])
    )
    assert loss.item() == 0.0  # eval


def test_equals_brute_force_algorithm():
    torch.manual_seed(0)
    hvq = HierarchicalVQ(dim=4, codebook_size=12, scales=(1, 2, 3, 6), accept_image_fmap=True, kmeans_init=False).eval()
    x = torch.randn(3, 4, 6, 5)
    recon, indices, _ = hvq(x)
    expected_recon, expected_indices = brute_force_forward(hvq, x)
    for got, expected in zip(indices, expected_indices):
        assert torch.equal(got, expected)
    torch.testing.assert_close(recon.double(), expected_recon, atol=1e-5, rtol=1e-5)


def test_shapes_dtypes_and_state_dict_keys():
    hvq = HierarchicalVQ(dim=32, codebook_size=64, scales=(1, 2, 4), accept_image_fmap=True)
    x = torch.randn(2, 32, 8, 8)
    recon, indices, loss = hvq(x)
    assert recon.shape == x.shape and loss.shape == ()
    assert [tuple(i.shape) for i in indices] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    assert all(i.dtype == torch.int64 for i in indices)
    assert {k: tuple(v.shape) for k, v in hvq.state_dict().items()} == {
        "vq._codebook.initted": (),
        "vq._codebook.cluster_size": (1, 64),
        "vq._codebook.embed_avg": (1, 64, 32),
        "vq._codebook.embed": (1, 64, 32),
        "phi_shared.conv.weight": (32, 32, 3, 3),
        "phi_shared.conv.bias": (32,),
    }


def test_per_level_codebooks_and_phis_keys():
    hvq = HierarchicalVQ(
        dim=4, codebook_size=(8, 8, 16), scales=(1, 2, 4), shared_codebook=False, share_quant_resi=0,
        accept_image_fmap=True,
    )  # fmt: skip
    keys = set(hvq.state_dict())
    assert {f"vqs.{i}._codebook.embed" for i in range(3)} <= keys
    assert {f"phi_levels.{i}.conv.weight" for i in range(3)} <= keys
    assert hvq.vqs[2].codebook.shape == (16, 4)


def test_phi_chosen_by_relative_depth_with_pythons_rounding():
    hvq = HierarchicalVQ(dim=2, codebook_size=4, scales=(1, 2, 3, 4, 5), share_quant_resi=4, accept_image_fmap=True)
    chosen = [list(hvq.phi_levels).index(hvq.choose_phi(level)) for level in range(5)]
    assert chosen == [0, 1, 2, 2, 3]  # positions 0, .75, 1.5, 2.25, 3 -> round half to even


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(accept_image_fmap=True), (2, 4, 5, 7)),
        (dict(accept_image_fmap=True, channel_first=False), (2, 5, 7, 4)),
        (dict(), (2, 4, 9)),
        (dict(accept_3d_fmap=True), (2, 4, 3, 4, 5)),
        (dict(accept_image_fmap=True, shared_codebook=False, share_quant_resi=2), (2, 4, 6, 6)),
    ],
)
def test_eval_forward_equals_decode_exactly(kwargs, shape):
    torch.manual_seed(1)
    hvq = HierarchicalVQ(dim=4, codebook_size=16, scales=(1, 2, 3), **kwargs)
    for _ in range(2):
        hvq(torch.randn(*shape))  # k-means init and EMA steps
    hvq.eval()
    x = torch.randn(*shape)
    recon, indices, _ = hvq(x)
    full_shape = shape[2:] if hvq.channel_first else shape[1:-1]
    assert torch.equal(hvq.get_output_from_indices(indices, full_shape=full_shape), recon)


def test_decode_defaults_to_the_last_scale():
    torch.manual_seed(2)
    hvq = HierarchicalVQ(dim=4, codebook_size=16, scales=(1, 2, (3, 4)), accept_image_fmap=True, kmeans_init=False)
    hvq.eval()
    x = torch.randn(2, 4, 3, 4)
    recon, indices, _ = hvq(x)
    assert torch.equal(hvq.get_output_from_indices(indices), recon)
    assert hvq.get_output_from_indices(indices, full_shape=8).shape == (2, 4, 8, 8)


def test_channel_last_equals_channel_first():
    torch.manual_seed(3)
    first = HierarchicalVQ(dim=4, codebook_size=16, scales=(1, 2), accept_image_fmap=True, kmeans_init=False).eval()
    last = HierarchicalVQ(dim=4, codebook_size=16, scales=(1, 2), accept_image_fmap=True, kmeans_init=False,
                          channel_first=False).eval()  # fmt: skip
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 4, 5, 3)
    recon_first, indices_first, _ = first(x)
    recon_last, indices_last, _ = last(x.movedim(1, -1))
    assert torch.equal(recon_last, recon_first.movedim(1, -1))
    assert all(torch.equal(a, b) for a, b in zip(indices_first, indices_last))


def test_zero_quant_resi_makes_phi_the_identity():
    torch.manual_seed(4)
    hvq = HierarchicalVQ(dim=3, codebook_size=8, scales=(1, 2), quant_resi=0.0, accept_image_fmap=True,
                         kmeans_init=False).eval()  # fmt: skip
    recon, indices, _ = hvq(torch.randn(1, 3, 2, 2))
    codebook = hvq.vq.codebook
    expected = codebook[indices[0]].reshape(1, 1, 1, 3).movedim(-1, 1) + codebook[indices[1]].movedim(-1, 1)
    torch.testing.assert_close(recon, expected.expand_as(recon))


def test_training_initialises_codebook_learns_phi_and_eval_changes_nothing():
    torch.manual_seed(5)
    hvq = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), accept_image_fmap=True)
    hvq.eval()
    before = {k: v.clone() for k, v in hvq.state_dict().items()}
    hvq(torch.randn(2, 4, 4, 4))
    assert all(torch.equal(hvq.state_dict()[k], v) for k, v in before.items())  # no k-means in eval
    assert not hvq.vq._codebook.initted

    hvq.train()
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    recon, _, loss = hvq(x)
    assert hvq.vq._codebook.initted and hvq.vq.codebook.abs().sum() > 0
    assert loss > 0
    (recon.square().mean() + loss).backward()
    assert x.grad.abs().sum() > 0 and hvq.phi_shared.conv.weight.grad.abs().sum() > 0


def test_mask_zeroes_padding_and_invalid_level_positions():
    torch.manual_seed(6)
    hvq = HierarchicalVQ(dim=3, codebook_size=8, scales=(1, 2, 4), accept_image_fmap=True, kmeans_init=False).eval()
    x = torch.randn(2, 3, 4, 4)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[0, :, 2:] = False  # right half of the first image is padding
    recon, indices, _ = hvq(x, mask=mask)
    assert torch.equal(recon[0, :, :, 2:], torch.zeros(3, 4, 2))
    assert (indices[1][0, :, 1] == -1).all() and (indices[2][0, :, 2:] == -1).all()
    assert (indices[1][0, :, 0] >= 0).all() and (indices[1][1] >= 0).all()
    # padding values never matter
    x_changed = x.clone()
    x_changed[0, :, :, 2:] = 1e3
    recon_changed, indices_changed, _ = hvq(x_changed, mask=mask)
    assert torch.equal(recon_changed, recon)


def test_lens_for_sequences():
    torch.manual_seed(7)
    hvq = HierarchicalVQ(dim=3, codebook_size=8, scales=(1, 2, 6), kmeans_init=False).eval()
    x = torch.randn(2, 3, 6)
    lens = torch.tensor([6, 3])
    by_lens = hvq(x, lens=lens)
    by_mask = hvq(x, mask=torch.arange(6) < lens[:, None])
    assert torch.equal(by_lens[0], by_mask[0]) and torch.equal(by_lens[0][1, :, 3:], torch.zeros(3, 3))
    image = HierarchicalVQ(dim=3, codebook_size=8, scales=(1,), accept_image_fmap=True)
    with pytest.raises(ValueError, match="lens"):
        image(torch.randn(1, 3, 2, 2), lens=torch.tensor([1]))


def test_nested_dropout_keeps_a_prefix_of_levels():
    torch.manual_seed(8)
    hvq = HierarchicalVQ(dim=3, codebook_size=8, scales=(1, 2, 3, 4), accept_image_fmap=True, quant_resi=0.0,
                         kmeans_init=False, decay=1.0, threshold_ema_dead_code=0, nested_dropout=1.0,
                         nested_dropout_min_levels=2)  # fmt: skip
    x = torch.randn(2, 3, 4, 4)
    cutoffs = set()
    for _ in range(12):
        recon, indices, _, cutoff = hvq(x, return_cutoff=True)
        assert 1 <= cutoff <= 2
        cutoffs.add(cutoff)
        kept = [i if level <= cutoff else torch.full_like(i, -1) for level, i in enumerate(indices)]
        torch.testing.assert_close(recon, hvq.get_output_from_indices(kept, full_shape=(4, 4)))
    assert cutoffs == {1, 2}
    assert hvq.eval()(x, return_cutoff=True)[3] is None


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(scales=()), TypeError, "scales"),
        (dict(scales=(2, 1)), ValueError, "non-decreasing"),
        (dict(scales=(1, (2, 3, 4))), ValueError, "scales"),
        (dict(scales=(0, 1)), ValueError, "scales"),
        (dict(codebook_size=(4, 8)), ValueError, "codebook_size"),
        (dict(codebook_size=(4, 4, 4)), ValueError, "codebook_size"),
        (dict(dim=0), ValueError, "dim"),
        (dict(accept_3d_fmap=True), ValueError, "accept_3d_fmap"),
        (dict(nested_dropout=1.5), ValueError, "nested_dropout"),
        (dict(share_quant_resi=1.5), TypeError, "share_quant_resi"),
        (dict(channel_first="yes"), TypeError, "channel_first"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, error, name):
    args = dict(dim=4, codebook_size=8, scales=(1, 2), accept_image_fmap=True) | kwargs
    with pytest.raises(error, match=name):
        HierarchicalVQ(**args)


def test_invalid_inputs_are_reported():
    hvq = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2), accept_image_fmap=True)
    with pytest.raises(ValueError, match="4 dimensions"):
        hvq(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="c = 4"):
        hvq(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="indices"):
        hvq(torch.randn(2, 4, 5, 5), indices=(torch.zeros(2, 1, 1),))
    with pytest.raises(ValueError, match="mask"):
        hvq(torch.randn(2, 4, 5, 5), mask=torch.ones(2, 5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="2 tensors"):
        hvq.get_output_from_indices((torch.zeros(2, 1, 1, dtype=torch.long),))
    with pytest.raises(ValueError, match=r"indices\[1\]"):
        hvq.get_output_from_indices((torch.zeros(2, 1, 1, dtype=torch.long), torch.zeros(2, 3, 3, dtype=torch.long)))
