import math

import pytest
import torch

from vector_quantize_pytorch.finite_scalar_perturbation import CDF_ACTIVATIONS, FSP, VectorNorm, batch_stats

ACTS = ["tanh", "sigmoid", "normal", "laplace", "cauchy"]


def fill_linear(lin, start):
    """Deterministic weights (the same formula is used in the reference script below)."""
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(start, -start, lin.weight.numel()).reshape(lin.weight.shape))
        lin.bias.copy_(torch.linspace(-0.1, 0.2, lin.bias.numel()))


def make_fsp(**kwargs):
    fsp = FSP([8, 5, 5], dim=4, **kwargs)
    fill_linear(fsp.project_in, 0.8)
    fill_linear(fsp.project_out, 0.6)
    return fsp


X = torch.linspace(-2.0, 2.5, 24).reshape(2, 3, 4)

# Numbers printed by vector-quantize-pytorch 1.32.0 (~/ref-venv/bin/python, run outside the repo), for
#     f = FSP([8, 5, 5], dim=4, act_name=act, need_inv_act=inv, vector_norm="kurt")
#     fill_linear(f.project_in, 0.8); fill_linear(f.project_out, 0.6); f.eval(); q, i, nl, info = f(X)
# (q rounded to 6 decimals).
REF_INDICES = {
    "tanh": [[176, 176, 137], [23, 23, 23]],
    "sigmoid": [[176, 176, 98], [22, 23, 23]],
    "normal": [[176, 176, 138], [23, 23, 23]],
    "laplace": [[176, 176, 138], [22, 23, 23]],
    "cauchy": [[176, 177, 138], [22, 23, 23]],
}
REF_Q = {
    ("tanh", False): [
        -0.480264, -0.33775, -0.195236, -0.052722, -0.480264, -0.33775, -0.195236, -0.052722, -0.484988,
        -0.257446, -0.029904, 0.197638, 0.280264, 0.33775, 0.395236, 0.452722, 0.280264, 0.33775, 0.395236,
        0.452722, 0.280264, 0.33775, 0.395236, 0.452722,
    ],
    ("laplace", True): [
        -0.733152, -0.479333, -0.225514, 0.028306, -0.733152, -0.479333, -0.225514, 0.028306, -0.18696,
        -0.10032, -0.01368, 0.072961, -0.126015, 0.179711, 0.485438, 0.791164, 0.533152, 0.479333, 0.425514,
        0.371694, 0.533152, 0.479333, 0.425514, 0.371694,
    ],
    ("cauchy", True): [
        -1.94129, -1.20322, -0.465149, 0.272921, 0.177152, -0.240292, -0.657735, -1.075178, -0.2235, -0.142601,
        -0.061702, 0.019197, -0.377152, 0.240292, 0.857735, 1.475179, 1.741289, 1.20322, 0.66515, 0.12708,
        1.741289, 1.20322, 0.66515, 0.12708,
    ],
}  # fmt: skip
# Training mode, same weights, FSP([8, 5, 5], dim=4, quantize_rate=0.5); torch.manual_seed(7); f(X)
REF_TRAIN_Q = [
    -0.468793, -0.373631, -0.278469, -0.183308, -0.552758, -0.380324, -0.20789, -0.035456, -0.53868, -0.260095,
    0.018491, 0.297077, 0.386287, 0.380795, 0.375302, 0.36981, 0.04189, 0.291605, 0.54132, 0.791034, 0.23798,
    0.360139, 0.482299, 0.604459,
]  # fmt: skip
REF_TRAIN_ACCEPT = 0.8333333134651184
# FSP([8, 5, 5], vector_norm=preset)(torch.linspace(-2.0, 2.5, 24).reshape(8, 3) ** 2)[2]
REF_PRESET_LOSS = {
    "none": 0.0,
    "var": 0.8571751117706299,
    "kurt": 0.9570132493972778,
    "var_tanh": 0.9234043955802917,
    "var_sigmoid": 0.3982654809951782,
    "var_laplace": 0.5664779543876648,
}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("inv", [False, True])
def test_eval_matches_reference(act, inv):
    fsp = make_fsp(act_name=act, need_inv_act=inv, vector_norm="kurt").eval()
    q, indices, norm_loss, info = fsp(X)
    assert indices.dtype == torch.int32 and indices.tolist() == REF_INDICES[act]
    # no norm-loss value here: project_in's equal weights make the middle latent feature constant, so its
    # standardised moments are rounding noise (the loss differs by 0.5% between CPUs, and by 1.4% from
    # float64); test_vector_norm_presets_match_reference checks the loss on well-conditioned latents
    assert torch.isfinite(norm_loss)
    assert set(info) == {"level_indices", "norm_info"}
    if (act, inv) in REF_Q:
        assert torch.allclose(q.flatten(), torch.tensor(REF_Q[act, inv]), atol=2e-6)


