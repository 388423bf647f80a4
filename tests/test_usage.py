"""CodebookUsage: exact histograms and reports checked against hand-computed numbers, the hashed estimate
for huge vocabularies against the truth, and the indices of every quantizer family."""

from __future__ import annotations

import math

import pytest
import torch

import vector_quantize_pytorch as vqp
from vector_quantize_pytorch import CodebookUsage


def test_one_codebook_by_hand():
    usage = CodebookUsage(codebook_size=4)
    usage.update(torch.tensor([[0, 0, 1], [-1, 0, 2]]))  # -1 is not counted
    usage.update(torch.tensor([3, 3]))
    assert usage.counts().tolist() == [[3, 1, 1, 2]]
    report = usage.report()
    p = [3 / 7, 1 / 7, 1 / 7, 2 / 7]
    entropy = -sum(q * math.log2(q) for q in p)
    assert report == pytest.approx(
        {"usage": 1.0, "perplexity": 2**entropy, "entropy_bits": entropy, "dead_codes": 0, "tokens": 7}, abs=1e-12
    )
    assert isinstance(report["dead_codes"], int) and isinstance(report["tokens"], int)


def test_uniform_and_single_code():
    usage = CodebookUsage(8)
    usage.update(torch.arange(8).repeat(3))
    assert usage.report() == pytest.approx(
        {"usage": 1.0, "perplexity": 8.0, "entropy_bits": 3.0, "dead_codes": 0, "tokens": 24}
    )
    usage.reset()
    usage.update(torch.full((5,), 6))
    assert usage.report() == pytest.approx(
        {"usage": 1 / 8, "perplexity": 1.0, "entropy_bits": 0.0, "dead_codes": 7, "tokens": 5}
    )


def test_empty_meter_reports_every_code_dead():
    report = CodebookUsage(16, codebooks=2).report()
    assert report["usage"] == 0 and report["dead_codes"] == 32 and report["tokens"] == 0
    assert report["perplexity"] == 1.0 and report["entropy_bits"] == 0.0


def test_residual_layers_with_dropped_layers_and_mask():
    """(b, n, q) indices: one histogram per layer; -1 (a dropped layer) and masked tokens are not counted."""
    indices = torch.tensor(
        [
            [[0, 1, -1], [2, 1, -1], [2, 0, 3]],
            [[1, 1, 1], [3, 3, 3], [0, 0, 0]],
        ]
    )  # (b=2, n=3, q=3)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    usage = CodebookUsage(4, codebooks=3)
    usage.update(indices, mask=mask)
    expected = torch.tensor(
        [
            [2, 1, 2, 0],  # layer 0: 0, 2, 2, 1, 0
            [2, 3, 0, 0],  # layer 1: 1, 1, 0, 1, 0
            [1, 1, 0, 1],  # layer 2: 3, 1, 0 (two dropped)
        ]
    )
    assert torch.equal(usage.counts(), expected)
    report = usage.report()
    assert report["usage/0"] == 0.75 and report["usage/1"] == 0.5 and report["usage/2"] == 0.75
    assert report["dead_codes"] == 1 + 2 + 1 and report["dead_codes/1"] == 2
    assert report["tokens"] == 13 and report["tokens/2"] == 3
    assert report["usage"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    assert report["perplexity/2"] == pytest.approx(3.0)
    h1 = -(2 / 5 * math.log2(2 / 5) + 3 / 5 * math.log2(3 / 5))
    assert report["entropy_bits/1"] == pytest.approx(h1)
    assert report["entropy_bits"] == pytest.approx((report["entropy_bits/0"] + h1 + math.log2(3)) / 3)


def test_per_layer_codebook_sizes_count_out_of_range_indices_nowhere():
    usage = CodebookUsage((4, 2), codebooks=2)
    usage.update(torch.tensor([[3, 1], [1, 3], [0, 0]]))  # layer 1 has 2 codes: its 3 is not counted
    assert usage.counts().tolist() == [[1, 1, 0, 1], [1, 1, 0, 0]]
    report = usage.report()
    assert report["usage/0"] == 0.75 and report["usage/1"] == 1.0 and report["dead_codes"] == 1


def test_grouped_axes_and_heads():
    """GroupedResidualVQ's (groups, b, n, q): codebook axes (0, -1), one histogram per (group, layer)."""
    indices = torch.tensor([[[[0, 1]], [[0, 2]]], [[[3, 3]], [[1, 3]]]])  # (g=2, b=2, n=1, q=2)
    usage = CodebookUsage(4, codebooks=(2, 2), codebook_axes=(0, -1))
    usage.update(indices, mask=torch.tensor([[True], [False]]))  # (b, n): the second sample is masked
    assert usage.counts().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]
    report = usage.report()
    assert set(k for k in report if k.startswith("usage/")) == {"usage/0.0", "usage/0.1", "usage/1.0", "usage/1.1"}


