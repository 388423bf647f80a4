"""VectorQuantize: behaviour against brute force and hand computations, masks, eval decoding, options."""

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vector_quantize_pytorch import LossBreakdown, VectorQuantize, VectorQuantizer


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def assert_state_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}")


def brute_force_nearest(x, codes):
    """(N, d), (K, d) -> (N,) lowest-index argmin of exact Euclidean distances."""
    return torch.cdist(x.double(), codes.double(), compute_mode="donot_use_mm_for_euclid_dist").argmin(-1)


# ---------------------------------------------------------------- shapes and nearest codes


def test_alias_and_basic_shapes():
    assert VectorQuantizer is VectorQuantize
    vq = VectorQuantize(8, 16)
    q, idx, loss = vq(torch.randn(2, 5, 8))
    assert q.shape == (2, 5, 8) and idx.shape == (2, 5) and idx.dtype == torch.int64 and loss.shape == ()


def test_eval_indices_are_brute_force_nearest_and_output_is_the_code():
    vq = VectorQuantize(6, 13).eval()
    x = torch.randn(3, 7, 6)
    q, idx, loss = vq(x)
    assert torch.equal(idx.flatten(), brute_force_nearest(x.reshape(-1, 6), vq.codebook))
    assert torch.equal(q, vq.codebook[idx])
    assert loss.shape == () and loss == 0


def test_cosine_indices_are_argmax_of_normalised_dot_product():
    vq = VectorQuantize(6, 13, use_cosine_sim=True).eval()
    x = torch.randn(2, 9, 6)
    _, idx, _ = vq(x)
    expected = (F.normalize(x, dim=-1) @ F.normalize(vq.codebook, dim=-1).T).argmax(-1)
    assert torch.equal(idx, expected)


@pytest.mark.parametrize(
    "kwargs,shape,q_shape,idx_shape",
    [
        ({}, (2, 3), (2, 3), (2,)),
        (dict(channel_last=False), (2, 3, 5), (2, 3, 5), (2, 5)),
        (dict(accept_image_fmap=True), (2, 3, 4, 5), (2, 3, 4, 5), (2, 4, 5)),
        (dict(accept_3d_fmap=True), (2, 3, 2, 4, 5), (2, 3, 2, 4, 5), (2, 2, 4, 5)),
        (dict(heads=2), (2, 5, 3), (2, 5, 3), (2, 5, 2)),
        (
            dict(heads=2, accept_image_fmap=True, separate_codebook_per_head=True),
            (2, 3, 4, 5),
            (2, 3, 4, 5),
            (2, 4, 5, 2),
        ),
    ],
)
def test_layouts_shapes(kwargs, shape, q_shape, idx_shape):
    vq = VectorQuantize(3, 8, **kwargs)
    q, idx, loss = vq(torch.randn(shape))
    assert q.shape == q_shape and idx.shape == idx_shape and loss.shape == ()


def test_low_precision_input_is_quantized_in_float32():
    vq = VectorQuantize(4, 32).eval()
    x = torch.randn(2, 50, 4).bfloat16()
    q, idx, _ = vq(x)
    assert q.dtype == torch.bfloat16
    assert torch.equal(idx.flatten(), brute_force_nearest(x.float().reshape(-1, 4), vq.codebook))
    assert torch.equal(q, vq.codebook[idx].bfloat16())


