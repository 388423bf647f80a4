"""Code search: chunked nearest / top-k / sampled codes equal brute force over the whole score matrix."""

import pytest
import torch

from vector_quantize_pytorch.core import search
from vector_quantize_pytorch.core.policy import CPU_POLICY
from vector_quantize_pytorch.core.search import (
    chunk_sizes,
    distance_logits,
    first_max,
    gather_codes,
    nearest_codes,
    sample_codes,
    topk_codes,
)

# budgets: 8 forces one code per chunk and 8-token chunks; 64 / 600 force token chunking with all codes;
# None is the default budget (one chunk)
BUDGETS = [8, 20, 64, 600, None]


def brute_force_nearest(x, codes):
    """Lowest-index argmin of exact Euclidean distances, one codebook at a time."""
    dist = torch.stack(
        [torch.cdist(x[i], codes[i], compute_mode="donot_use_mm_for_euclid_dist") for i in range(x.shape[0])]
    )
    return dist.argmin(-1)


def random_problem(c=2, n=53, k=11, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, n, d, generator=g, dtype=dtype), torch.randn(c, k, d, generator=g, dtype=dtype)


def tied_problem(seed=0):
    """Small integer vectors and duplicated codes: many exact ties, which must go to the lowest index."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (2, 61, 3), generator=g).float()
    codes = torch.randint(-1, 2, (2, 6, 3), generator=g).float()
    codes = torch.cat([codes, codes.flip(1), codes[:, :3]], dim=1)  # every code appears at least twice
    return x, codes


@pytest.mark.parametrize("max_scores", BUDGETS)
def test_nearest_equals_brute_force_on_random_data(max_scores):
    x, codes = random_problem()
    assert torch.equal(nearest_codes(x, codes, max_scores=max_scores), brute_force_nearest(x, codes))


@pytest.mark.parametrize("max_scores", BUDGETS)
def test_nearest_equals_brute_force_on_ties_lowest_index_wins(max_scores):
    x, codes = tied_problem()
    got = nearest_codes(x, codes, max_scores=max_scores)
    expected = brute_force_nearest(x, codes)
    assert torch.equal(got, expected)
    # the duplicated second half of the codebook is never chosen
    assert (got < 6).all()


def test_chunk_budgets_used_above_chunk_as_intended():
    # 8 and 20: both tokens and codes chunked; 64 / 600: codes only; default: one chunk
    assert chunk_sizes(53, 11, 8) == (8, 1)
    assert chunk_sizes(53, 11, 20) == (18, 1)  # three equal chunks rather than 20 + 20 + 13
    assert chunk_sizes(53, 11, 64) == (53, 1)
    assert chunk_sizes(53, 11, 600) == (53, 2)
    assert chunk_sizes(53, 11, CPU_POLICY.search_scores) == (53, 11)


def test_nearest_with_token_chunks_and_all_codes_per_chunk():
    x, codes = random_problem(c=1, n=600, k=3, d=2, seed=7)
    assert chunk_sizes(600, 3, 768) == (200, 3)
    assert torch.equal(nearest_codes(x, codes, max_scores=768), brute_force_nearest(x, codes))


@pytest.mark.parametrize(
    "num_tokens,num_codes,max_scores", [(1, 1, 1), (1000, 3, 64), (7, 10**6, 2**10), (5, 5, 10**9)]
)
def test_chunk_sizes_are_positive_and_within_budget(num_tokens, num_codes, max_scores):
    token_chunk, code_chunk = chunk_sizes(num_tokens, num_codes, max_scores)
    assert 1 <= token_chunk <= num_tokens and 1 <= code_chunk <= num_codes
    assert token_chunk * code_chunk <= max(max_scores, 1)


def test_nearest_float32_matches_brute_force():
    x, codes = random_problem(dtype=torch.float32, seed=3)
    assert torch.equal(nearest_codes(x, codes, max_scores=20), brute_force_nearest(x, codes))


@pytest.mark.parametrize("max_scores", BUDGETS)
def test_cosine_nearest_is_argmax_of_dot_product(max_scores):
    x, codes = random_problem(seed=1)
    x, codes = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(codes, dim=-1)
    expected = torch.bmm(x, codes.transpose(1, 2)).argmax(-1)
    assert torch.equal(nearest_codes(x, codes, cosine=True, max_scores=max_scores), expected)


def test_distance_logits_are_negative_euclidean_distances_or_dot_products():
    x, codes = random_problem(n=7, k=4)
    expected = -torch.stack([torch.cdist(x[i], codes[i]) for i in range(2)])
    torch.testing.assert_close(distance_logits(x, codes), expected)
    torch.testing.assert_close(distance_logits(x, codes, cosine=True), torch.bmm(x, codes.transpose(1, 2)))


@pytest.mark.parametrize("max_scores", [8, 64, None])
@pytest.mark.parametrize("cosine", [False, True])
def test_topk_equals_brute_force_topk(max_scores, cosine):
    x, codes = random_problem(seed=2)
    if cosine:
        x, codes = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(codes, dim=-1)
        brute = torch.bmm(x, codes.transpose(1, 2))
    else:
        brute = -torch.stack([torch.cdist(x[i], codes[i]) for i in range(2)])
    values, indices = topk_codes(x, codes, 4, cosine=cosine, max_scores=max_scores)
    expected = brute.topk(4, dim=-1)
    assert indices.shape == (2, 53, 4) and indices.dtype == torch.int64
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(values, expected.values)
    # nearest first: the first column is the nearest code
    assert torch.equal(indices[..., 0], nearest_codes(x, codes, cosine=cosine))


def test_sample_codes_with_tiny_temperature_is_nearest():
    x, codes = random_problem(seed=4, dtype=torch.float32)
    assert torch.equal(sample_codes(x, codes, 1e-7, max_scores=20), nearest_codes(x, codes))


def test_sample_codes_with_high_temperature_is_random_and_in_range():
    torch.manual_seed(0)
    x, codes = random_problem(n=400, seed=5, dtype=torch.float32)
    sampled = sample_codes(x, codes, 100.0, max_scores=64)
    assert sampled.shape == (2, 400) and sampled.dtype == torch.int64
    assert sampled.min() >= 0 and sampled.max() < 11
    assert (sampled != nearest_codes(x, codes)).float().mean() > 0.5
    assert len(sampled.unique()) == 11


@pytest.mark.parametrize("c", [1, 3])
def test_gather_codes_equals_indexing(c):
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(c, 9, 4, generator=g)
    indices = torch.randint(0, 9, (c, 5, 2), generator=g)
    expected = torch.stack([codes[i][indices[i]] for i in range(c)])
    assert torch.equal(gather_codes(codes, indices), expected)


def test_gather_codes_passes_gradients_to_codes():
    codes = torch.randn(2, 5, 3, requires_grad=True)
    indices = torch.tensor([[0, 0, 4], [1, 2, 2]])
    gather_codes(codes, indices).sum().backward()
    expected = torch.zeros(2, 5)
    expected[0, 0], expected[0, 4], expected[1, 1], expected[1, 2] = 2, 1, 1, 2
    assert torch.equal(codes.grad[..., 0], expected)


# ---------------------------------------------------------------------------------------------------------------
# first_max: blocked row maximum, and the search built on it


@pytest.mark.parametrize("num_codes", [1, 7, 255, 256, 1000, 2048, 2050, 4100, 8192, 8200])
def test_first_max_equals_max_on_random_rows(num_codes):
    g = torch.Generator().manual_seed(num_codes)
    scores = torch.randn(3, 5, num_codes, generator=g)
    values, indices = first_max(scores)
    expected = scores.max(-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    assert indices.dtype == torch.int64


@pytest.mark.parametrize("num_codes", [256, 2048, 3333, 8195])
def test_first_max_ties_go_to_the_lowest_index(num_codes):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (40, num_codes), generator=g).float()  # every row has its maximum many times
    expected = torch.stack([row.eq(row.max()).nonzero()[0, 0] for row in scores])
    assert torch.equal(first_max(scores)[1], expected)
    # a maximum only in the shorter last block, and one in the first and the last block
    scores = torch.zeros(2, num_codes)
    scores[0, -1] = 1.0
    scores[1, 0] = scores[1, -1] = 1.0
    assert first_max(scores)[1].tolist() == [num_codes - 1, 0]


def test_first_max_treats_nan_as_the_maximum_like_argmax():
    scores = torch.randn(3, 3000)  # blocks of 64
    scores[0, 2700] = float("nan")
    scores[1, 3] = scores[1, 900] = float("nan")
    expected = scores.max(-1)
    values, indices = first_max(scores)
    assert torch.equal(indices, expected.indices) and torch.equal(indices, scores.argmax(-1))
    assert torch.isnan(values[:2]).all() and values[2] == expected.values[2]


@pytest.mark.parametrize("max_scores", [2**12, 2**17, 2**21, 2**23, None])
def test_nearest_with_blocked_maximum_equals_brute_force(max_scores):
    # 5000 codes: rows long enough for the blocked maximum. 2^21 splits them into two code chunks of 2500
    # (blocked too), 2^23 keeps them whole, 2^12, 2^17 and the CPU default into chunks searched by a plain max
    x, codes = random_problem(c=2, n=300, k=5000, d=4, seed=11)
    if max_scores == 2**21:
        assert chunk_sizes(300, 5000, max_scores // 2) == (300, 2500)
    assert torch.equal(nearest_codes(x, codes, max_scores=max_scores), brute_force_nearest(x, codes))


@pytest.mark.parametrize("max_scores", [2**12, 2**16, None])
def test_nearest_with_blocked_maximum_ties_lowest_index(max_scores):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (1, 200, 3), generator=g).float()
    codes = torch.randint(-1, 2, (1, 300, 3), generator=g).float()  # 27 distinct codes, each many times
    got = nearest_codes(x, codes, max_scores=max_scores)
    assert torch.equal(got, brute_force_nearest(x, codes))


def test_nearest_budget_counts_every_codebook(monkeypatch):
    held = []
    original = search._scores_into

    def recording(buffer, xs, codes, bias):
        scores = original(buffer, xs, codes, bias)
        held.append(scores.numel())
        return scores

    monkeypatch.setattr(search, "_scores_into", recording)
    x, codes = random_problem(c=4, n=50, k=30, d=3, seed=12)
    got = nearest_codes(x, codes, max_scores=1200)
    assert max(held) <= 1200 and len(held) > 1
    assert torch.equal(got, brute_force_nearest(x, codes))


def test_nearest_code_sq_norms_is_an_offset_s_of_the_score_2xe_minus_s():
    x, codes = random_problem(c=2, n=40, k=9, d=3, seed=13)
    offsets = torch.randn(2, 9, dtype=x.dtype)
    expected = (2 * torch.bmm(x, codes.transpose(1, 2)) - offsets.unsqueeze(1)).argmax(-1)
    for max_scores in (8, None):
        assert torch.equal(nearest_codes(x, codes, code_sq_norms=offsets, max_scores=max_scores), expected)


def test_nearest_accepts_expanded_inputs_and_no_tokens():
    x, codes = random_problem(c=3, n=20, k=6, d=4, seed=14)
    shared = x[:1].expand(3, -1, -1)  # one set of tokens searched in three codebooks, without copies
    assert torch.equal(nearest_codes(shared, codes, max_scores=30), brute_force_nearest(shared.contiguous(), codes))
    empty = nearest_codes(x[:, :0], codes)
    assert empty.shape == (3, 0) and empty.dtype == torch.int64


def test_nearest_does_not_track_gradients():
    x, codes = random_problem(c=1, n=10, k=5, d=3, seed=15)
    out = nearest_codes(x.requires_grad_(), codes.requires_grad_())
    assert not out.requires_grad
