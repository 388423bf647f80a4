"""Chunk policies: chosen per device type, overridable, and never changing a result."""

import copy
from dataclasses import replace

import pytest
import torch

from vector_quantize_pytorch import ResidualVQ, VectorQuantize
from vector_quantize_pytorch.core.policy import (
    ACCELERATOR_POLICY,
    CPU_POLICY,
    ChunkPolicy,
    chunk_policy,
    set_chunk_policy,
    use_chunk_policy,
)
from vector_quantize_pytorch.core.search import first_max, nearest_codes, squared_norms, topk_codes

# a policy so small that every chunked path splits tokens (and codes) into several chunks. The logit chunks keep
# 16 or more tokens: BLAS scores chunks of a few tokens with other kernels, in another summation order, so
# only budgets that keep chunks that tall (as CPU_POLICY's and ACCELERATOR_POLICY's do) give identical logits
TINY_POLICY = replace(CPU_POLICY, name="tiny", search_scores=24, logit_scores=600, norm_values=7)
POLICIES = [CPU_POLICY, ACCELERATOR_POLICY, TINY_POLICY]


@pytest.fixture(autouse=True)
def automatic_policy():
    set_chunk_policy(None)
    yield
    set_chunk_policy(None)


def test_policy_follows_the_device_type():
    assert chunk_policy(torch.device("cpu")) is CPU_POLICY
    assert chunk_policy("cpu") is CPU_POLICY
    assert chunk_policy(None) is CPU_POLICY
    for device in ("cuda", "cuda:1", "mps", "xpu", "meta"):
        assert chunk_policy(device) is ACCELERATOR_POLICY


def test_accelerator_policy_is_bounded_and_larger_than_the_cpu_policy():
    assert ACCELERATOR_POLICY.search_scores * 4 == 512 * 2**20  # 512 MiB of float32 scores at most
    for field in ("search_scores", "logit_scores", "norm_values", "entropy_codes", "entropy_table"):
        assert getattr(ACCELERATOR_POLICY, field) >= getattr(CPU_POLICY, field)
    assert CPU_POLICY.blocked_max and not ACCELERATOR_POLICY.blocked_max


def test_override_by_name_or_object_and_restore():
    set_chunk_policy("accelerator")
    assert chunk_policy("cpu") is ACCELERATOR_POLICY
    set_chunk_policy(TINY_POLICY)
    assert chunk_policy("cuda") is TINY_POLICY
    set_chunk_policy(None)
    assert chunk_policy("cpu") is CPU_POLICY and chunk_policy("cuda") is ACCELERATOR_POLICY


def test_context_manager_nests_and_restores_on_error():
    with use_chunk_policy("accelerator") as outer:
        assert outer is ACCELERATOR_POLICY and chunk_policy("cpu") is ACCELERATOR_POLICY
        with pytest.raises(RuntimeError, match="inside"):
            with use_chunk_policy(TINY_POLICY):
                assert chunk_policy("cpu") is TINY_POLICY
                raise RuntimeError("inside")
        assert chunk_policy("cpu") is ACCELERATOR_POLICY
    assert chunk_policy("cpu") is CPU_POLICY


@pytest.mark.parametrize("bad", ["gpu", 3, CPU_POLICY.__dict__])
def test_unknown_policy_is_a_value_error_naming_the_choices(bad):
    with pytest.raises(ValueError, match=r"policy must be a ChunkPolicy, one of \['accelerator', 'cpu'\] or None"):
        set_chunk_policy(bad)
    assert chunk_policy("cpu") is CPU_POLICY  # nothing changed


@pytest.mark.parametrize("field", ["search_scores", "logit_scores", "norm_values", "entropy_codes", "entropy_table"])
@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_budgets_must_be_positive_ints(field, value):
    with pytest.raises(ValueError, match=f"ChunkPolicy.{field} must be a positive int"):
        replace(CPU_POLICY, **{field: value})


def test_a_custom_policy_is_a_frozen_dataclass():
    policy = ChunkPolicy("small-gpu", 2**24, 2**24, 2**24, 2**20, 2**20, False)
    with pytest.raises(AttributeError, match="cannot assign to field 'search_scores'"):
        policy.search_scores = 1


# ---------------------------------------------------------------------------------------------------------------
# the same results whatever the policy


def tied_codes(seed, c=2, k=9, d=3):
    """Small integers with duplicated codes: exact ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (c, k, d), generator=g).float()
    return torch.cat([codes, codes.flip(1)], dim=1), torch.randint(-2, 3, (c, 57, d), generator=g).float()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("cosine", [False, True])
def test_nearest_codes_identical_under_every_policy(seed, cosine):
    g = torch.Generator().manual_seed(seed)
    random = (torch.randn(3, 101, 6, generator=g), torch.randn(3, 37, 6, generator=g))
    codes_tied, x_tied = tied_codes(seed)
    for x, codes in (random, (x_tied, codes_tied)):
        results = []
        for policy in POLICIES:
            with use_chunk_policy(policy):
                results.append(nearest_codes(x, codes, cosine=cosine))
        assert all(torch.equal(results[0], r) for r in results[1:])


def test_first_max_blocked_and_single_kernel_agree_on_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (64, 3000), generator=g).float()  # many tied maxima per row
    scores[5, 1234] = float("nan")
    scores[7, -1] = 10.0  # the maximum in the last, shorter block
    blocked, single = first_max(scores, blocked=True), first_max(scores, blocked=False)
    assert torch.equal(blocked[1], single[1]) and torch.equal(blocked[1], scores.argmax(-1))
    assert blocked[1][5] == 1234 and blocked[1][7] == 2999


def test_squared_norms_and_topk_identical_under_every_policy():
    g = torch.Generator().manual_seed(1)
    x, codes = torch.randn(2, 50, 5, generator=g), torch.randn(2, 33, 5, generator=g)
    norms, tops = [], []
    for policy in POLICIES:
        with use_chunk_policy(policy):
            norms.append(squared_norms(codes))
            tops.append(topk_codes(x, codes, 4))
    assert all(torch.equal(norms[0], n) for n in norms[1:])
    assert all(torch.equal(tops[0][1], t[1]) and torch.equal(tops[0][0], t[0]) for t in tops[1:])


def train_two_steps(module, x, policy):
    module = copy.deepcopy(module)
    with use_chunk_policy(policy):
        outputs = [module(x) for _ in range(2)]
    return module, outputs


@pytest.mark.parametrize(
    "make,dim",
    [
        (lambda: VectorQuantize(dim=6, codebook_size=40, kmeans_init=True, threshold_ema_dead_code=2), 6),
        (
            lambda: VectorQuantize(
                dim=8, codebook_size=40, heads=2, separate_codebook_per_head=True, use_cosine_sim=True
            ),
            8,
        ),
        (lambda: ResidualVQ(dim=6, codebook_size=40, num_quantizers=3, kmeans_init=True), 6),
    ],
    ids=["vq-kmeans-dead-codes", "vq-cosine-heads", "rvq-kmeans"],
)
def test_training_steps_identical_under_every_policy(make, dim):
    torch.manual_seed(0)
    module, x = make(), torch.randn(3, 30, dim)
    runs = []
    for policy in POLICIES:
        torch.manual_seed(1)  # k-means and dead-code draws
        runs.append(train_two_steps(module, x, policy))
    (first, first_out), rest = runs[0], runs[1:]
    for other, other_out in rest:
        for a, b in zip(first_out, other_out):
            assert torch.equal(a[1], b[1])  # indices
            assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # quantized, loss
        for (name, t), u in zip(first.state_dict().items(), other.state_dict().values()):
            assert torch.equal(t, u), name
