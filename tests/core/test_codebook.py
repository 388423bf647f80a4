"""Codebook state: EMA update against a hand-written formula, invalid rows, dead codes, k-means init."""

import pytest
import torch
from torch import nn

from vector_quantize_pytorch.core.codebook import Codebook, laplace_smoothed, valid_rows

DECAY, EPS = 0.6, 0.01


def hand_ema(cluster_size, embed_avg, rows, indices, decay=DECAY, eps=EPS, weight=None):
    """The EMA update of one codebook written out in Python floats.

    n_k <- n_k + (1 - decay) w_k (count_k - n_k); m_k likewise; e_k = m_k / laplace(n)_k
    """
    num_codes, d = len(cluster_size), len(embed_avg[0])
    weight = weight or [1.0] * num_codes
    counts = [0.0] * num_codes
    sums = [[0.0] * d for _ in range(num_codes)]
    for row, k in zip(rows, indices):
        counts[k] += 1
        sums[k] = [s + r for s, r in zip(sums[k], row)]
    n = [cluster_size[k] + (1 - decay) * weight[k] * (counts[k] - cluster_size[k]) for k in range(num_codes)]
    m = [
        [embed_avg[k][j] + (1 - decay) * weight[k] * (sums[k][j] - embed_avg[k][j]) for j in range(d)]
        for k in range(num_codes)
    ]
    total = sum(n)
    smoothed = [(n[k] + eps) / (total + num_codes * eps) * total for k in range(num_codes)]
    embed = [[m[k][j] / smoothed[k] for j in range(d)] for k in range(num_codes)]
    return n, m, embed


def small_codebook(**kwargs):
    cb = Codebook(2, 3, decay=DECAY, eps=EPS, **kwargs)
    cb.cluster_size.copy_(torch.tensor([[1.0, 2.0, 0.5]]))
    cb.embed_avg.copy_(torch.tensor([[[1.0, -1.0], [0.5, 2.0], [-3.0, 0.25]]]))
    return cb


ROWS = [[1.0, 2.0], [3.0, -1.0], [0.0, 0.5], [-2.0, 4.0]]
INDICES = [0, 0, 2, 2]  # code 1 receives no row


def assert_state(cb, n, m, embed):
    torch.testing.assert_close(cb.cluster_size[0], torch.tensor(n))
    torch.testing.assert_close(cb.embed_avg[0], torch.tensor(m))
    torch.testing.assert_close(cb.embed[0], torch.tensor(embed))


def test_laplace_smoothed_formula():
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    total, eps = 4.0, 0.5
    expected = torch.tensor([[(c + eps) / (total + 3 * eps) * total for c in (0.0, 1.0, 3.0)]])
    torch.testing.assert_close(laplace_smoothed(counts, eps), expected)


def test_ema_update_equals_hand_written_formula():
    cb = small_codebook()
    n, m, embed = hand_ema(cb.cluster_size[0].tolist(), cb.embed_avg[0].tolist(), ROWS, INDICES)
    flat, idx = torch.tensor([ROWS]), torch.tensor([INDICES])
    cb.update_(flat, idx, valid_rows(flat, None))
    assert_state(cb, n, m, embed)
    # a second step starts from the first step's state
    n2, m2, embed2 = hand_ema(n, m, ROWS[:2], [1, 2])
    cb.update_(flat[:, :2], torch.tensor([[1, 2]]), valid_rows(flat[:, :2], None))
    assert_state(cb, n2, m2, embed2)