def test_training_perturbation_matches_reference():
    fsp = make_fsp(quantize_rate=0.5)
    torch.manual_seed(7)
    q, _, norm_loss, info = fsp(X)
    assert torch.allclose(q.flatten(), torch.tensor(REF_TRAIN_Q), atol=2e-6)
    assert info["p_accept_prob"].item() == pytest.approx(REF_TRAIN_ACCEPT)
    assert torch.isfinite(norm_loss)  # a constant latent feature: see test_eval_matches_reference


@pytest.mark.parametrize("preset", list(REF_PRESET_LOSS))
def test_vector_norm_presets_match_reference(preset):
    fsp = FSP([8, 5, 5], vector_norm=preset)
    _, _, norm_loss, _ = fsp(torch.linspace(-2.0, 2.5, 24).reshape(8, 3) ** 2)
    assert norm_loss.item() == pytest.approx(REF_PRESET_LOSS[preset], rel=1e-6, abs=1e-7)


# ----- behaviour ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("inv", [False, True])
def test_eval_round_trip_is_exact(act, inv):
    torch.manual_seed(0)
    fsp = FSP([7, 4, 3], dim=5, act_name=act, need_inv_act=inv).eval()
    x = torch.randn(3, 6, 5)
    q, indices, _, info = fsp(x)
    assert torch.equal(fsp.indices_to_codes(indices), q)
    assert torch.equal(fsp(x)[0], q)  # deterministic
    assert torch.equal(info["level_indices"].long(), fsp.indices_to_level_indices(indices).long())


def test_bins_by_hand():
    # no projection, tanh CDF, 4 bins: a = (tanh z + 1) / 2, bin floor(4 a), centre (k + 1/2) / 4
    fsp = FSP([4], vector_norm="none").eval()
    z = torch.tensor([[-3.0], [-0.3], [0.0], [0.2], [5.0]])
    q, indices, norm_loss, info = fsp(z)
    bins = [math.floor(4 * (math.tanh(v) + 1) / 2) for v in z.flatten().tolist()]
    bins = [min(k, 3) for k in bins]
    assert indices.tolist() == bins and info["level_indices"].flatten().tolist() == bins
    expected = [((k + 0.5) / 4 - 0.5) * math.sqrt(12) for k in bins]
    assert q.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert norm_loss.item() == 0.0


def test_inverse_cdf_inverts_cdf():
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for name, (cdf, inverse) in CDF_ACTIVATIONS.items():
        p = cdf(z)
        assert ((p >= 0) & (p <= 1)).all(), name
        assert torch.allclose(inverse(p), z, atol=1e-6), name


def test_layouts_and_shapes():
    fsp = FSP([8, 5, 5], dim=6, channel_first=True)
    q, indices, norm_loss, info = fsp(torch.randn(2, 6, 3, 4))
    assert q.shape == (2, 6, 3, 4) and indices.shape == (2, 3, 4) and norm_loss.shape == ()
    assert info["level_indices"].shape == (2, 3, 4, 3)
    assert set(info["norm_info"]) == {"mean", "variance", "skewness", "kurtosis"}
    assert fsp.eval().indices_to_codes(indices).shape == (2, 6, 3, 4)

    fsp = FSP([8, 5, 5], dim=6)
    q, indices, _, info = fsp(torch.randn(2, 3, 4, 6))  # channel-last with extra axes
    assert q.shape == (2, 3, 4, 6) and indices.shape == (2, 3, 4)
    q, indices, _, _ = fsp(torch.randn(5, 6))
    assert q.shape == (5, 6) and indices.shape == (5,)


def test_training_perturbation_stays_within_half_a_bin():
    torch.manual_seed(1)
    levels = [8, 5, 5]
    fsp = FSP(levels, quantize_rate=0.0)
    z = torch.randn(64, 3) * 2
    q, indices, _, info = fsp(z)
    act = (torch.tanh(z) + 1) / 2
    perturbed = q * (1 / math.sqrt(12)) + 0.5
    half_bin = 1 / (2 * torch.tensor(levels, dtype=torch.float32))
    assert ((perturbed - act).abs() <= half_bin + 1e-6).all()
    assert ((perturbed >= 0) & (perturbed <= 1)).all()
    assert 0.5 <= info["p_accept_prob"].item() <= 1.0
    # indices are always those of the unperturbed bins
    assert torch.equal(indices, fsp.eval()(z)[1])


