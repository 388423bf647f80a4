"""SimVQ: nearest code of the transformed frozen codebook, its loss, gradients, layouts and decode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vector_quantize_pytorch import SimVQ


def brute_force_indices(x, codebook):
    """Lowest-index argmin of exact float64 distances; x ``(..., d)``, codebook ``(K, d)``."""
    flat = x.reshape(-1, x.shape[-1]).double()
    return torch.cdist(flat, codebook.double()).argmin(-1).reshape(x.shape[:-1])


def test_readme_example_shapes():
    sim_vq = SimVQ(dim=512, codebook_size=1024)
    x = torch.randn(1, 1024, 512)
    quantized, indices, loss = sim_vq(x)
    assert quantized.shape == (1, 1024, 512)
    assert indices.shape == (1, 1024) and indices.dtype == torch.int64
    assert loss.shape == ()


def test_reference_main_block_mlp_transform_channel_first_image():
    sim_vq = SimVQ(
        dim=32,
        codebook_transform=nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)),
        codebook_size=64,
        channel_first=True,
    )
    x = torch.randn(1, 32, 4, 5)
    quantized, indices, _ = sim_vq(x)
    assert quantized.shape == x.shape and indices.shape == (1, 4, 5)


def test_indices_are_nearest_codes_and_output_is_the_code():
    torch.manual_seed(0)
    sim_vq = SimVQ(dim=6, codebook_size=50)
    x = torch.randn(3, 7, 6)
    quantized, indices, _ = sim_vq(x)
    codebook = sim_vq.codebook.detach()
    assert torch.equal(indices, brute_force_indices(x, codebook))
    assert torch.equal(quantized, codebook[indices])


def test_loss_is_weighted_sum_of_both_mse_terms():
    torch.manual_seed(1)
    sim_vq = SimVQ(dim=4, codebook_size=8, input_to_quantize_commit_loss_weight=0.5, commitment_weight=3.0)
    x = torch.randn(2, 5, 4)
    quantized, _, loss = sim_vq(x)
    mse = (x - quantized).pow(2).mean()
    torch.testing.assert_close(loss, (mse + 0.5 * mse) * 3.0)


def test_eval_loss_is_still_reported_as_the_reference_does():
    sim_vq = SimVQ(dim=4, codebook_size=8).eval()
    x = torch.randn(2, 5, 4)
    quantized, _, loss = sim_vq(x)
    torch.testing.assert_close(loss, 1.25 * (x - quantized).pow(2).mean())
    assert loss > 0


@pytest.mark.parametrize(
    "channel_first,shape",
    [(False, (2, 9, 8)), (False, (2, 3, 4, 8)), (False, (5, 8)), (True, (2, 8, 3, 4)), (True, (2, 8, 9))],
)
def test_eval_forward_equals_indices_to_codes_exactly(channel_first, shape):
    torch.manual_seed(2)
    sim_vq = SimVQ(dim=8, codebook_size=32, channel_first=channel_first).eval()
    x = torch.randn(*shape)
    quantized, indices, _ = sim_vq(x)
    feature_axis = 1 if channel_first and len(shape) > 2 else -1
    spatial = tuple(s for axis, s in enumerate(shape) if axis not in (0, feature_axis % len(shape)))
    assert quantized.shape == x.shape and indices.shape == (shape[0], *spatial)
    assert torch.equal(sim_vq.indices_to_codes(indices), quantized)


def test_training_forward_value_is_the_code_too():
    torch.manual_seed(3)
    for rotation_trick in (True, False):
        sim_vq = SimVQ(dim=8, codebook_size=16, rotation_trick=rotation_trick)
        x = torch.randn(2, 6, 8, requires_grad=True)
        quantized, indices, _ = sim_vq(x)
        assert torch.equal(quantized.detach(), sim_vq.indices_to_codes(indices).detach())


def test_channel_first_matches_channel_last():
    torch.manual_seed(4)
    last = SimVQ(dim=8, codebook_size=16)
    first = SimVQ(dim=8, codebook_size=16, channel_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 3, 5, 8)
    q_last, i_last, l_last = last(x)
    q_first, i_first, l_first = first(x.movedim(-1, 1))
    assert torch.equal(i_last, i_first)
    assert torch.equal(q_last, q_first.movedim(1, -1))
    torch.testing.assert_close(l_last, l_first)


def test_frozen_codebook_never_changes_and_transform_learns():
    torch.manual_seed(5)
    sim_vq = SimVQ(dim=8, codebook_size=16)
    frozen_before = sim_vq.frozen_codebook.clone()
    weight_before = sim_vq.code_transform.weight.detach().clone()
    assert "frozen_codebook" not in dict(sim_vq.named_parameters())
    optimizer = torch.optim.SGD(sim_vq.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 10, 8)
        _, _, loss = sim_vq(x)
        optimizer.zero_grad()
        loss.backward()
        assert sim_vq.code_transform.weight.grad.abs().sum() > 0
        optimizer.step()
    assert torch.equal(sim_vq.frozen_codebook, frozen_before)
    assert not torch.equal(sim_vq.code_transform.weight, weight_before)


def test_output_gradient_reaches_the_input_only():
    torch.manual_seed(6)
    sim_vq = SimVQ(dim=8, codebook_size=16, rotation_trick=False)
    x = torch.randn(2, 5, 8, requires_grad=True)
    quantized, _, _ = sim_vq(x)
    quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through: identity
    assert sim_vq.code_transform.weight.grad is None


def test_rotation_trick_gradient_is_a_scaled_rotation():
    torch.manual_seed(7)
    sim_vq = SimVQ(dim=8, codebook_size=16)
    x = torch.randn(1, 6, 8, requires_grad=True)
    quantized, _, _ = sim_vq(x)
    upstream = torch.randn_like(quantized)
    (quantized * upstream).sum().backward()
    # gradient = (|q| / |x|) R^T g with R a rotation: its norm is |g| |q| / |x| per token
    expected = upstream.norm(dim=-1) * quantized.detach().norm(dim=-1) / x.detach().norm(dim=-1)
    torch.testing.assert_close(x.grad.norm(dim=-1), expected)
    assert not torch.allclose(x.grad, upstream)


def test_frozen_codebook_init_scale_dim_and_init_fn():
    torch.manual_seed(8)
    sim_vq = SimVQ(dim=8, codebook_size=4096, frozen_codebook_dim=16)
    assert sim_vq.frozen_codebook.shape == (4096, 16)
    assert sim_vq.code_transform.weight.shape == (8, 16)
    assert abs(sim_vq.frozen_codebook.std().item() - 16**-0.5) < 0.01
    assert sim_vq.codebook.shape == (4096, 8)
    assert sim_vq.codebook_dim == 8 and sim_vq.codebook_size == 4096

    ones = SimVQ(dim=4, codebook_size=3, init_fn=torch.ones_like)
    assert torch.equal(ones.frozen_codebook, torch.ones(3, 4))


def test_state_dict_keys_match_the_reference():
    sd = SimVQ(dim=64, codebook_size=128).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "frozen_codebook": (128, 64),
        "code_transform.weight": (64, 64),
    }


def test_indices_to_codes_minus_one_gives_zeros():
    sim_vq = SimVQ(dim=4, codebook_size=8)
    codes = sim_vq.indices_to_codes(torch.tensor([[0, -1, 3]]))
    assert torch.equal(codes[0, 1], torch.zeros(4))
    assert torch.equal(codes[0, 2], sim_vq.codebook[3].detach())


def test_low_precision_input_keeps_dtype_and_searches_in_float32():
    torch.manual_seed(9)
    sim_vq = SimVQ(dim=8, codebook_size=32).eval()
    x = torch.randn(2, 6, 8).bfloat16()
    quantized, indices, loss = sim_vq(x)
    assert quantized.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(indices, brute_force_indices(x.float(), sim_vq.codebook.detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, autocast_indices, _ = sim_vq(x.float())
    assert torch.equal(autocast_indices, sim_vq(x.float())[1])


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(dim=0, codebook_size=8), ValueError, "dim"),
        (dict(dim=4, codebook_size=2.5), TypeError, "codebook_size"),
        (dict(dim=4, codebook_size=8, codebook_transform=lambda t: t), TypeError, "codebook_transform"),
        (dict(dim=4, codebook_size=8, init_fn=3), TypeError, "init_fn"),
        (dict(dim=4, codebook_size=8, init_fn=lambda t: t[:2]), ValueError, "init_fn"),
        (dict(dim=4, codebook_size=8, channel_first=1), TypeError, "channel_first"),
        (dict(dim=4, codebook_size=8, rotation_trick="yes"), TypeError, "rotation_trick"),
        (dict(dim=4, codebook_size=8, input_to_quantize_commit_loss_weight=-1), ValueError, "input_to_quantize"),
        (dict(dim=4, codebook_size=8, commitment_weight=-0.1), ValueError, "commitment_weight"),
        (dict(dim=4, codebook_size=8, frozen_codebook_dim=0), ValueError, "frozen_codebook_dim"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        SimVQ(**kwargs)


def test_invalid_inputs_and_transforms_are_reported():
    sim_vq = SimVQ(dim=4, codebook_size=8)
    with pytest.raises(ValueError, match="4 features"):
        sim_vq(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating point"):
        sim_vq(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        sim_vq.indices_to_codes(torch.zeros(2, 3))
    wrong = SimVQ(dim=4, codebook_size=8, codebook_transform=nn.Linear(4, 5))
    with pytest.raises(ValueError, match="codebook_transform"):
        wrong(torch.randn(2, 3, 4))


def test_same_seed_same_module_and_loss_gradient_matches_autograd_of_the_formula():
    torch.manual_seed(10)
    a = SimVQ(dim=4, codebook_size=8)
    torch.manual_seed(10)
    b = SimVQ(dim=4, codebook_size=8)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())

    x = torch.randn(3, 4)
    _, indices, loss = a(x)
    loss.backward()
    # the codebook term alone trains the transform: d/dW mean((W c_k - x)^2)
    weight = b.code_transform.weight.detach().clone().requires_grad_(True)
    codes = b.frozen_codebook[indices] @ weight.t()
    F.mse_loss(codes, x).backward()
    torch.testing.assert_close(a.code_transform.weight.grad, weight.grad)


def test_mask_leaves_masked_tokens_out_of_the_loss_and_its_gradients():
    torch.manual_seed(0)
    sim = SimVQ(dim=4, codebook_size=8).train()
    x = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    out, indices, loss = sim(x, mask=mask)
    kept = x[mask].detach().clone().requires_grad_()
    _, kept_indices, kept_loss = sim(kept.unsqueeze(0))
    torch.testing.assert_close(loss, kept_loss)
    assert torch.equal(indices[mask], kept_indices[0])
    loss.backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    (kept_grad,) = torch.autograd.grad(kept_loss, kept)
    torch.testing.assert_close(x.grad[mask], kept_grad)
    full_loss = sim(x, mask=torch.ones(2, 5, dtype=torch.bool))[2]
    torch.testing.assert_close(full_loss, sim(x)[2])