def test_autocast_keeps_output_dtype_and_gradients():
    vq = VectorQuantize(4, 8, codebook_dim=3)
    x = torch.randn(2, 5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, _, loss = vq(x)
    assert q.dtype == torch.float32 and loss.dtype == torch.float32
    (q.sum() + loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_output_dtype_follows_input_dtype():
    vq = VectorQuantize(4, 8)
    q, _, loss = vq(torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True))
    assert q.dtype == torch.float64
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- gradient estimators


def test_rotation_trick_is_the_default():
    assert VectorQuantize(4, 8).rotation_trick
    assert not VectorQuantize(1, 8).rotation_trick


def test_straight_through_estimator_gradient_is_identity():
    vq = VectorQuantize(4, 8, rotation_trick=False)
    x = torch.randn(2, 5, 4, requires_grad=True)
    g = torch.randn(2, 5, 4)
    q, _, _ = vq(x)
    q.backward(g)
    assert torch.equal(x.grad, g)


def test_rotation_trick_gradient_in_forward_equals_closed_form():
    vq = VectorQuantize(3, 8, commitment_weight=0.0, decay=1.0)  # decay 1: codes do not move
    x = torch.randn(1, 4, 3, requires_grad=True)
    g = torch.randn(1, 4, 3)
    q, _, _ = vq(x)
    q.backward(g)
    for i in range(4):
        xi, qi = x[0, i].detach().double(), q[0, i].detach().double()
        u, v = xi / xi.norm(), qi / qi.norm()
        w = (u + v) / (u + v).norm()
        R = torch.eye(3, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        expected = qi.norm() / xi.norm() * R.T @ g[0, i].double()
        torch.testing.assert_close(x.grad[0, i].double(), expected, atol=1e-5, rtol=1e-4)


def test_gradients_reach_projections_with_heads():
    vq = VectorQuantize(4, 8, codebook_dim=3, heads=2, separate_codebook_per_head=True)
    x = torch.randn(2, 5, 4, requires_grad=True)
    q, _, loss = vq(x)
    (q.square().sum() + loss).backward()
    assert vq.project_in.weight.grad.abs().sum() > 0 and vq.project_out.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_directional_reparam_trains_input_and_codebook():
    vq = VectorQuantize(4, 8, directional_reparam=True, threshold_ema_dead_code=0.5)
    assert vq.learnable_codebook and not vq.ema_update and not vq.rotation_trick
    x = torch.randn(2, 5, 4, requires_grad=True)
    q, idx, loss = vq(x)
    # the step goes exactly as far as the code, in a noisy direction (variance 5e-3): its length is |code - x|
    code = vq.codebook[idx].detach()
    torch.testing.assert_close((q - x).norm(dim=-1), (code - x).norm(dim=-1), atol=1e-5, rtol=1e-5)
    exact = VectorQuantize(
        4, 8, directional_reparam=True, threshold_ema_dead_code=0.5, directional_reparam_variance=0.0
    )
    exact.load_state_dict(vq.state_dict())
    q0, idx0, _ = exact(x)
    torch.testing.assert_close(q0, exact.codebook[idx0].detach(), atol=1e-6, rtol=1e-6)  # no noise: the code
    (q.square().sum() + loss).backward()
    assert x.grad.abs().sum() > 0 and vq._codebook.embed.grad.abs().sum() > 0
    vq.eval()
    q, idx, _ = vq(x)
    assert torch.equal(q, vq.codebook[idx].detach())


def test_gumbel_straight_through_works_with_default_rotation_trick_argument():
    vq = VectorQuantize(4, 8, straight_through=True)  # reference bug 1: raised unless rotation_trick=False
    assert not vq.rotation_trick
    x = torch.randn(2, 5, 4, requires_grad=True)
    q, idx, loss = vq(x)
    (q.sum() + loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="straight_through and rotation_trick"):
        VectorQuantize(4, 8, straight_through=True, rotation_trick=True)


@pytest.mark.parametrize("kwargs", [dict(), dict(codebook_diversity_loss_weight=0.1)], ids=["search", "logits"])
def test_stochastic_sampling_samples_various_codes(kwargs):
    vq = VectorQuantize(4, 8, stochastic_sample_codes=True, sample_codebook_temp=50.0, freeze_codebook=True, **kwargs)
    x = torch.randn(4, 50, 4)
    _, idx, _ = vq(x)
    nearest = brute_force_nearest(x.reshape(-1, 4), vq.codebook).view(4, 50)
    assert (idx != nearest).float().mean() > 0.3
    assert len(idx.unique()) == 8
    # temperature 0 (per call) is the nearest code
    _, idx0, _ = vq(x, sample_codebook_temp=0.0)
    assert torch.equal(idx0, nearest)
    # eval never samples
    _, idx_eval, _ = vq.eval()(x)
    assert torch.equal(idx_eval, nearest)


# ---------------------------------------------------------------- masks


MASK_CONFIGS = [
    dict(),
    dict(codebook_dim=3),
    dict(heads=2),
    dict(heads=2, separate_codebook_per_head=True),
    dict(heads=2, codebook_dim=3, separate_codebook_per_head=True),
    dict(use_cosine_sim=True, threshold_ema_dead_code=0.0),
    dict(commitment_use_cross_entropy_loss=True),
    dict(codebook_diversity_loss_weight=0.5),
]
MASK = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])


@pytest.mark.parametrize("kwargs", MASK_CONFIGS, ids=str)
def test_masked_call_equals_call_on_unmasked_tokens_only(kwargs):
    """Statistics and losses of a masked batch equal those of the same model run on the kept tokens only
    (reference bug 3: projections and heads broke the masked commitment loss)."""
    vq = VectorQuantize(4, 8, decay=0.5, **kwargs)
    other = copy.deepcopy(vq)
    x = torch.randn(2, 5, 4)
    q, idx, loss, parts = vq(x, mask=MASK, return_loss_breakdown=True)
    kept = x[MASK].unsqueeze(0)
    q_kept, idx_kept, loss_kept, parts_kept = other(kept, return_loss_breakdown=True)
    assert_state_close(state(vq), state(other))
    torch.testing.assert_close(loss, loss_kept)
    for a, b in zip(parts, parts_kept):
        torch.testing.assert_close(a, b)
    assert torch.equal(idx[MASK], idx_kept[0])
    torch.testing.assert_close(q[MASK], q_kept[0])
    assert (idx[~MASK] == -1).all()
    assert (q[~MASK] == 0).all()


def test_masked_outputs_are_input_when_zeros_not_requested():
    vq = VectorQuantize(4, 8, return_zeros_for_masked_padding=False)
    x = torch.randn(2, 5, 4)
    q, idx, _ = vq(x, mask=MASK)
    assert torch.equal(q[~MASK], x[~MASK])
    assert (idx[~MASK] == -1).all()


