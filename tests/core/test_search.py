"""Code search: chunked nearest / top-k / sampled codes equal brute force over the whole score matrix."""

import pytest
import torch

from vector_quantize_pytorch.core.search import (
    chunk_sizes,
    distance_logits,
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
    assert chunk_sizes(53, 11, 20) == (20, 1)
    assert chunk_sizes(53, 11, 64) == (53, 1)
    assert chunk_sizes(53, 11, 600) == (53, 2)
    assert chunk_sizes(53, 11) == (53, 11)


def test_nearest_with_token_chunks_and_all_codes_per_chunk():
    x, codes = random_problem(c=1, n=600, k=3, d=2, seed=7)
    assert chunk_sizes(600, 3, 768) == (256, 3)
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
