"""core/distributed.py and the row sampling built on it, in a single process (the multi-process behaviour is
tested in test_distributed_training.py)."""

from __future__ import annotations

import torch

from vector_quantize_pytorch.core import distributed
from vector_quantize_pytorch.core.kmeans import kmeans, random_valid_rows, sample_rows


def seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def test_not_distributed_without_a_process_group():
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert not distributed.should_sync(None) and not distributed.should_sync(True)


def test_single_process_collectives_return_their_input():
    t = torch.randn(3, 4, requires_grad=True)
    assert distributed.all_reduce_sum_(t) is t
    assert distributed.broadcast_(t) is t
    assert distributed.all_gather_cat(t) is t
    assert distributed.all_reduce_sum(t) is t
    assert distributed.mean_over_ranks(t, torch.tensor(5)) is t


def test_shared_seed_tensor_is_a_draw_of_the_default_generator():
    torch.manual_seed(3)
    first = distributed.shared_seed_tensor("cpu")
    torch.manual_seed(3)
    assert first.shape == () and first.dtype == torch.int64
    assert torch.equal(distributed.shared_seed_tensor("cpu"), first)
    assert distributed.shared_seed(7) == 7
    torch.manual_seed(3)
    assert distributed.shared_seed() == int(first)  # the host int is the same draw


def test_row_keys_are_distinct_deterministic_and_differ_by_seed_and_codebook():
    keys = distributed.random_row_keys(seed(1), 1000, 2)
    assert keys.shape == (2, 1000) and keys.dtype == torch.int64
    assert (keys >= 0).all() and (keys < distributed.INVALID_KEY).all()
    assert keys[0].unique().numel() == 1000
    assert torch.equal(keys & 0xFFFFFFFF, torch.arange(1000).expand(2, -1))  # low bits: the row's position
    assert torch.equal(distributed.random_row_keys(seed(1), 1000, 2), keys)
    assert not torch.equal(keys[0].argsort(), keys[1].argsort())
    assert not torch.equal(distributed.random_row_keys(seed(2), 1000, 1)[0].argsort(), keys[0].argsort())


def test_row_keys_choose_rows_uniformly():
    """Over 4000 seeds the smallest of 8 keys falls on each row about 500 times (deterministic seeds)."""
    winners = torch.stack([distributed.random_row_keys(seed(s), 8, 1)[0].argmin() for s in range(4000)])
    counts = torch.bincount(winners, minlength=8).float()
    chi_square = ((counts - 500) ** 2 / 500).sum()
    assert chi_square < 30, counts  # 7 degrees of freedom: p < 1e-4 for a uniform choice


def test_a_row_of_a_larger_batch_keeps_its_key():
    """Keys depend on the position only: the first rows of a longer batch get the same keys."""
    assert torch.equal(distributed.random_row_keys(seed(5), 6, 1), distributed.random_row_keys(seed(5), 10, 1)[:, :6])


def test_select_by_key_takes_the_smallest_keys_in_order_and_pads():
    keys = torch.tensor([[5, 3, distributed.INVALID_KEY, 1]])
    rows = torch.arange(4.0).view(1, 4, 1)
    chosen, chosen_keys, real = distributed.select_by_key(keys, rows, 6)
    assert chosen[0, :, 0].tolist() == [3.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert chosen_keys[0, :3].tolist() == [1, 3, 5]
    assert real[0].tolist() == [True, True, True, False, False, False]


def test_random_valid_rows_are_distinct_valid_rows():
    samples = torch.arange(20.0).view(1, 20, 1)
    valid = (torch.arange(20) % 3 != 0).unsqueeze(0)  # 13 valid rows
    rows, num_valid = random_valid_rows(samples, valid, 8, seed(0))
    picked = rows[0, :, 0].tolist()
    assert num_valid.tolist() == [[8]] and len(set(picked)) == 8
    assert all(int(p) % 3 != 0 for p in picked)
    rows, num_valid = random_valid_rows(samples, valid, 16, seed(0))
    assert num_valid.tolist() == [[13]] and (rows[0, 13:] == 0).all()
    assert set(rows[0, :13, 0].tolist()) == {float(i) for i in range(20) if i % 3}


def test_random_valid_rows_with_no_rows_at_all():
    rows, num_valid = random_valid_rows(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.bool), 4, seed(0))
    assert rows.shape == (2, 4, 3) and (rows == 0).all() and num_valid.tolist() == [[0], [0]]


def test_sample_rows_repeat_in_order_when_there_are_too_few():
    samples = torch.arange(5.0).view(1, 5, 1)
    valid = torch.tensor([[True, False, True, True, False]])
    picked = sample_rows(samples, valid, 7, seed(4))[0, :, 0].tolist()
    assert sorted(picked[:3]) == [0.0, 2.0, 3.0] and picked[3:6] == picked[:3] and picked[6] == picked[0]


def test_kmeans_on_an_empty_batch_keeps_zero_means():
    means, counts = kmeans(torch.zeros(1, 0, 3), 4, num_iters=2)
    assert means.shape == (1, 4, 3) and (means == 0).all() and (counts == 0).all()


def test_kmeans_seed_fixes_the_result():
    samples = torch.randn(1, 50, 2)
    first, _ = kmeans(samples, 4, num_iters=2, seed=seed(9))
    second, _ = kmeans(samples, 4, num_iters=2, seed=seed(9))
    assert torch.equal(first, second)