def test_lens_equal_the_equivalent_mask():
    vq = VectorQuantize(4, 8, codebook_dim=3, heads=2)
    other = copy.deepcopy(vq)
    x = torch.randn(3, 5, 4)
    lens = torch.tensor([5, 2, 0])
    mask = torch.arange(5) < lens.unsqueeze(-1)
    a = vq(x, lens=lens)
    b = other(x, mask=mask)
    for s, t in zip(a, b):
        assert torch.equal(s, t)
    assert_state_equal(state(vq), state(other))
    with pytest.raises(ValueError, match="mask or lens"):
        vq(x, mask=mask, lens=lens)


def test_mask_gradients_skip_masked_positions():
    vq = VectorQuantize(4, 8, codebook_dim=3)
    x = torch.randn(2, 5, 4, requires_grad=True)
    q, _, loss = vq(x, mask=MASK)
    (q.sum() + loss).backward()
    assert (x.grad[~MASK] == 0).all() and (x.grad[MASK] != 0).any()


def test_bad_mask_shape_raises():
    with pytest.raises(ValueError, match="mask must have shape"):
        VectorQuantize(4, 8)(torch.randn(2, 5, 4), mask=torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- eval: decoding and no state change


def trained(vq, steps=2, shape=None):
    shape = shape or (2, 6, vq.dim)
    for _ in range(steps):
        vq(torch.randn(shape))
    return vq.eval()


DECODE_CONFIGS = [
    (dict(), (2, 5, 4)),
    (dict(codebook_dim=3), (2, 5, 4)),
    (dict(use_cosine_sim=True), (2, 5, 4)),
    (dict(heads=2), (2, 5, 4)),
    (dict(heads=2, separate_codebook_per_head=True), (2, 5, 4)),
    (dict(heads=2, codebook_dim=3, separate_codebook_per_head=True), (2, 5, 4)),
    (dict(accept_image_fmap=True), (2, 4, 3, 2)),
    (dict(accept_image_fmap=True, heads=2, separate_codebook_per_head=True), (2, 4, 3, 2)),
    (dict(accept_3d_fmap=True, codebook_dim=2), (2, 4, 2, 3, 2)),
    (dict(channel_last=False), (2, 4, 5)),
    (dict(), (3, 4)),
    (dict(codebook_dim=3, layernorm_after_project_in=True), (2, 5, 4)),
    (dict(affine_param=True), (2, 5, 4)),
    (dict(kmeans_init=True, threshold_ema_dead_code=1.0), (2, 5, 4)),
]


@pytest.mark.parametrize("kwargs,shape", DECODE_CONFIGS, ids=str)
def test_get_output_from_indices_equals_eval_output(kwargs, shape):
    vq = VectorQuantize(4, 8, **kwargs)
    trained(vq, shape=(2, *shape[1:]) if len(shape) > 2 else (2, 4))
    x = torch.randn(shape)
    q, idx, loss = vq(x)
    assert torch.equal(vq.get_output_from_indices(idx), q)
    assert loss.shape == () and loss == 0
    codes = vq.get_codes_from_indices(idx)
    if not vq.has_projections:
        assert torch.equal(codes, q)


def test_get_output_from_indices_minus_one_gives_zeros():
    vq = VectorQuantize(4, 8, codebook_dim=3).eval()
    idx = torch.tensor([[1, -1, 2]])
    out = vq.get_output_from_indices(idx)
    assert (out[0, 1] == 0).all() and (out[0, 0] != 0).any()
    assert (vq.get_codes_from_indices(idx)[0, 1] == 0).all()


EVAL_STATE_CONFIGS = [
    dict(),
    dict(kmeans_init=True),  # reference bug 7: k-means ran in eval
    dict(affine_param=True),  # reference bug 8: affine batch statistics moved in eval
    dict(threshold_ema_dead_code=5.0),
    dict(orthogonal_reg_weight=1.0),
    dict(heads=2, separate_codebook_per_head=True, kmeans_init=True),
]


@pytest.mark.parametrize("kwargs", EVAL_STATE_CONFIGS, ids=str)
def test_eval_forward_changes_no_state(kwargs):
    vq = VectorQuantize(4, 8, **kwargs).eval()
    before = state(vq)
    vq(torch.randn(2, 6, 4))
    vq(torch.randn(2, 6, 4), mask=torch.tensor([[True] * 4 + [False] * 2, [False] + [True] * 5]))
    assert_state_equal(before, state(vq))
    if kwargs.get("kmeans_init"):
        assert not vq._codebook.initted
        vq.train()(torch.randn(2, 6, 4))
        assert vq._codebook.initted


def test_training_forward_with_frozen_codebook_changes_no_state():
    for vq, kwargs in [
        (VectorQuantize(4, 8, freeze_codebook=True), {}),
        (VectorQuantize(4, 8), dict(freeze_codebook=True)),
    ]:
        before = state(vq)
        vq(torch.randn(2, 6, 4), **kwargs)
        assert_state_equal(before, state(vq))


def test_affine_param_trains_its_statistics_and_loads_reference_style_checkpoint():
    vq = VectorQuantize(4, 8, affine_param=True)
    fresh = state(vq)
    vq(torch.randn(2, 6, 4) + 3)
    assert not torch.equal(vq._codebook.batch_mean, fresh["_codebook.batch_mean"])
    # a reference checkpoint saved before the first training step has no batch moments
    ref_style = {k: v for k, v in fresh.items() if "batch_" not in k}
    other = VectorQuantize(4, 8, affine_param=True)
    other.load_state_dict(ref_style, strict=True)


# ---------------------------------------------------------------- losses


def test_commitment_loss_is_mse_to_the_chosen_codes_in_codebook_space():
    vq = VectorQuantize(4, 8, codebook_dim=3, commitment_weight=2.0)
    codes = vq.codebook.detach().clone()
    x = torch.randn(2, 5, 4)
    _, idx, loss, parts = vq(x, return_loss_breakdown=True)
    z = vq.project_in(x).detach()
    expected = (z - codes[idx]).pow(2).mean()
    torch.testing.assert_close(parts.commitment, expected)
    torch.testing.assert_close(loss, 2.0 * expected)


def test_commitment_loss_same_on_plain_masked_and_topk_paths():
    """Reference bug 20: the masked and top-k paths compared codes with the raw input."""
    vq = VectorQuantize(4, 8, codebook_dim=3, heads=1, decay=0.5)
    x = torch.randn(2, 5, 4)
    plain = copy.deepcopy(vq)(x, return_loss_breakdown=True)[3].commitment
    masked = copy.deepcopy(vq)(x, mask=torch.ones(2, 5, dtype=torch.bool), return_loss_breakdown=True)[3].commitment
    _, idx_topk, per_token = copy.deepcopy(vq)(x, topk=1)
    torch.testing.assert_close(masked, plain)
    assert per_token.shape == (2, 5, 1)
    torch.testing.assert_close(per_token.mean(), plain)
    # and the same in eval
    vq.eval()
    _, _, per_token_eval = vq(x, topk=1)
    torch.testing.assert_close(per_token_eval.mean(), plain)


def test_codebook_diversity_loss_averages_over_all_tokens():
    """Reference bug 9: it averaged over the batch per sequence position only."""
    temperature = 0.7
    vq = VectorQuantize(3, 6, codebook_diversity_loss_weight=2.0, codebook_diversity_temperature=temperature,
                        commitment_weight=0.0)  # fmt: skip
    codes = vq.codebook.detach().clone().double()
    x = torch.randn(3, 4, 3)
    _, _, loss, parts = vq(x, return_loss_breakdown=True)
    logits = -torch.cdist(x.reshape(-1, 3).double(), codes)
    avg_prob = (logits * temperature).softmax(-1).mean(0)  # over all 12 tokens
    expected = (avg_prob * avg_prob.clamp(min=1e-5).log()).sum()
    torch.testing.assert_close(parts.codebook_diversity.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss.double(), 2.0 * expected, atol=1e-6, rtol=1e-5)


def test_cross_entropy_commitment_equals_cross_entropy_to_chosen_codes():
    vq = VectorQuantize(3, 6, commitment_use_cross_entropy_loss=True, commitment_weight=1.5)
    codes = vq.codebook.detach().clone()
    x = torch.randn(2, 4, 3)
    _, idx, loss = vq(x)
    logits = -torch.cdist(x.reshape(-1, 3), codes)
    torch.testing.assert_close(loss, 1.5 * F.cross_entropy(logits, idx.flatten()))


def independent_orthogonal(codes):
    normed = F.normalize(codes.double(), dim=-1)
    n = codes.shape[0]
    return (normed @ normed.T).pow(2).sum() / n**2 - 1.0 / n


def test_orthogonal_reg_all_codes_equals_formula():
    vq = VectorQuantize(4, 6, orthogonal_reg_weight=3.0, commitment_weight=0.0)
    assert isinstance(vq._codebook.embed, nn.Parameter)
    _, _, loss, parts = vq(torch.randn(2, 5, 4), return_loss_breakdown=True)
    expected = independent_orthogonal(vq.codebook.detach())
    # float32 against float64: a relative 1e-6 covers the summation orders of every supported torch
    torch.testing.assert_close(parts.orthogonal_reg.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.double(), 3.0 * expected, rtol=1e-6, atol=1e-7)
    loss.backward()
    assert torch.isfinite(vq._codebook.embed.grad).all() and vq._codebook.embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(orthogonal_reg_active_codes_only=True),
        dict(orthogonal_reg_max_codes=3),
        dict(orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=2),
    ],
    ids=str,
)
def test_orthogonal_reg_variants_are_finite_and_differentiable(kwargs):
    vq = VectorQuantize(4, 6, orthogonal_reg_weight=1.0, commitment_weight=0.0, **kwargs)
    _, idx, loss, parts = vq(torch.randn(2, 5, 4), return_loss_breakdown=True)
    assert torch.isfinite(parts.orthogonal_reg)
    loss.backward()
    grad = vq._codebook.embed.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if kwargs.get("orthogonal_reg_active_codes_only") and "orthogonal_reg_max_codes" not in kwargs:
        used = idx.unique()
        expected = independent_orthogonal(vq.codebook.detach()[used])
        torch.testing.assert_close(parts.orthogonal_reg.double(), expected)
        unused = [k for k in range(6) if k not in used.tolist()]
        assert (grad[0, unused] == 0).all()


