"""Auxiliary losses against independent computations; masked positions never contribute."""

import math

import pytest
import torch

from vector_quantize_pytorch.core import losses


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 6.0]])
    valid = torch.tensor([[True, True, False], [True, False, True]])
    assert losses.masked_mean(values, valid) == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert losses.masked_mean(values, None) == pytest.approx(values.mean().item())
    assert losses.masked_mean(values, torch.zeros_like(valid)) == 0


def test_commitment_loss_with_mask_equals_loss_on_valid_rows_only():
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(2, 6, 3, generator=gen), torch.randn(2, 6, 3, generator=gen)
    valid = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    x_masked = torch.where(valid.unsqueeze(-1), x, torch.full_like(x, float("nan")))  # masked rows may be NaN
    expected = ((x[valid] - q[valid]) ** 2).mean()
    torch.testing.assert_close(losses.commitment_loss(x_masked, q, valid), expected)
    torch.testing.assert_close(losses.commitment_loss(x, q), ((x - q) ** 2).mean())


def test_commitment_loss_masked_rows_get_no_gradient():
    x = torch.randn(1, 4, 3, requires_grad=True)
    q = torch.randn(1, 4, 3)
    valid = torch.tensor([[True, False, True, False]])
    losses.commitment_loss(x, q, valid).backward()
    assert (x.grad[0, 1] == 0).all() and (x.grad[0, 3] == 0).all() and (x.grad[0, 0] != 0).any()


def test_cross_entropy_to_codes_ignores_minus_one():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=gen)
    target = torch.tensor([[0, -1, 4, 2], [-1, 1, 1, 3]])
    terms = [-logits[c, i].log_softmax(-1)[target[c, i]] for c in range(2) for i in range(4) if target[c, i] >= 0]
    torch.testing.assert_close(losses.cross_entropy_to_codes(logits, target), torch.stack(terms).mean())


def test_entropy():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert losses.clamped_entropy(p).item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def independent_diversity(logits, temperature, valid=None):
    """-entropy of the code distribution averaged over all valid tokens, mean over codebooks, in float64."""
    total = 0.0
    c, n, k = logits.shape
    for ci in range(c):
        rows = [i for i in range(n) if valid is None or valid[ci, i]]
        avg = sum((logits[ci, i].double() * temperature).softmax(-1) for i in rows) / len(rows)
        total = total + (avg * avg.clamp(min=1e-5).log()).sum()  # minus the entropy
    return total / c


@pytest.mark.parametrize("masked", [False, True])
def test_codebook_diversity_loss_averages_over_all_tokens(masked):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 5, generator=gen)
    valid = torch.rand(2, 7, generator=gen) > 0.4 if masked else None
    got = losses.codebook_diversity_loss(logits, 0.7, valid)
    torch.testing.assert_close(got.double(), independent_diversity(logits, 0.7, valid))


def test_codebook_diversity_loss_is_lowest_for_uniform_usage():
    # every token certain of a different code: average distribution uniform -> loss = -log K
    logits = torch.eye(4).unsqueeze(0) * 50
    assert losses.codebook_diversity_loss(logits, 1.0).item() == pytest.approx(-math.log(4), abs=1e-4)
    # every token on the same code: entropy 0
    same = torch.zeros(1, 4, 4)
    same[..., 0] = 50
    assert losses.codebook_diversity_loss(same, 1.0).item() == pytest.approx(0.0, abs=1e-4)


def independent_orthogonal(codes):
    """sum_ij cos(e_i, e_j)^2 / (h n^2) - 1 / n, with explicit loops."""
    h, n, _ = codes.shape
    total = 0.0
    for c in range(h):
        for i in range(n):
            for j in range(n):
                cos = torch.nn.functional.cosine_similarity(codes[c, i], codes[c, j], dim=0).item()
                total += cos**2
    return total / (h * n * n) - 1.0 / n


def test_orthogonal_loss_equals_formula():
    codes = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(3))
    assert losses.orthogonal_loss(codes).item() == pytest.approx(independent_orthogonal(codes), rel=1e-5)


def test_orthogonal_loss_is_zero_for_orthogonal_codes():
    assert losses.orthogonal_loss(torch.eye(4).unsqueeze(0) * 3).item() == pytest.approx(0.0, abs=1e-6)


def test_orthogonal_loss_on_used_codes_equals_loss_on_that_subset():
    codes = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(4))
    used = torch.tensor([[True, False, True, True, False, False]])
    expected = independent_orthogonal(codes[:, used[0]])
    assert losses.orthogonal_loss(codes, used).item() == pytest.approx(expected, rel=1e-5)


def test_cross_entropy_to_codes_ignores_minus_one_and_is_zero_when_every_target_is_ignored():
    logits = torch.randn(1, 4, 3)
    targets = torch.tensor([[0, -1, 2, -1]])
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([0, 2]))
    torch.testing.assert_close(losses.cross_entropy_to_codes(logits, targets), expected)
    assert losses.cross_entropy_to_codes(logits, torch.full((1, 4), -1)).item() == 0
