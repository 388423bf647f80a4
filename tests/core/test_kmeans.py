"""k-means, cluster statistics and random row sampling."""

import torch
import torch.nn.functional as F

from vector_quantize_pytorch.core.kmeans import cluster_statistics, kmeans, sample_rows, shuffled_valid_rows
from vector_quantize_pytorch.core.search import nearest_codes


def blobs(c=2, per_cluster=20, centers=4, d=3, seed=0):
    """Well separated Gaussian blobs, rows shuffled."""
    gen = torch.Generator().manual_seed(seed)
    mids = torch.randn(c, centers, d, generator=gen) * 10
    rows = mids.repeat_interleave(per_cluster, dim=1) + 0.3 * torch.randn(c, centers * per_cluster, d, generator=gen)
    return rows[:, torch.randperm(rows.shape[1], generator=gen)]


def distortion(samples, means, valid=None):
    assign = nearest_codes(samples, means)
    err = (samples - torch.gather(means, 1, assign.unsqueeze(-1).expand_as(samples))).pow(2).sum(-1)
    return err.mean() if valid is None else err[valid].mean()


def test_kmeans_lowers_distortion_below_random_initialisation():
    samples = blobs()
    torch.manual_seed(0)
    initial, _ = kmeans(samples, 6, num_iters=0)  # the random initial means
    torch.manual_seed(0)
    means, counts = kmeans(samples, 6, num_iters=10)
    assert distortion(samples, means) < 0.9 * distortion(samples, initial)
    assert torch.equal(counts.sum(-1), torch.full((2,), 80.0))


def test_kmeans_converges_to_cluster_means():
    samples = blobs(c=1, per_cluster=15, centers=3)
    torch.manual_seed(3)
    means, counts = kmeans(samples, 3, num_iters=20)
    assign = nearest_codes(samples, means)
    for k in range(3):
        rows = samples[0, assign[0] == k]
        if len(rows):
            torch.testing.assert_close(means[0, k], rows.mean(0))
            assert counts[0, k] == len(rows)


def test_kmeans_ignores_invalid_rows():
    samples = blobs(c=2, per_cluster=10, centers=3)
    valid = torch.rand(samples.shape[:2], generator=torch.Generator().manual_seed(1)) > 0.3
    junk_a = torch.where(valid.unsqueeze(-1), samples, torch.full_like(samples, 1e6))
    junk_b = torch.where(valid.unsqueeze(-1), samples, torch.full_like(samples, float("nan")))
    torch.manual_seed(5)
    means_a, counts_a = kmeans(junk_a, 4, num_iters=5, valid=valid)
    torch.manual_seed(5)
    means_b, counts_b = kmeans(junk_b, 4, num_iters=5, valid=valid)
    assert torch.isfinite(means_a).all()
    assert means_a.abs().max() < 100  # no mean was pulled to the junk rows
    assert torch.equal(means_a, means_b) and torch.equal(counts_a, counts_b)
    assert torch.equal(counts_a.sum(-1), valid.sum(-1).float())


def test_kmeans_empty_cluster_keeps_its_mean():
    # 3 valid rows for 5 clusters: initial means repeat rows, and the repeated ones never win a row
    samples = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [99.0, 99.0]]])
    valid = torch.tensor([[True, True, True, False]])
    torch.manual_seed(0)
    means, counts = kmeans(samples, 5, num_iters=3, valid=valid)
    assert (counts == 0).sum() == 2 and counts.sum() == 3
    for k in range(5):
        # every mean, empty or not, is still one of the valid rows (never 0/0, never zeroed)
        assert any(torch.equal(means[0, k], samples[0, i]) for i in range(3))


def test_kmeans_cosine_returns_unit_means():
    samples = F.normalize(blobs(c=1), dim=-1)
    torch.manual_seed(0)
    means, _ = kmeans(samples, 4, num_iters=4, cosine=True)
    torch.testing.assert_close(means.norm(dim=-1), torch.ones(1, 4))


def test_cluster_statistics_equal_one_hot_computation():
    gen = torch.Generator().manual_seed(2)
    samples = torch.randn(2, 9, 3, generator=gen)
    assign = torch.randint(0, 4, (2, 9), generator=gen)
    weights = torch.rand(2, 9, generator=gen)
    counts, sums = cluster_statistics(samples, assign, weights, 4)
    one_hot = F.one_hot(assign, 4).float() * weights.unsqueeze(-1)  # (c, N, K)
    torch.testing.assert_close(counts, one_hot.sum(1))
    torch.testing.assert_close(sums, torch.einsum("cnk,cnd->ckd", one_hot, samples))


def test_shuffled_valid_rows_puts_valid_rows_first():
    valid = torch.tensor([[False, True, True, False, True], [False] * 5])
    order, num_valid = shuffled_valid_rows(valid)
    assert num_valid.tolist() == [[3], [0]]
    assert sorted(order[0, :3].tolist()) == [1, 2, 4]
    assert sorted(order[1].tolist()) == [0, 1, 2, 3, 4]


def test_sample_rows_distinct_when_enough_and_only_valid():
    samples = torch.arange(10.0).view(1, 10, 1)
    valid = torch.tensor([[i % 3 != 0 for i in range(10)]])  # rows 1, 2, 4, 5, 7, 8
    picked = sample_rows(samples, valid, 4)[0, :, 0].tolist()
    assert len(set(picked)) == 4 and set(picked) <= {1.0, 2.0, 4.0, 5.0, 7.0, 8.0}
    # more requested than valid rows: every valid row is used, then they repeat
    picked = sample_rows(samples, valid, 9)[0, :, 0].tolist()
    assert set(picked) == {1.0, 2.0, 4.0, 5.0, 7.0, 8.0}


def test_an_empty_cluster_keeps_its_mean():
    """Every row is the same vector: every sampled mean is it, ties go to the first mean, so the others get no
    row and must keep their mean (a zero sum over a clamped count of 1 would make them zero)."""
    v = torch.tensor([1.5, -2.0, 0.5])
    samples = v.expand(1, 5, 3).clone()
    means, counts = kmeans(samples, 3, num_iters=2)
    assert torch.equal(means, v.expand(1, 3, 3))
    assert counts.tolist() == [[5.0, 0.0, 0.0]]