def test_loss_breakdown_type_and_training_loss_is_differentiable():
    vq = VectorQuantize(4, 8)
    x = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(x, return_loss_breakdown=True)
    assert len(out) == 4 and isinstance(out[3], LossBreakdown)
    out[2].backward()
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------- non-finite inputs


def test_nan_batch_changes_no_codebook_state_and_clean_batch_then_trains():
    vq = VectorQuantize(4, 8, threshold_ema_dead_code=2.0)  # every code starts dead (count 1 < 2)
    before = state(vq)
    x = torch.randn(2, 5, 4)
    x[0, 0, 0] = float("nan")
    x[1:] = float("nan")
    x[0, 1:] = float("inf")
    vq(x)
    assert_state_equal(before, state(vq))
    q, idx, loss = vq(torch.randn(2, 5, 4))
    after = state(vq)
    assert not torch.equal(after["_codebook.cluster_size"], before["_codebook.cluster_size"])
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert torch.isfinite(loss)


def test_nan_rows_are_excluded_from_statistics_and_loss():
    vq = VectorQuantize(4, 8, codebook_dim=3, decay=0.5)
    other = copy.deepcopy(vq)
    x = torch.randn(2, 5, 4)
    bad = torch.tensor([[False, True, False, False, True], [False, False, False, True, False]])
    x_bad = x.clone()
    x_bad[bad] = float("nan")
    _, _, loss = vq(x_bad)
    _, _, loss_clean = other(x[~bad].unsqueeze(0))
    assert_state_close(state(vq), state(other))
    torch.testing.assert_close(loss, loss_clean)


