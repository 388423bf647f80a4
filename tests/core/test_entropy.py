"""LFQ/BSQ entropy math: every value against a brute-force float64 enumeration of the 2^K codes."""

import collections
import contextlib
import dataclasses
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vector_quantize_pytorch.core import entropy as entropy_module
from vector_quantize_pytorch.core.entropy import (
    CodeChunking,
    bernoulli_entropy,
    bit_groups,
    bit_product_table,
    code_entropy,
    mean_code_distribution,
    per_sample_entropy,
    shannon_entropy,
    token_weights,
)
from vector_quantize_pytorch.core.policy import ACCELERATOR_POLICY, CPU_POLICY, use_chunk_policy


def brute_force_code_probs(bit_logits):
    """``(n, c, K)`` per-bit logits -> ``(n, c, 2^K)`` softmax over every code, in float64.

    Code ``i`` has bit ``k`` = bit k of i (weight 2^k). Its logit is the sum of the logits of its set bits
    (the logit of a corner up to a per-token constant), so this is the softmax over corners enumerated.
    """
    num_bits = bit_logits.shape[-1]
    patterns = torch.tensor(list(itertools.product([0, 1], repeat=num_bits)), dtype=torch.float64).flip(-1)
    return (bit_logits.double() @ patterns.T).softmax(dim=-1)


def brute_force_entropy(probs):
    terms = torch.where(probs > 0, -probs * probs.log(), torch.zeros_like(probs))
    return terms.sum(dim=-1)


def random_logits(num_tokens, num_codebooks, num_bits, scale=2.0, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tokens, num_codebooks, num_bits, generator=generator, dtype=torch.float64) * scale).to(
        dtype
    )


def test_entropy_of_known_distributions():
    assert shannon_entropy(torch.full((8,), 1 / 8, dtype=torch.float64)).item() == pytest.approx(math.log(8), rel=1e-12)
    assert shannon_entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0


def test_entropy_gradient_is_finite_at_zero_probability():
    probs = torch.tensor([0.5, 0.5, 0.0], requires_grad=True)
    shannon_entropy(probs).backward()
    assert torch.isfinite(probs.grad).all()


