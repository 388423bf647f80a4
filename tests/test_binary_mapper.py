import itertools
import math

import pytest
import torch

from vector_quantize_pytorch.binary_mapper import BinaryMapper, code_probabilities

# Numbers printed by vector-quantize-pytorch 1.32.0 (~/ref-venv/bin/python, run outside the repo):
#     bm = BinaryMapper(bits=3); lg = torch.linspace(-2, 2, 12).reshape(4, 3)
#     torch.manual_seed(3); bm(lg, return_indices=True, reduce_aux_kl_loss=False)    -> indices, aux
#     torch.manual_seed(3); bm(lg, temperature=0.5, return_indices=True)             -> indices, aux
#     lgr = lg.clone().requires_grad_(); torch.manual_seed(3); oh, _, _ = bm(lgr, return_indices=True)
#     (oh * torch.arange(8.)).sum().backward(); lgr.grad
LOGITS = torch.linspace(-2, 2, 12).reshape(4, 3)
REF_INDICES = [3, 5, 4, 6]
REF_AUX = [0.05104076862335205, 0.0, 0.0, 0.0510408878326416]
REF_INDICES_T05 = [1, 5, 6, 7]
REF_AUX_T05 = 0.025520414113998413
REF_GRAD = [
    0.10499358177185059, 0.27280867099761963, 0.6836854219436646, 0.2047102451324463, 0.46457934379577637,
    0.9917808771133423, 0.24794530868530273, 0.4645792841911316, 0.8188406229019165, 0.17092138528823853,
    0.2728087902069092, 0.4199744164943695,
]  # fmt: skip


def all_codes(bits):
    """(2**bits, bits) table, bit i of code c = (c >> i) & 1, built independently of the module."""
    return torch.tensor([[(c >> i) & 1 for i in range(bits)] for c in range(2**bits)], dtype=torch.float32)


def test_reference_snippet_shapes():
    binary_mapper = BinaryMapper(bits=8)
    logits = torch.randn(3, 4, 8)
    sparse_one_hot, indices, aux_loss = binary_mapper(logits, return_indices=True, reduce_aux_kl_loss=False)
    assert sparse_one_hot.shape == (3, 4, 2**8)
    assert indices.shape == (3, 4) and indices.dtype == torch.int64
    assert aux_loss.shape == (3, 4)
    joint_log_prob = binary_mapper.log_prob(logits, indices=indices)
    assert joint_log_prob.shape == (3, 4)
    assert torch.allclose(joint_log_prob, binary_mapper.log_prob(logits, one_hot=sparse_one_hot))
    assert binary_mapper.log_prob(logits, indices=indices, sum_bits=False).shape == (3, 4, 8)
    binary_mapper.eval()
    one_hot1, aux = binary_mapper(logits, deterministic=True)
    one_hot2, _ = binary_mapper(logits, deterministic=True)
    assert torch.equal(one_hot1, one_hot2) and aux.shape == () and aux.item() == 0.0


def test_matches_reference_sampling_and_aux_loss():
    bm = BinaryMapper(bits=3)
    torch.manual_seed(3)
    _, indices, aux = bm(LOGITS, return_indices=True, reduce_aux_kl_loss=False)
    assert indices.tolist() == REF_INDICES
    assert aux.tolist() == pytest.approx(REF_AUX, abs=1e-7)
    torch.manual_seed(3)
    _, indices, aux = bm(LOGITS, temperature=0.5, return_indices=True)
    assert indices.tolist() == REF_INDICES_T05
    assert aux.item() == pytest.approx(REF_AUX_T05, rel=1e-5)