def test_nan_batch_with_kmeans_init_does_not_initialise():
    vq = VectorQuantize(4, 8, kmeans_init=True)
    vq(torch.full((2, 5, 4), float("nan")))
    assert not vq._codebook.initted and (vq.codebook == 0).all()
    vq(torch.randn(2, 5, 4))
    assert vq._codebook.initted and (vq.codebook != 0).any()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(codebook_size=-1), ValueError, "codebook_size"),
        (dict(decay=2), ValueError, "decay"),
        (dict(heads=1.5), TypeError, "heads"),
        (dict(codebook_dim=0), ValueError, "codebook_dim"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(kmeans_init="yes"), TypeError, "kmeans_init"),
        (dict(commitment_weight=float("nan")), ValueError, "commitment_weight"),
        (dict(rotation_trick=True, straight_through=True), ValueError, "straight_through"),
        (
            dict(rotation_trick=True, directional_reparam=True, threshold_ema_dead_code=1.0),
            ValueError,
            "directional_reparam",
        ),
        (dict(learnable_codebook=True, ema_update=True), ValueError, "learnable_codebook"),
        (dict(learnable_codebook=True), ValueError, "ema_update"),
        (dict(use_cosine_sim=True, affine_param=True), ValueError, "affine_param"),
        (dict(use_cosine_sim=True, learnable_codebook=True, ema_update=False), ValueError, "use_cosine_sim"),
        (dict(straight_through=True, learnable_codebook=True, ema_update=False), ValueError, "straight_through"),
        (dict(directional_reparam=True), ValueError, "threshold_ema_dead_code"),
        (dict(sync_update_v=0.5), ValueError, "sync_update_v"),
        (dict(sync_update_v=2.0, learnable_codebook=True, ema_update=False), ValueError, "sync_update_v"),
        (dict(vq_bridge="linear"), TypeError, "vq_bridge"),
        (dict(in_place_codebook_optimizer=torch.optim.SGD), ValueError, "in_place_codebook_optimizer"),
        (dict(accept_image_fmap=True, accept_3d_fmap=True), ValueError, "accept_3d_fmap"),
    ],
    ids=lambda v: "-".join(f"{k}={w!r}" for k, w in v.items()) if isinstance(v, dict) and v else None,
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, error, name):
    args = dict(dim=4, codebook_size=8)
    args.update(kwargs)
    with pytest.raises(error, match=name):
        VectorQuantize(**args)


@pytest.mark.parametrize(
    "kwargs,shape,dtype,error,expected",
    [
        ({}, (2, 5, 3), torch.float32, ValueError, r"\(b, n, dim\)|4 features"),
        ({}, (2, 5, 4, 4), torch.float32, ValueError, r"\(b, n, dim\)"),
        ({}, (4,), torch.float32, ValueError, r"\(b, n, dim\)"),
        ({}, (2, 5, 4), torch.int64, TypeError, "floating point"),
        (dict(accept_image_fmap=True), (2, 5, 4), torch.float32, ValueError, r"\(b, c, h, w\)"),
        (dict(accept_image_fmap=True), (2, 5, 3, 3), torch.float32, ValueError, "4 features"),
        (dict(accept_3d_fmap=True), (2, 4, 3, 3), torch.float32, ValueError, r"\(b, c, t, h, w\)"),
        (dict(channel_last=False), (2, 5, 4), torch.float32, ValueError, "4 features"),
    ],
)
def test_bad_inputs_raise_naming_the_expected_shape(kwargs, shape, dtype, error, expected):
    x = torch.ones(shape, dtype=dtype)
    with pytest.raises(error, match=expected):
        VectorQuantize(4, 8, **kwargs)(x)


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("training", [True, False])
def test_topk_shapes_indices_and_no_ema_update(training):
    vq = VectorQuantize(4, 8, threshold_ema_dead_code=5.0).train(training)
    before = state(vq)
    x = torch.randn(2, 5, 4)
    q, idx, loss = vq(x, topk=3)
    assert q.shape == (2, 5, 3, 4) and idx.shape == (2, 5, 3) and loss.shape == (2, 5, 3)
    expected = (-torch.cdist(x.reshape(-1, 4), vq.codebook)).topk(3, dim=-1).indices.view(2, 5, 3)
    assert torch.equal(idx, expected)
    assert torch.equal(q, vq.codebook[idx])
    per_token = (x.unsqueeze(2) - vq.codebook[idx]).pow(2).mean(-1)
    torch.testing.assert_close(loss, per_token)
    assert_state_equal(before, state(vq))