def test_wrong_shapes_and_types_are_refused():
    usage = CodebookUsage(4, codebooks=3)
    with pytest.raises(ValueError, match="codebooks"):
        usage.update(torch.zeros(2, 5, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        usage.update(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="broadcast"):
        CodebookUsage((4, 4), codebooks=3)
    with pytest.raises(ValueError, match="codebook_axes"):
        CodebookUsage(4, codebooks=(2, 2), codebook_axes=(0,))


def test_memory_is_bounded_by_the_codebook_sizes():
    usage = CodebookUsage(16, codebooks=2)
    for _ in range(50):
        usage.update(torch.randint(0, 16, (64, 2)))
    assert usage.histogram.shape == (2, 17) and usage.report()["tokens"] == 50 * 64 * 2
    huge = CodebookUsage(2**40, codebooks=2, max_bins=2**10)
    assert huge.estimated and huge.histogram.shape == (2, 2**10 + 1)


@pytest.mark.parametrize("distinct", [300, 2**10, 4 * 2**10])
def test_hashed_estimate_for_huge_vocabularies(distinct):
    """Above max_bins the codes are hashed: the linear-counting estimate of the codes used is within a few
    standard errors of the truth, and the entropy is a lower bound within log2(1 + (n - 1) / m) bits."""
    m, vocab = 2**10, 2**36
    codes = torch.randperm(2**20, generator=torch.Generator().manual_seed(0))[:distinct] * (vocab // 2**20) + 7
    indices = codes.repeat(3)
    usage = CodebookUsage(vocab, max_bins=m)
    usage.update(indices)
    report = usage.report()
    t = distinct / m
    relative_error = math.sqrt(math.exp(t) - t - 1) / (t * math.sqrt(m))
    used = report["usage"] * vocab
    assert abs(used - distinct) <= 4 * relative_error * distinct + 1
    assert report["dead_codes"] == pytest.approx(vocab - used)
    true_entropy = math.log2(distinct)
    assert true_entropy - math.log2(1 + (distinct - 1) / m) - 0.05 <= report["entropy_bits"] <= true_entropy + 1e-9
    assert report["tokens"] == 3 * distinct


def test_exact_below_max_bins():
    """A vocabulary of exactly max_bins codes is still counted exactly."""
    usage = CodebookUsage(2**10, max_bins=2**10)
    assert not usage.estimated
    usage.update(torch.tensor([0, 1023, 1023]))
    assert usage.report()["dead_codes"] == 2**10 - 2


def _index_outputs(out):
    items = out if isinstance(out, tuple) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()][0]


@pytest.mark.parametrize(
    "make, meter",
    [
        (lambda: vqp.VectorQuantize(dim=8, codebook_size=16), lambda: CodebookUsage(16)),
        (
            lambda: vqp.VectorQuantize(dim=8, codebook_size=16, heads=2, separate_codebook_per_head=True),
            lambda: CodebookUsage(16, codebooks=2),
        ),
        (
            lambda: vqp.ResidualVQ(dim=8, num_quantizers=3, codebook_size=(16, 8, 4), quantize_dropout=True),
            lambda: CodebookUsage((16, 8, 4), codebooks=3),
        ),
        (
            lambda: vqp.GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=16),
            lambda: CodebookUsage(16, codebooks=(2, 2), codebook_axes=(0, -1)),
        ),
        (lambda: vqp.FSQ(levels=[8, 5, 5], dim=8, num_codebooks=2), lambda: CodebookUsage(200, codebooks=2)),
        (lambda: vqp.LFQ(dim=8, codebook_size=16, num_codebooks=2), lambda: CodebookUsage(16, codebooks=2)),
        (lambda: vqp.LatentQuantize(dim=8, levels=[5, 5]), lambda: CodebookUsage(25)),
        (lambda: vqp.SimVQ(dim=8, codebook_size=16), lambda: CodebookUsage(16)),
    ],
)
def test_every_family_s_indices_fit_the_meter(make, meter):
    torch.manual_seed(0)
    quantizer, usage = make(), meter()
    x = torch.randn(3, 10, 8)
    indices = _index_outputs(quantizer(x))
    usage.update(indices)
    report = usage.report()
    assert 0 < report["usage"] <= 1 and report["tokens"] == int((indices >= 0).sum())