def test_bernoulli_entropy_matches_definition_and_is_accurate_for_large_logits():
    logits = torch.tensor([-60.0, -30.0, -3.0, 0.0, 0.7, 30.0, 60.0], dtype=torch.float64)
    # the definition, written around the less likely outcome q = sigmoid(-|l|) so nothing underflows
    a = logits.abs()
    q = torch.exp(-a) / (1 + torch.exp(-a))
    expected = q * (a + torch.log1p(torch.exp(-a))) + (1 - q) * torch.log1p(torch.exp(-a))
    torch.testing.assert_close(bernoulli_entropy(logits), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(bernoulli_entropy(logits.float()), expected.float(), rtol=1e-5, atol=0)
    assert bernoulli_entropy(logits)[3].item() == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.parametrize("num_bits", [1, 2, 5, 9])
def test_per_sample_entropy_equals_enumeration(num_bits):
    logits = random_logits(13, 2, num_bits, seed=num_bits)
    expected = brute_force_entropy(brute_force_code_probs(logits)).mean()
    torch.testing.assert_close(per_sample_entropy(logits), expected, rtol=1e-10, atol=0)


def test_per_sample_entropy_with_weights_is_the_weighted_mean():
    logits = random_logits(6, 1, 4, seed=3)
    per_token = brute_force_entropy(brute_force_code_probs(logits))[:, 0]
    mask = torch.tensor([True, False, True, True, False, False])
    weights = token_weights(mask, 6, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(per_sample_entropy(logits, weights), per_token[mask].mean(), rtol=1e-10, atol=0)


def test_bit_product_table_lists_code_probabilities_in_index_order():
    logits = random_logits(5, 2, 6, seed=4)
    torch.testing.assert_close(bit_product_table(logits), brute_force_code_probs(logits), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("num_bits", [1, 2, 3, 7, 12])
def test_mean_code_distribution_equals_enumeration(num_bits):
    logits = random_logits(9, 2, num_bits, seed=num_bits)
    expected = brute_force_code_probs(logits).mean(dim=0)
    dist = mean_code_distribution(logits)
    torch.testing.assert_close(dist, expected, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(dist.sum(-1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("num_bits", [1, 4, 8, 11, 12])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_code_entropy_equals_enumeration(num_bits, dtype):
    logits = random_logits(17, 2, num_bits, seed=100 + num_bits, dtype=dtype)
    expected = brute_force_entropy(brute_force_code_probs(logits).mean(dim=0))
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(code_entropy(logits).double(), expected, rtol=rtol, atol=0)


def test_code_entropy_with_mask_ignores_excluded_tokens():
    logits = random_logits(8, 1, 6, seed=5)
    mask = torch.tensor([True, True, False, True, False, True, True, False])
    weights = token_weights(mask, 8, dtype=torch.float64, device="cpu")
    expected = brute_force_entropy(brute_force_code_probs(logits[mask]).mean(dim=0))
    torch.testing.assert_close(code_entropy(logits, weights), expected, rtol=1e-10, atol=0)
    garbage = logits.clone()
    garbage[~mask] = 1e4
    torch.testing.assert_close(code_entropy(garbage, weights), expected, rtol=1e-10, atol=0)


def test_everything_masked_gives_zero_not_nan():
    logits = random_logits(4, 1, 5, seed=6)
    weights = token_weights(torch.zeros(4, dtype=torch.bool), 4, dtype=torch.float64, device="cpu")
    assert code_entropy(logits, weights).item() == 0.0
    assert per_sample_entropy(logits, weights).item() == 0.0


def entropy_budgets(table=CPU_POLICY.entropy_table, codes=CPU_POLICY.entropy_codes):
    """The CPU policy with other LFQ-entropy budgets (``entropy_table``, ``entropy_codes``), for a block."""
    return use_chunk_policy(dataclasses.replace(CPU_POLICY, entropy_table=table, entropy_codes=codes))


def test_chunked_computation_equals_single_chunk():
    logits = random_logits(23, 2, 6, seed=7).requires_grad_()
    weights = torch.rand(23, dtype=torch.float64)
    weights = weights / weights.sum()
    single = code_entropy(logits, weights)
    (grad_single,) = torch.autograd.grad(single.sum(), logits)
    with entropy_budgets(table=2 * (8 + 8) * 5):  # 5 tokens per chunk
        chunked = code_entropy(logits, weights)
        (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, single, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_chunked, grad_single, rtol=1e-10, atol=1e-14)


def test_gradients_match_finite_differences():
    logits = random_logits(7, 2, 5, scale=1.0, seed=8).requires_grad_()
    weights = torch.rand(7, dtype=torch.float64)
    weights = weights / weights.sum()
    with entropy_budgets(table=2 * (4 + 8) * 3):  # also exercise the chunked backward
        assert torch.autograd.gradcheck(lambda t: mean_code_distribution(t, weights), (logits,))
        assert torch.autograd.gradcheck(lambda t: code_entropy(t, weights), (logits,))
        assert torch.autograd.gradcheck(lambda t: per_sample_entropy(t, weights), (logits,))


def test_gradient_equals_gradient_of_enumeration():
    logits = random_logits(10, 1, 7, seed=9).requires_grad_()
    (ours,) = torch.autograd.grad(code_entropy(logits).sum(), logits)
    (expected,) = torch.autograd.grad(brute_force_entropy(brute_force_code_probs(logits).mean(0)).sum(), logits)
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-12)


def test_bit_groups_partition_the_bits():
    assert bit_groups(20, max_exact_bits=24, group_bits=16) == [slice(0, 20)]
    groups = bit_groups(32, max_exact_bits=24, group_bits=16)
    assert groups == [slice(0, 16), slice(16, 32)]
    groups = bit_groups(37, max_exact_bits=24, group_bits=16)
    assert len(groups) == 3 and groups[0].start == 0 and groups[-1].stop == 37
    assert all(a.stop == b.start for a, b in zip(groups[:-1], groups[1:]))
    assert all(g.stop - g.start <= 16 for g in groups)


@pytest.mark.parametrize("group_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_bound_is_never_below_exact(group_bits, seed):
    logits = random_logits(12, 2, 8, seed=seed)
    logits[:, :, 1] = logits[:, :, 0] * 1.5  # correlated bits make the bound strict
    exact = code_entropy(logits)
    bound = code_entropy(logits, max_exact_bits=0, group_bits=group_bits)
    assert (bound >= exact - 1e-12).all()
    assert (bound <= 8 * math.log(2) + 1e-12).all()


def test_grouped_bound_is_exact_for_one_token():
    """A single token's distribution is a product over bits, so the groups are independent."""
    logits = random_logits(1, 1, 9, seed=10)
    torch.testing.assert_close(code_entropy(logits, max_exact_bits=0, group_bits=4), code_entropy(logits))


def test_reduce_mean_hook_sees_each_mean_distribution():
    logits = random_logits(5, 2, 10, seed=11)
    seen = []

    def uniform(dist):
        seen.append(tuple(dist.shape))
        return torch.full_like(dist, 1 / max(dist.shape[-1], 1))

    assert seen == [] and code_entropy(logits, reduce_mean=uniform, max_exact_bits=4, group_bits=4).shape == (2,)
    assert seen == [(2, 2**3), (2, 2**4), (2, 2**3)]
    torch.testing.assert_close(
        code_entropy(logits, reduce_mean=uniform), torch.full((2,), 10 * math.log(2), dtype=torch.float64)
    )


# ---------------------------------------------------------------- the exact entropy streamed over chunks of codes


@pytest.fixture
def force_small_chunks():
    """``force_small_chunks(code_chunk, table)`` gives the CPU policy these LFQ-entropy budgets (``entropy_codes``,
    ``entropy_table``) until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda code_chunk, table: stack.enter_context(entropy_budgets(table=table, codes=code_chunk))


def weighted_enumeration(logits, weights):
    return (brute_force_code_probs(logits) * weights[:, None, None]).sum(dim=0)


def random_weights(num_tokens, seed):
    weights = torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return weights / weights.sum()


def test_chunking_plan_respects_the_budgets_and_covers_every_code():
    for num_codebooks, num_bits in [(1, 1), (1, 10), (1, 18), (1, 24), (2, 24), (3, 19), (8, 32)]:
        chunking = CodeChunking.plan(num_codebooks, num_bits)
        assert chunking.low_bits + chunking.mid_bits + chunking.top_bits == num_bits
        assert min(chunking) >= 0 and chunking.token_chunk >= 1
        assert num_codebooks * 2 ** (chunking.low_bits + chunking.mid_bits) <= CPU_POLICY.entropy_codes
    chunks_of_24_bits = CodeChunking.plan(1, 24)
    assert chunks_of_24_bits[:3] == (9, 9, 6)  # 64 chunks of 2^18 codes
    assert chunks_of_24_bits.token_chunk == CPU_POLICY.entropy_table // (2 * 2**9)


def test_streamed_value_and_gradient_equal_the_unchunked_ones(force_small_chunks):
    logits = random_logits(13, 2, 9, seed=20).requires_grad_()
    weights = random_weights(13, seed=20)
    assert CodeChunking.plan(2, 9).num_chunks == 1  # default budgets: one chunk, one token chunk
    single = code_entropy(logits, weights)
    (grad_single,) = torch.autograd.grad(single.sum(), logits)

    force_small_chunks(code_chunk=2 * 16, table=2 * (4 + 4) * 3)
    chunking = CodeChunking.plan(2, 9)
    assert chunking.num_chunks == 32 and chunking.token_chunk == 3  # 32 code chunks x 5 token chunks
    streamed = code_entropy(logits, weights)
    (grad_streamed,) = torch.autograd.grad(streamed.sum(), logits)
    torch.testing.assert_close(streamed, single, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_streamed, grad_single, rtol=1e-10, atol=1e-14)
    expected = brute_force_entropy(weighted_enumeration(logits, weights))
    torch.testing.assert_close(streamed, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("num_bits", [3, 7])
def test_streamed_mean_distribution_lists_codes_in_index_order(force_small_chunks, num_bits):
    force_small_chunks(code_chunk=4, table=6)
    logits = random_logits(7, 1, num_bits, seed=21)
    weights = random_weights(7, seed=21)
    assert CodeChunking.plan(1, num_bits).num_chunks == 2 ** (num_bits - 2)
    dist = mean_code_distribution(logits, weights)
    torch.testing.assert_close(dist, weighted_enumeration(logits, weights), rtol=1e-10, atol=1e-15)


def test_streamed_gradients_pass_gradcheck_and_equal_autograd_of_the_enumeration(force_small_chunks):
    # 8 code chunks of 4 codes (1 low, 1 mid, 3 top bits) and token chunks of 2: every path of the backward
    force_small_chunks(code_chunk=2 * 4, table=2 * (2 + 2) * 2)
    logits = random_logits(5, 2, 5, scale=1.0, seed=22).requires_grad_()
    weights = random_weights(5, seed=22)
    assert CodeChunking.plan(2, 5) == (1, 1, 3, 2)
    assert torch.autograd.gradcheck(lambda t: code_entropy(t, weights), (logits,))
    copy = lambda dist: dist * 1.0  # noqa: E731  a hook: the backward recomputes every chunk
    assert torch.autograd.gradcheck(lambda t: code_entropy(t, weights, reduce_mean=copy), (logits,))
    assert torch.autograd.gradcheck(lambda t: mean_code_distribution(t, weights), (logits,))
    (ours,) = torch.autograd.grad(code_entropy(logits, weights).sum(), logits)
    expected_entropy = brute_force_entropy(weighted_enumeration(logits, weights)).sum()
    (expected,) = torch.autograd.grad(expected_entropy, logits)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-13)


def test_streamed_float32_equals_float64_enumeration(force_small_chunks):
    force_small_chunks(code_chunk=64, table=64)
    logits = random_logits(40, 1, 12, seed=23, dtype=torch.float32)
    expected = brute_force_entropy(brute_force_code_probs(logits).mean(dim=0))
    torch.testing.assert_close(code_entropy(logits).double(), expected, rtol=1e-5, atol=0)


def test_streamed_entropy_with_mask_and_all_masked(force_small_chunks):
    force_small_chunks(code_chunk=8, table=16)
    logits = random_logits(9, 1, 6, seed=24)
    mask = torch.tensor([True, False, True, True, False, True, True, False, True])
    garbage = logits.clone().requires_grad_()
    with torch.no_grad():
        garbage[~mask] = 1e4
    weights = token_weights(mask, 9, dtype=torch.float64, device="cpu")
    expected = brute_force_entropy(brute_force_code_probs(logits[mask]).mean(dim=0))
    value = code_entropy(garbage, weights)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    (grad,) = torch.autograd.grad(value.sum(), garbage)
    assert (grad[~mask] == 0).all() and torch.isfinite(grad).all()

    nobody = token_weights(torch.zeros(9, dtype=torch.bool), 9, dtype=torch.float64, device="cpu")
    logits.requires_grad_()
    value = code_entropy(logits, nobody)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert value.item() == 0.0 and (grad == 0).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class OperatorCount(TorchDispatchMode):
    """Counts the calls of each aten operator."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_accelerator_policy_plans_one_chunk_of_codes_and_of_tokens():
    assert CodeChunking.plan(1, 16, "meta") == (8, 8, 0, ACCELERATOR_POLICY.entropy_table // 2**9)  # not a CPU
    assert CodeChunking.plan(1, 24, "meta")[:3] == (12, 12, 0)  # every exact size is one chunk of codes
    assert CodeChunking.plan(1, 16, "cpu") == CodeChunking.plan(1, 16)
    with use_chunk_policy("accelerator"):
        assert CodeChunking.plan(1, 16, "cpu") == CodeChunking.plan(1, 16, "meta")


def test_accelerator_policy_gives_the_streamed_values_in_one_pass(force_small_chunks):
    logits = random_logits(300, 1, 10, seed=30).requires_grad_()
    weights = random_weights(300, seed=30)
    with use_chunk_policy("accelerator"), OperatorCount() as ops:
        value = code_entropy(logits, weights)
        (grad,) = torch.autograd.grad(value.sum(), logits)
    # one of each product, no loop over chunks: the mean, the entropy's dot product (einsum), the gradients
    # of the two tables; none accumulated over chunks of tokens
    assert ops.counts["bmm"] == 4 and ops.counts["baddbmm_"] == 0
    force_small_chunks(code_chunk=2**6, table=2 * (8 + 8) * 7)  # 16 chunks of codes x 43 chunks of tokens
    streamed = code_entropy(logits, weights)
    (grad_streamed,) = torch.autograd.grad(streamed.sum(), logits)
    torch.testing.assert_close(value, streamed, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_streamed, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("hook", [None, lambda dist: dist * 1.0])
def test_streamed_forward_and_backward_never_hold_the_whole_distribution(force_small_chunks, hook):
    force_small_chunks(code_chunk=64, table=64)
    num_bits = 12  # 4096 codes, 64 chunks of 64
    logits = random_logits(16, 1, num_bits, seed=25).requires_grad_()
    with LargestTensor() as largest:
        value = code_entropy(logits, reduce_mean=hook)
        value.sum().backward()
    assert largest.largest <= max(64, logits.numel()) < 2**num_bits
    expected = brute_force_entropy(brute_force_code_probs(logits.detach()).mean(dim=0))
    torch.testing.assert_close(value.detach(), expected, rtol=1e-10, atol=0)


def test_reduce_mean_hook_gets_every_chunk_and_its_gradient_is_used(force_small_chunks):
    force_small_chunks(code_chunk=2 * 8, table=2 * (4 + 2) * 2)
    logits = random_logits(6, 2, 7, seed=26).requires_grad_()
    plain = code_entropy(logits)
    (grad_plain,) = torch.autograd.grad(plain.sum(), logits)
    calls = []

    def half_gradient(dist):  # the same values, half the gradient: shows the backward goes through the hook
        calls.append(tuple(dist.shape))
        return 0.5 * dist + 0.5 * dist.detach()

    hooked = code_entropy(logits, reduce_mean=half_gradient)
    assert calls == [(2, 8)] * 16  # 16 chunks of 8 codes: all 2^7 codes
    (grad_hooked,) = torch.autograd.grad(hooked.sum(), logits)
    assert calls[16:] == [(2, 8)] * 16  # called again on each chunk by the backward
    torch.testing.assert_close(hooked, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_hooked, 0.5 * grad_plain, rtol=1e-10, atol=1e-14)


def test_module_constants_are_read_when_called(monkeypatch):
    logits = random_logits(12, 1, 8, seed=27)
    logits[:, :, 1] = logits[:, :, 0] * 1.5  # correlated bits: the bound differs from the exact value
    exact = code_entropy(logits)
    bound = code_entropy(logits, max_exact_bits=0, group_bits=4)
    assert (bound > exact + 1e-6).all()
    monkeypatch.setattr(entropy_module, "EXACT_CODE_ENTROPY_MAX_BITS", 7)
    monkeypatch.setattr(entropy_module, "BOUND_GROUP_MAX_BITS", 4)
    torch.testing.assert_close(code_entropy(logits), bound, rtol=1e-12, atol=0)


def test_no_gradient_is_formed_without_autograd():
    logits = random_logits(6, 1, 6, seed=29).requires_grad_()
    with torch.no_grad():
        assert not code_entropy(logits).requires_grad
    assert code_entropy(logits).requires_grad and not code_entropy(logits.detach()).requires_grad