def test_topk_with_mask_and_image():
    vq = VectorQuantize(4, 8).eval()
    q, idx, loss = vq(torch.randn(2, 5, 4), topk=2, mask=MASK)
    assert (idx[~MASK] == -1).all() and (q[~MASK] == 0).all() and (loss[~MASK] == 0).all()
    vq = VectorQuantize(4, 8, accept_image_fmap=True).eval()
    q, idx, loss = vq(torch.randn(2, 4, 3, 2), topk=2)
    assert q.shape == (2, 4, 3, 2, 2) and idx.shape == (2, 3, 2, 2) and loss.shape == (2, 3, 2, 2)
    # the nearest code comes first
    assert torch.equal(q[..., 0], vq(q[..., 0])[0]) and torch.equal(idx[..., 0], vq(q[..., 0])[1])


# ---------------------------------------------------------------- cross-entropy to given indices


@pytest.mark.parametrize("kwargs", [dict(), dict(codebook_dim=3)], ids=str)
def test_indices_path_returns_cross_entropy_of_distance_logits(kwargs):
    vq = VectorQuantize(4, 8, **kwargs).eval()
    x = torch.randn(2, 5, 4)
    given = torch.randint(0, 8, (2, 5))
    out = vq(x, indices=given)
    assert len(out) == 2
    quantized, ce = out
    z = vq.project_in(x).detach()
    logits = -torch.cdist(z.reshape(-1, z.shape[-1]), vq.codebook)
    torch.testing.assert_close(ce, F.cross_entropy(logits, given.flatten()))
    # the quantized tensor is in codebook space (before project_out), as the reference returns it
    _, idx, _ = vq(x)
    assert quantized.shape == (2, 5, z.shape[-1])
    assert torch.equal(quantized, vq.codebook[idx])


def test_indices_path_with_separate_heads_and_ignored_codes():
    vq = VectorQuantize(4, 8, codebook_dim=2, heads=2, separate_codebook_per_head=True).eval()
    x = torch.randn(2, 3, 4)
    given = torch.randint(0, 8, (2, 3, 2))
    given[0, 1, 1] = -1
    _, ce = vq(x, indices=given)
    terms = []
    for h in range(2):
        logits = -torch.cdist(x[..., h * 2 : (h + 1) * 2].reshape(-1, 2), vq.codebook[h])
        for i, t in enumerate(given[..., h].flatten().tolist()):
            if t >= 0:
                terms.append(-logits[i].log_softmax(-1)[t])
    torch.testing.assert_close(ce, torch.stack(terms).mean())


# ---------------------------------------------------------------- EMA options


def test_ema_update_weight_tensor_and_callable():
    x = torch.randn(2, 6, 4)
    vq = VectorQuantize(4, 8, decay=0.5)
    weight = torch.zeros(8)
    weight[:4] = 1.0
    reference_vq = copy.deepcopy(vq)
    before = state(vq)
    vq(x, ema_update_weight=weight)
    reference_vq(x)
    after, full = state(vq), state(reference_vq)
    for name in ("_codebook.cluster_size", "_codebook.embed_avg"):
        assert torch.equal(after[name][0, 4:], before[name][0, 4:])  # weight 0: not moved
        torch.testing.assert_close(after[name][0, :4], full[name][0, :4])  # weight 1: a normal update
    seen = {}

    def weight_fn(embed_sum, cluster_size):
        seen["shapes"] = (tuple(embed_sum.shape), tuple(cluster_size.shape))
        return weight

    other = copy.deepcopy(VectorQuantize(4, 8, decay=0.5))
    other.load_state_dict(before)
    other(x, ema_update_weight=weight_fn)
    assert seen["shapes"] == ((1, 8, 4), (1, 8))
    assert_state_close(state(other), after)


def test_accum_ema_update_then_normal_call_equals_one_call_on_both_batches():
    vq = VectorQuantize(4, 8, decay=0.5)
    single = copy.deepcopy(vq)
    a, b = torch.randn(2, 5, 4), torch.randn(3, 5, 4)
    before = state(vq)
    vq(a, accum_ema_update=True)
    assert_state_equal(before, state(vq))
    vq(b)
    single(torch.cat([a, b]))
    assert_state_close(state(vq), state(single))