def test_statistics_of_an_unused_code_reach_zero_instead_of_sticking_at_a_subnormal_number():
    """With decay 0.8 the product of the smallest subnormal float and 0.8 rounds back up to it: without the flush
    an unused code's count and sums would stay subnormal for good (slow CPU arithmetic on every later step)."""
    tiny = torch.finfo(torch.float32).tiny
    smallest = torch.tensor(1.4e-45)
    assert smallest > 0 and smallest * 0.8 == smallest  # the fixed point the flush avoids
    cb = Codebook(2, 3, decay=0.8, eps=EPS)
    cb.cluster_size.copy_(torch.tensor([[1.0, tiny * 1.1, 1.0]]))
    cb.embed_avg.copy_(torch.tensor([[[1.0, 1.0], [tiny * 1.1, -tiny * 1.1], [1.0, tiny * 1.1]]]))
    rows = torch.tensor([[[1.0, 2.0], [3.0, 1.0]]])
    cb.update_(rows, torch.tensor([[0, 0]]), valid_rows(rows, None))  # codes 1 and 2 unused
    assert cb.cluster_size[0, 1] == 0 and (cb.embed_avg[0, 1] == 0).all()  # 0.88 tiny: flushed
    assert cb.embed_avg[0, 2, 1] == 0  # one element of a code whose count is still normal
    torch.testing.assert_close(cb.cluster_size[0], torch.tensor([0.8 + 0.2 * 2, 0.0, 0.8]))
    torch.testing.assert_close(cb.embed_avg[0, 0], torch.tensor([0.8 + 0.2 * 4, 0.8 + 0.2 * 3]))
    assert cb.embed_avg[0, 2, 0] == torch.tensor(0.8)  # normal numbers take the plain EMA step