def test_training_with_quantize_rate_one_equals_eval():
    torch.manual_seed(2)
    fsp = FSP([8, 5, 5], dim=4, quantize_rate=1.0)
    x = torch.randn(3, 4)
    q, indices, _, info = fsp(x)
    assert "p_accept_prob" not in info
    q_eval, indices_eval, _, _ = fsp.eval()(x)
    assert torch.equal(q, q_eval) and torch.equal(indices, indices_eval)


def test_straight_through_gradients():
    x = torch.tensor([[0.3, -1.0, 2.0]], requires_grad=True)
    q, *_ = FSP([8, 5, 5], vector_norm="none")(x)
    (grad,) = torch.autograd.grad(q.sum(), x)
    expected = (1 - torch.tanh(x.detach()) ** 2) / 2 * math.sqrt(12)  # d/dz of standardised tanh CDF
    assert torch.allclose(grad, expected, rtol=1e-5)

    q, *_ = FSP([8, 5, 5], vector_norm="none", need_inv_act=True)(x)
    (grad,) = torch.autograd.grad(q.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))


def test_index_arithmetic_round_trips_for_a_large_codebook():
    fsp = FSP([4096, 4096, 100])  # 1.68e9 codes: float32 could not hold these indices
    level_indices = torch.tensor([[4095, 4095, 99], [1, 2, 3], [4095, 0, 50]])
    indices = fsp.level_indices_to_indices(level_indices.float())
    assert indices.tolist() == [4096 * 4096 * 100 - 1, 1 + 2 * 4096 + 3 * 4096 * 4096, 4095 + 50 * 4096 * 4096]
    assert torch.equal(fsp.indices_to_level_indices(indices).long(), level_indices)
    small = FSP([3, 4, 2])
    every = torch.arange(small.codebook_size, dtype=torch.int32)
    assert torch.equal(small.level_indices_to_indices(small.indices_to_level_indices(every)), every)
    assert small.indices_to_act_value(torch.tensor(23)).tolist() == pytest.approx([2.5 / 3, 3.5 / 4, 1.5 / 2])


def test_vector_norm_by_hand():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 1.0]])
    mean, variance, skewness, kurtosis = batch_stats(z)
    assert mean.tolist() == [3.0, 1.0] and variance.tolist() == [4.0, 1.0]
    loss, info = VectorNorm.build("var")(z)
    assert loss.item() == pytest.approx(0.1 * (9 + 1) / 2 + 0.07 * (9 + 0) / 2)
    assert torch.equal(info["variance"], variance)
    # a single row: biased variance, finite loss (the reference's unbiased variance gives NaN)
    loss, info = VectorNorm.build("kurt")(torch.tensor([[0.5, -0.5]]))
    assert torch.isfinite(loss) and info["variance"].tolist() == [0.0, 0.0]


def test_dtypes():
    fsp = FSP([8, 5, 5])
    q, indices, norm_loss, info = fsp(torch.randn(4, 3, dtype=torch.bfloat16))
    assert q.dtype == torch.bfloat16 and indices.dtype == torch.int32 and norm_loss.dtype == torch.float32
    assert info["level_indices"].dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(levels=[8, 0]), ValueError, "levels"),
        (dict(levels=5), TypeError, "levels"),
        (dict(levels=[8, 5], dim=0), ValueError, "dim"),
        (dict(levels=[8, 5], channel_first=1), TypeError, "channel_first"),
        (dict(levels=[8, 5], projection_has_bias="yes"), TypeError, "projection_has_bias"),
        (dict(levels=[8, 5], act_name="relu"), ValueError, "act_name"),
        (dict(levels=[8, 5], quantize_rate=1.5), ValueError, "quantize_rate"),
        (dict(levels=[8, 5], need_inv_act=None), TypeError, "need_inv_act"),
        (dict(levels=[8, 5], vector_norm="l2"), ValueError, "vector_norm"),
        (dict(levels=[2**16, 2**16]), ValueError, "levels"),
    ],
)
def test_invalid_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        FSP(**kwargs)


def test_wrong_input():
    fsp = FSP([8, 5, 5], dim=4)
    with pytest.raises(ValueError, match="4"):
        fsp(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="dimensions"):
        fsp(torch.randn(4))
    with pytest.raises(TypeError, match="integer"):
        fsp.indices_to_codes(torch.zeros(2))