def test_manual_ema_update_waits_for_update_ema():
    vq = VectorQuantize(4, 8, manual_ema_update=True)
    embed = vq.codebook.clone()
    vq(torch.randn(2, 5, 4))
    assert torch.equal(vq.codebook, embed)
    vq._codebook.update_ema()
    assert not torch.equal(vq.codebook, embed)


def test_ema_update_false_per_call_keeps_codes():
    vq = VectorQuantize(4, 8)
    embed = vq.codebook.clone()
    vq(torch.randn(2, 5, 4), ema_update=False)
    assert torch.equal(vq.codebook, embed)
    assert vq.ema_update


def test_learnable_codebook_with_in_place_optimizer_changes_the_codebook():
    vq = VectorQuantize(
        4, 8, learnable_codebook=True, ema_update=False,
        in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )  # fmt: skip
    embed = vq.codebook.detach().clone()
    _, _, _, parts = vq(torch.randn(2, 5, 4), return_loss_breakdown=True)
    assert not torch.equal(vq.codebook.detach(), embed)
    assert parts.inplace_optimize > 0
    assert vq._codebook.embed.grad is None or (vq._codebook.embed.grad == 0).all()


def test_sync_update_v_gives_the_codebook_a_gradient_from_the_output():
    vq = VectorQuantize(4, 8, learnable_codebook=True, ema_update=False, sync_update_v=0.25, commitment_weight=0.0)
    x = torch.randn(2, 5, 4, requires_grad=True)
    q, idx, _ = vq(x)
    q.sum().backward()
    counts = torch.bincount(idx.flatten(), minlength=8).float()
    expected = 0.25 * counts[:, None].expand(8, 4)
    torch.testing.assert_close(vq._codebook.embed.grad[0], expected)


def test_learnable_codebook_learns_from_commitment_loss():
    vq = VectorQuantize(4, 8, learnable_codebook=True, ema_update=False)
    _, idx, loss = vq(torch.randn(2, 5, 4))
    loss.backward()
    grad = vq._codebook.embed.grad[0]
    used = idx.unique()
    assert (grad[used] != 0).any() and torch.isfinite(grad).all()


def test_vq_bridge_is_applied_to_the_codebook():
    bridge = nn.Linear(4, 4)
    vq = VectorQuantize(4, 8, vq_bridge=bridge)
    assert vq.learnable_codebook and not vq.ema_update
    _, _, loss = vq(torch.randn(2, 5, 4))
    loss.backward()
    assert bridge.weight.grad is not None and bridge.weight.grad.abs().sum() > 0
    vq.eval()
    x = torch.randn(2, 5, 4)
    q, idx, _ = vq(x)
    bridged = bridge(vq.codebook).detach()
    assert torch.equal(idx.flatten(), brute_force_nearest(x.reshape(-1, 4), bridged))
    torch.testing.assert_close(q, bridged[idx])


def test_codebook_property_getter_and_setter():
    vq = VectorQuantize(4, 8)
    assert vq.codebook.shape == (8, 4)
    new = torch.randn(8, 4)
    vq.codebook = new
    assert torch.equal(vq.codebook, new) and vq.codebook.data_ptr() != new.data_ptr()
    sep = VectorQuantize(4, 8, heads=2, separate_codebook_per_head=True)
    assert sep.codebook.shape == (2, 8, 4)
    new = torch.randn(2, 8, 4)
    sep.codebook = new
    assert torch.equal(sep._codebook.embed, new)


def test_update_indices_equals_the_forward_update():
    vq = VectorQuantize(4, 8, decay=0.5, codebook_dim=3)
    other = copy.deepcopy(vq)
    x = torch.randn(2, 5, 4)
    _, idx, _ = vq(x, mask=MASK)
    other.update_indices(x, idx, mask=MASK)
    assert_state_close(state(vq), state(other))
    assert VectorQuantize.update_ema_indices is VectorQuantize.update_indices