def test_masked_and_nan_rows_are_excluded_from_the_statistics():
    cb = small_codebook()
    n, m, embed = hand_ema(cb.cluster_size[0].tolist(), cb.embed_avg[0].tolist(), ROWS, INDICES)
    extra_nan = [float("nan"), 1.0]
    extra_masked = [100.0, 100.0]
    flat = torch.tensor([ROWS[:2] + [extra_nan] + ROWS[2:] + [extra_masked]])
    idx = torch.tensor([[0, 0, 1, 2, 2, 1]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    cb.update_(flat, idx, valid_rows(flat, mask))
    assert_state(cb, n, m, embed)


def test_batch_without_valid_rows_changes_nothing():
    cb = small_codebook()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    flat = torch.tensor([[[float("nan"), 0.0], [1.0, 1.0]]])
    cb.update_(flat, torch.tensor([[0, 1]]), valid_rows(flat, torch.tensor([[True, False]])))
    for k, v in cb.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_update_weight_tensor_and_callable():
    weight = [0.5, 1.0, 2.0]
    expected = hand_ema([1.0, 2.0, 0.5], [[1.0, -1.0], [0.5, 2.0], [-3.0, 0.25]], ROWS, INDICES, weight=weight)
    flat, idx = torch.tensor([ROWS]), torch.tensor([INDICES])
    for given in (torch.tensor(weight), lambda embed_sum, cluster_size: torch.tensor(weight)):
        cb = small_codebook()
        cb.update_(flat, idx, valid_rows(flat, None), weight=given)
        assert_state(cb, *expected)
    with pytest.raises(ValueError, match="ema_update_weight"):
        small_codebook().update_(flat, idx, valid_rows(flat, None), weight=torch.ones(4))


def test_accumulated_statistics_then_update_equal_one_update_on_both_batches():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 5, 2, generator=gen), torch.randn(1, 4, 2, generator=gen)
    ia, ib = torch.randint(0, 3, (1, 5), generator=gen), torch.randint(0, 3, (1, 4), generator=gen)
    accumulated, single = small_codebook(), small_codebook()
    embed_before = accumulated.embed.clone()
    accumulated.update_(a, ia, valid_rows(a, None), accumulate=True)
    assert torch.equal(accumulated.embed, embed_before)  # accumulating does not move the codes
    accumulated.update_(b, ib, valid_rows(b, None))
    both = torch.cat([a, b], dim=1)
    single.update_(both, torch.cat([ia, ib], dim=1), valid_rows(both, None))
    for name in ("cluster_size", "embed_avg", "embed"):
        torch.testing.assert_close(getattr(accumulated, name), getattr(single, name))
    assert (accumulated.accum_cluster_size == 0).all()


def test_manual_ema_update_tracks_but_waits_for_update_ema():
    cb = small_codebook(manual_ema_update=True)
    embed_before = cb.embed.clone()
    n, m, embed = hand_ema(cb.cluster_size[0].tolist(), cb.embed_avg[0].tolist(), ROWS, INDICES)
    flat = torch.tensor([ROWS])
    cb.update_(flat, torch.tensor([INDICES]), valid_rows(flat, None))
    assert torch.equal(cb.embed, embed_before)
    torch.testing.assert_close(cb.cluster_size[0], torch.tensor(n))
    cb.update_ema()
    assert_state(cb, n, m, embed)


def test_learnable_codebook_under_ema_keeps_its_gradient_steps():
    cb = small_codebook(learnable_codebook=True)
    assert isinstance(cb.embed, nn.Parameter)
    target_before = cb._ema_codes().clone()
    step = torch.tensor([[[0.1, 0.0], [0.0, -0.2], [0.3, 0.3]]])
    cb.embed.data.copy_(target_before + step)  # as if an optimiser had moved the codes
    flat = torch.tensor([ROWS])
    cb.update_(flat, torch.tensor([INDICES]), valid_rows(flat, None))
    torch.testing.assert_close(cb.embed.data, cb._ema_codes() + step)


def test_cosine_codebook_codes_stay_unit():
    cb = small_codebook(use_cosine_sim=True)
    flat = torch.nn.functional.normalize(torch.tensor([ROWS]), dim=-1)
    cb.update_(flat, torch.tensor([INDICES]), valid_rows(flat, None))
    torch.testing.assert_close(cb.embed.norm(dim=-1), torch.ones(1, 3))


def dead_code_codebook(counts, dim=3, threshold=1.0):
    cb = Codebook(dim, len(counts), threshold_ema_dead_code=threshold)
    cb.cluster_size.copy_(torch.tensor([counts]))
    return cb


def assert_only_dead_codes_replaced(cb, before, flat, dead, threshold):
    rows = [flat[0, i] for i in range(flat.shape[1])]
    used_rows = []
    for k in range(cb.codebook_size):
        if k in dead:
            matches = [i for i, r in enumerate(rows) if torch.equal(cb.embed[0, k], r)]
            assert matches, f"code {k} was not replaced by a batch row"
            used_rows.append(matches[0])
            assert cb.cluster_size[0, k] == threshold
            torch.testing.assert_close(cb.embed_avg[0, k], cb.embed[0, k] * threshold)
        else:
            for name in ("embed", "embed_avg", "cluster_size"):
                assert torch.equal(getattr(cb, name)[0, k], before[name][0, k]), (name, k)
    assert len(set(used_rows)) == len(used_rows), "dead codes must get distinct rows"


def test_expired_codes_are_replaced_by_batch_rows_and_only_they_change():
    cb = dead_code_codebook([2.0, 0.5, 3.0, 0.1, 5.0, 0.9])
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    flat = torch.randn(1, 10, 3, generator=torch.Generator().manual_seed(0))
    cb.expire_codes_(flat)
    assert_only_dead_codes_replaced(cb, before, flat, dead={1, 3, 5}, threshold=1.0)


def test_a_count_exactly_at_the_threshold_is_alive():
    """Expiry is ``cluster_size < threshold``: a count equal to the threshold survives, one ulp below expires."""
    below = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    above = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()
    cb = dead_code_codebook([1.0, below, above, 1.0, 0.0], threshold=1.0)
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    flat = torch.randn(1, 10, 3, generator=torch.Generator().manual_seed(3))
    cb.expire_codes_(flat)
    assert_only_dead_codes_replaced(cb, before, flat, dead={1, 4}, threshold=1.0)


def test_cosine_codebook_replaces_dead_codes_by_unit_rows():
    """Codes of a cosine codebook live on the unit sphere: a dead code becomes a batch row's direction, even
    when the caller passes rows that are not normalised."""
    cb = Codebook(3, 4, threshold_ema_dead_code=1.0, use_cosine_sim=True)
    cb.cluster_size.copy_(torch.tensor([[0.0, 5.0, 0.0, 5.0]]))
    flat = 4 * torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(7))
    kept = cb.embed[0, [1, 3]].clone()
    cb.expire_codes_(flat)
    directions = torch.nn.functional.normalize(flat[0], dim=-1)
    for k in (0, 2):
        assert min((cb.embed[0, k] - row).abs().max() for row in directions) < 1e-6, k
    assert torch.equal(cb.embed[0, [1, 3]], kept)