def test_matches_reference_straight_through_gradient():
    bm = BinaryMapper(bits=3)
    logits = LOGITS.clone().requires_grad_()
    torch.manual_seed(3)
    one_hot, _, _ = bm(logits, return_indices=True)
    (one_hot * torch.arange(8.0)).sum().backward()
    assert torch.allclose(logits.grad.flatten(), torch.tensor(REF_GRAD), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_log_prob_is_a_distribution_over_all_codes(bits):
    torch.manual_seed(bits)
    bm = BinaryMapper(bits=bits)
    logits = torch.randn(5, bits) * 3
    every = torch.arange(2**bits)
    log_probs = torch.stack([bm.log_prob(logits, indices=c.expand(5)) for c in every], dim=-1)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(5), atol=1e-6)
    # the soft distribution used for straight-through is the same distribution
    assert torch.allclose(code_probabilities(logits), log_probs.exp(), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_soft_distribution_equals_enumeration(bits):
    torch.manual_seed(bits)
    logits = torch.randn(2, 3, bits, dtype=torch.float64)
    codes = all_codes(bits).double()
    log_p = torch.nn.functional.logsigmoid(logits) @ codes.T + torch.nn.functional.logsigmoid(-logits) @ (1 - codes).T
    assert torch.allclose(code_probabilities(logits), log_p.exp(), rtol=1e-12)


def test_forward_is_exactly_one_hot_and_consistent():
    torch.manual_seed(0)
    bm = BinaryMapper(bits=4)
    logits = torch.randn(6, 4, requires_grad=True)
    one_hot, indices, _ = bm(logits, return_indices=True)
    assert one_hot.dtype == torch.float32
    assert torch.equal(one_hot.detach(), torch.nn.functional.one_hot(indices, 16).float())
    assert torch.equal(one_hot.argmax(-1), indices)
    assert one_hot.requires_grad  # straight-through in training


def test_aux_loss_by_hand():
    bm = BinaryMapper(bits=2)  # threshold ln 2
    p = 1 / (1 + math.exp(-3.0))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    # logits (0, 0): entropy 2 ln 2, KL 0 -> 0; (3, -3): entropy 2h, KL 2 ln 2 - 2h > ln 2 -> 2 ln 2 - 2h - ln 2
    logits = torch.tensor([[0.0, 0.0], [3.0, -3.0]])
    aux = bm.calc_aux_loss(logits, reduce_aux_kl_loss=False)
    assert aux.tolist() == pytest.approx([0.0, math.log(2) - 2 * h], abs=1e-6)
    assert bm.calc_aux_loss(logits).item() == pytest.approx((math.log(2) - 2 * h) / 2, abs=1e-6)
    assert bm.binary_entropy(logits).tolist() == pytest.approx([2 * math.log(2), 2 * h], abs=1e-6)
    # with no free budget the uniform bits still cost nothing, the confident ones their full KL
    aux = BinaryMapper(bits=2, kl_loss_threshold=0.0).calc_aux_loss(logits, reduce_aux_kl_loss=False)
    assert aux.tolist() == pytest.approx([0.0, 2 * math.log(2) - 2 * h], abs=1e-6)


def test_deterministic_modes():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, -0.1]])
    expected = [1 + 4, 2]  # bits above zero, bit i worth 2**i
    bm = BinaryMapper(bits=3, deterministic_on_eval=True).eval()
    _, indices, aux = bm(logits, return_indices=True)
    assert indices.tolist() == expected and aux.item() == 0.0
    _, indices, _ = BinaryMapper(bits=3)(logits, deterministic=True, return_indices=True)
    assert indices.tolist() == expected


def test_sampling_frequencies_follow_the_bits():
    torch.manual_seed(0)
    bm = BinaryMapper(bits=2)
    logits = torch.tensor([1.0, -2.0]).expand(20000, 2)
    _, indices, _ = bm(logits, return_indices=True)
    frequencies = torch.bincount(indices, minlength=4).float() / 20000
    p0, p1 = torch.sigmoid(torch.tensor([1.0, -2.0])).tolist()
    expected = [(1 - p0) * (1 - p1), p0 * (1 - p1), (1 - p0) * p1, p0 * p1]
    assert frequencies.tolist() == pytest.approx(expected, abs=0.015)


def test_half_precision_logits_with_straight_through():
    # the reference raises "expected scalar type BFloat16 but found Float" here
    logits = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    one_hot, aux = BinaryMapper(bits=4)(logits, straight_through=True)
    assert one_hot.dtype == torch.float32 and aux.dtype == torch.float32
    one_hot.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_any_leading_shape():
    bm = BinaryMapper(bits=3)
    one_hot, indices, aux = bm(torch.randn(3), return_indices=True, reduce_aux_kl_loss=False)
    assert one_hot.shape == (8,) and indices.shape == () and aux.shape == ()
    one_hot, indices, aux = bm(torch.randn(2, 1, 5, 3), return_indices=True, reduce_aux_kl_loss=False)
    assert one_hot.shape == (2, 1, 5, 8) and indices.shape == (2, 1, 5) and aux.shape == (2, 1, 5)


def test_code_table_agrees_with_product_of_bits():
    bits = 3
    for c, row in zip(range(2**bits), all_codes(bits).tolist()):
        assert sum(int(b) << i for i, b in enumerate(row)) == c
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    probs = code_probabilities(logits)[0]
    for c, pattern in enumerate(itertools.product([0, 1], repeat=bits)):
        bit_values = pattern[::-1]  # itertools gives the most significant bit first
        expected = 1.0
        for b, logit in zip(bit_values, logits[0].tolist()):
            p = 1 / (1 + math.exp(-logit))
            expected *= p if b else 1 - p
        assert probs[c].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(bits=0), ValueError, "bits"),
        (dict(bits=2.0), TypeError, "bits"),
        (dict(bits=63), ValueError, "bits"),
        (dict(kl_loss_threshold="ln2"), TypeError, "kl_loss_threshold"),
        (dict(kl_loss_threshold=float("nan")), ValueError, "kl_loss_threshold"),
        (dict(deterministic_on_eval=1), TypeError, "deterministic_on_eval"),
    ],
)
def test_invalid_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        BinaryMapper(**kwargs)


def test_invalid_calls():
    bm = BinaryMapper(bits=3)
    with pytest.raises(ValueError, match="logits"):
        bm(torch.randn(2, 4))
    with pytest.raises(TypeError, match="logits"):
        bm(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        bm(torch.randn(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="indices"):
        bm.log_prob(torch.randn(2, 3))
    with pytest.raises(ValueError, match="indices"):
        bm.log_prob(torch.randn(2, 3), indices=torch.zeros(2, dtype=torch.long), one_hot=torch.zeros(2, 8))