def test_expire_codes_replaces_dead_codes_with_rows_of_x():
    vq = VectorQuantize(4, 6, threshold_ema_dead_code=1.0)
    vq._codebook.cluster_size.copy_(torch.tensor([[2.0, 0.5, 3.0, 0.0, 5.0, 2.0]]))
    before = vq.codebook.clone()
    x = torch.randn(2, 5, 4)
    vq.expire_codes_(x)
    rows = x.reshape(-1, 4)
    for k in range(6):
        if k in (1, 3):
            assert any(torch.equal(vq.codebook[k], r) for r in rows)
            assert vq._codebook.cluster_size[0, k] == 1.0
        else:
            assert torch.equal(vq.codebook[k], before[k])


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(heads=2, codebook_dim=2, separate_codebook_per_head=True), dict(use_cosine_sim=True)],
    ids=str,
)
def test_dead_codes_are_replaced_during_training(kwargs):
    """Threshold 1 with counts starting at 1 and decay 0.8: after one step a code used c times has count
    0.8 + 0.2 c, so exactly the unused codes (0.8) expire, while a code used once sits exactly at the threshold
    (1.0) and must stay. Every expired code, and no other, becomes a distinct row of the batch (in codebook
    space) with count reset to the threshold."""
    torch.manual_seed(0)
    vq = VectorQuantize(4, 16, threshold_ema_dead_code=1.0, **kwargs)
    x = torch.randn(1, 40, 4)
    _, idx, _ = vq(x)
    heads = 2 if kwargs.get("separate_codebook_per_head") else 1
    with torch.no_grad():
        rows = vq.project_in(x).reshape(40, heads, -1).transpose(0, 1)  # (h, N, d) codebook-space rows
    if kwargs.get("use_cosine_sim"):
        rows = torch.nn.functional.normalize(rows, dim=-1)
    idx = idx.reshape(40, heads).T
    embed, cluster_size = vq._codebook.embed.detach(), vq._codebook.cluster_size
    for h in range(heads):
        counts = torch.bincount(idx[h], minlength=16)
        assert (counts == 0).any() and (counts == 1).any(), "the batch must leave codes unused and use one once"
        # exact differences: the matrix-product form of cdist is off by about sqrt(eps) for coinciding points
        matched = torch.cdist(embed[h], rows[h], compute_mode="donot_use_mm_for_euclid_dist").min(dim=-1)
        replaced = matched.values < 1e-6
        assert torch.equal(replaced, counts == 0), (h, counts, matched.values)
        chosen = matched.indices[replaced]
        assert len(set(chosen.tolist())) == len(chosen), "dead codes must get distinct rows"
        expected_sizes = torch.where(counts == 0, 1.0, 0.8 + 0.2 * counts.float())
        torch.testing.assert_close(cluster_size[h], expected_sizes, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs", [dict(heads=2, codebook_dim=2, separate_codebook_per_head=True), dict(use_cosine_sim=True)], ids=str
)
def test_kmeans_init_on_the_first_training_batch(kwargs):
    vq = VectorQuantize(4, 6, kmeans_init=True, kmeans_iters=3, **kwargs)
    assert (vq._codebook.embed == 0).all()
    vq(torch.randn(2, 10, 4))
    assert vq._codebook.initted
    embed = vq._codebook.embed
    assert torch.isfinite(embed).all() and (embed.norm(dim=-1) > 0).all()
    if kwargs.get("use_cosine_sim"):
        torch.testing.assert_close(embed.norm(dim=-1), torch.ones(1, 6))


def test_state_dict_keys_match_the_reference():
    assert set(VectorQuantize(4, 8).state_dict()) == {
        "_codebook.initted", "_codebook.cluster_size", "_codebook.embed_avg", "_codebook.embed",
    }  # fmt: skip
    keys = set(VectorQuantize(4, 8, codebook_dim=3, heads=2, separate_codebook_per_head=True).state_dict())
    assert {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"} <= keys


# ---------------------------------------------------------------- against the reference library

# Opt-in: set VQ_REFERENCE_PYTHON to an interpreter with vector-quantize-pytorch 1.32.0 installed (.ci/run makes
# .ci/ref-venv and sets it). Unset, the test is skipped as not requested; set, a missing interpreter, another
# version or a failed reference run is a failure, never a skip.
REF_PYTHON = os.environ.get("VQ_REFERENCE_PYTHON")

REF_SCRIPT = """
import sys, torch
from vector_quantize_pytorch import VectorQuantize
torch.manual_seed(0)
out = {}
for name, kwargs in [("plain", {}), ("projected_heads", dict(codebook_dim=3, heads=2, separate_codebook_per_head=True)),
                     ("cosine", dict(use_cosine_sim=True))]:
    vq = VectorQuantize(4, 16, **kwargs)
    for _ in range(3):
        vq(torch.randn(2, 20, 4))
    vq.eval()
    x = torch.randn(2, 20, 4)
    with torch.no_grad():
        q, idx, _ = vq(x)
    out[name] = dict(kwargs=kwargs, state=vq.state_dict(), x=x, q=q, idx=idx)
torch.save(out, sys.argv[1])
"""


REF_VERSION_CHECK = """
import importlib.metadata, vector_quantize_pytorch
print(importlib.metadata.version("vector-quantize-pytorch"), vector_quantize_pytorch.__file__)
"""


@pytest.mark.skipif(REF_PYTHON is None, reason="opt-in: set VQ_REFERENCE_PYTHON to the reference venv's python")
def test_eval_outputs_equal_the_reference_for_the_same_state(tmp_path):
    assert Path(REF_PYTHON).is_file(), f"VQ_REFERENCE_PYTHON={REF_PYTHON} does not exist"
    # run from tmp_path so that the reference, not this checkout, is imported
    version = subprocess.run([REF_PYTHON, "-c", REF_VERSION_CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.split()[0] == "1.32.0", version.stdout
    checkout_package = str(Path(__file__).resolve().parents[1] / "vector_quantize_pytorch") + "/"
    assert checkout_package not in version.stdout, "imported this checkout, not the reference"
    path = tmp_path / "ref.pt"
    done = subprocess.run([REF_PYTHON, "-c", REF_SCRIPT, str(path)], capture_output=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, f"reference run failed: {done.stderr.decode()[-2000:]}"
    for name, case in torch.load(path, weights_only=False).items():
        ours = VectorQuantize(4, 16, **case["kwargs"])
        ours.load_state_dict(case["state"], strict=True)
        q, idx, _ = ours.eval()(case["x"])
        assert torch.equal(idx, case["idx"]), name
        torch.testing.assert_close(q, case["q"], msg=name)