def test_more_dead_codes_than_rows_uses_distinct_rows():
    cb = dead_code_codebook([0.0] * 8, threshold=2.0)
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    flat = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(1))
    cb.expire_codes_(flat)
    replaced = [k for k in range(8) if not torch.equal(cb.embed[0, k], before["embed"][0, k])]
    assert len(replaced) == 3
    assert_only_dead_codes_replaced(cb, before, flat, dead=set(replaced), threshold=2.0)
    assert {tuple(cb.embed[0, k].tolist()) for k in replaced} == {tuple(r.tolist()) for r in flat[0]}
    # the codes not replaced now are still dead and wait for a later batch
    assert (cb.cluster_size[0] < 2.0).sum() == 5


def test_expiry_never_uses_invalid_rows():
    cb = dead_code_codebook([0.0] * 4)
    flat = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(2))
    flat[0, 1] = float("nan")
    valid = valid_rows(flat, torch.tensor([[True, True, False, True, True, False]]))
    cb.expire_codes_(flat, valid)
    allowed = [flat[0, i] for i in (0, 3, 4)]
    replaced = 0
    for k in range(4):
        if cb.cluster_size[0, k] == 1.0:
            replaced += 1
            assert any(torch.equal(cb.embed[0, k], r) for r in allowed)
    assert replaced == 3 and torch.isfinite(cb.embed).all()


def test_update_expires_after_the_ema_step():
    cb = Codebook(2, 3, decay=DECAY, eps=EPS, threshold_ema_dead_code=0.4)
    cb.cluster_size.copy_(torch.tensor([[1.0, 0.5, 1.0]]))
    flat = torch.tensor([ROWS])
    cb.update_(flat, torch.tensor([INDICES]), valid_rows(flat, None))
    # code 1 got no rows: 0.6 * 0.5 = 0.3 < 0.4, so it is replaced by a batch row and reset to 0.4
    assert cb.cluster_size[0, 1] == pytest.approx(0.4)
    assert any(torch.equal(cb.embed[0, 1], flat[0, i]) for i in range(4))


def test_kmeans_init_on_first_batch():
    cb = Codebook(2, 3, kmeans_init=True, kmeans_iters=5)
    assert not cb.initted and (cb.embed == 0).all() and cb.needs_kmeans_init()
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    flat = (centers.repeat(8, 1) + 0.1 * torch.randn(24, 2, generator=gen)).unsqueeze(0)
    torch.manual_seed(0)
    cb.kmeans_init_(flat, valid_rows(flat, None))
    assert cb.initted and not cb.needs_kmeans_init()
    assert cb.cluster_size.sum() == 24
    # k-means has converged on these separated blobs: every code is the mean of the rows nearest to it,
    # and its count is their number (Laplace smoothing of integer counts changes the mean by < 1e-5)
    nearest = torch.cdist(flat[0], cb.embed[0]).argmin(-1)
    for k in range(3):
        rows = flat[0, nearest == k]
        assert cb.cluster_size[0, k] == len(rows)
        if len(rows):
            torch.testing.assert_close(cb.embed[0, k], rows.mean(0), atol=1e-4, rtol=1e-4)


def test_kmeans_init_without_valid_rows_does_nothing():
    cb = Codebook(2, 3, kmeans_init=True)
    flat = torch.full((1, 4, 2), float("nan"))
    cb.kmeans_init_(flat, valid_rows(flat, None))
    assert not cb.initted and (cb.embed == 0).all() and cb.needs_kmeans_init()
