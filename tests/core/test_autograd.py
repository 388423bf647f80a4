"""Every hand-written autograd function against the plain-autograd computation it replaces: the same values
and the same gradients (float64 where rounding would blur the comparison)."""

import dataclasses

import pytest
import torch

from vector_quantize_pytorch.core import autograd, estimators, losses
from vector_quantize_pytorch.core.code_chunks import CodeChunking, bit_product_table, shannon_entropy
from vector_quantize_pytorch.core.policy import CPU_POLICY, use_chunk_policy

F64 = torch.float64


def values_and_grads(fn, *inputs, upstream=None):
    """``fn(*inputs)`` (one tensor or a tuple), and the gradients of ``sum(output * upstream)`` w.r.t. the inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream if upstream is not None else [torch.ones_like(o) for o in outs]
    sum(((o * u).sum() for o, u in zip(outs, ups)), torch.zeros((), dtype=outs[0].dtype)).backward()
    return [o.detach() for o in outs], [t.grad for t in inputs]


def assert_same(fused, plain, **tol):
    (fused_out, fused_grads), (plain_out, plain_grads) = fused, plain
    for got, expected in zip(fused_out + fused_grads, plain_out + plain_grads):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, **tol)


# ------------------------------------------------------------------ rounding


@pytest.mark.parametrize("fused,op", [(autograd.round_ste, torch.round), (autograd.floor_ste, torch.floor)])
def test_rounding_straight_through_equals_the_detached_difference(fused, op):
    x = torch.randn(5, 7, dtype=F64) * 4
    upstream = [torch.randn(5, 7, dtype=F64)]
    got = values_and_grads(fused, x, upstream=upstream)
    expected = values_and_grads(lambda t: op(t).detach() + (t - t.detach()), x, upstream=upstream)
    assert torch.equal(got[0][0], op(x))
    assert_same(got, expected, rtol=0, atol=0)


# ------------------------------------------------------------------ rotation trick


def plain_rotation_trick(x, q, eps=1e-6):
    """``lambda R x`` with ``R`` and ``lambda`` constants, by ordinary autograd (forward value ``q``)."""
    u = (x / x.norm(dim=-1, keepdim=True)).detach()
    v = q / q.norm(dim=-1, keepdim=True)
    w = (u + v) / (u + v).norm(dim=-1, keepdim=True)
    lam = (q.norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True)).detach()
    rotated = x - 2 * w * (w * x).sum(-1, keepdim=True) + 2 * v * (u * x).sum(-1, keepdim=True)
    return estimators.attach_gradient(q, lam * rotated)


def test_rotation_trick_equals_plain_autograd_rotation():
    torch.manual_seed(0)
    x, q = torch.randn(16, 5, dtype=F64), torch.randn(16, 5, dtype=F64)
    upstream = [torch.randn(16, 5, dtype=F64)]
    got = values_and_grads(lambda a: autograd.RotationTrick.apply(a, q, 1e-6), x, upstream=upstream)
    expected = values_and_grads(lambda a: plain_rotation_trick(a, q), x, upstream=upstream)
    assert torch.equal(got[0][0], q)
    assert_same(got, expected)


# ------------------------------------------------------------------ SimVQ: output and commitment loss


def plain_quantize_with_commitment(x, q, valid, beta, weight, rotation):
    estimator = estimators.rotation_trick if rotation else estimators.straight_through
    valid_ = None if valid is None else valid.unsqueeze(0)
    codebook_term = losses.commitment_loss(x.detach().unsqueeze(0), q.unsqueeze(0), valid_)
    input_term = losses.commitment_loss(x.unsqueeze(0), q.detach().unsqueeze(0), valid_)
    return estimator(x, q.detach()), (codebook_term + input_term * beta) * weight


@pytest.mark.parametrize("rotation", [True, False])
@pytest.mark.parametrize("beta,weight", [(0.25, 1.0), (0.0, 2.0), (0.5, 0.0)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("uses", ["both", "output", "loss"])
def test_quantize_with_commitment_equals_estimator_plus_losses(rotation, beta, weight, masked, uses):
    torch.manual_seed(0)
    x, q = torch.randn(7, 6, dtype=F64), torch.randn(7, 6, dtype=F64)
    valid = torch.tensor([True, False, True, True, False, True, True]) if masked else None
    upstream = [torch.randn(7, 6, dtype=F64) * (uses != "loss"), torch.tensor(3.0, dtype=F64) * (uses != "output")]
    grad = autograd.rotation_trick_grad if rotation else (lambda a, b, g: g)

    def fused(a, b):
        return autograd.QuantizeWithCommitment.apply(a, b, valid, beta, weight, grad)

    def plain(a, b):
        return plain_quantize_with_commitment(a, b, valid, beta, weight, rotation)

    got, expected = values_and_grads(fused, x, q, upstream=upstream), values_and_grads(plain, x, q, upstream=upstream)
    assert torch.equal(got[0][0], q)
    assert_same(got, expected)


def test_quantize_with_commitment_of_no_tokens_is_zero():
    x, q = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4, requires_grad=True)
    out, loss = autograd.QuantizeWithCommitment.apply(x, q, None, 0.25, 1.0, autograd.rotation_trick_grad)
    assert out.shape == (0, 4) and loss.item() == 0.0


# ------------------------------------------------------------------ LatentQuantize: commitment and quantization loss


def plain_commitment_and_quantization_loss(projected, x, wc, wq):
    finite = torch.isfinite(projected - x)
    zero = projected.new_zeros(())
    o, t = torch.where(finite, projected, zero), torch.where(finite, x, zero)
    count = finite.sum().clamp(min=1)
    return (wc * (o - t.detach()).pow(2).sum() + wq * (o.detach() - t).pow(2).sum()) / count


@pytest.mark.parametrize("non_finite", [False, True])
def test_commitment_and_quantization_loss_equals_two_masked_mses(non_finite):
    torch.manual_seed(0)
    projected, x = torch.randn(9, 4, dtype=F64), torch.randn(9, 4, dtype=F64)
    if non_finite:
        projected[2, 1], x[5, 0], x[6, 3] = float("nan"), float("inf"), float("-inf")
    wc, wq = torch.tensor(0.1, dtype=F64), torch.tensor(0.3, dtype=F64)
    got = values_and_grads(lambda o, t: autograd.CommitmentAndQuantizationLoss.apply(o, t, wc, wq), projected, x)
    expected = values_and_grads(lambda o, t: plain_commitment_and_quantization_loss(o, t, wc, wq), projected, x)
    got[0][0] = got[0][0].double()  # the loss is float32
    torch.testing.assert_close(got[0][0], expected[0][0].double(), rtol=1e-6, atol=1e-7)
    assert_same(([], got[1]), ([], expected[1]))
    assert all(torch.isfinite(g).all() for g in got[1])


# ------------------------------------------------------------------ LFQ: batch entropy of the codes


def plain_batch_entropy(bit_logits, weights):
    """The exact batch entropy by ordinary autograd over all ``2^K`` codes at once."""
    probs = bit_product_table(bit_logits)  # (n, c, 2^K)
    return shannon_entropy((probs * weights.view(-1, 1, 1)).sum(0))


def small_chunks():
    """Chunks of 16 codes and token chunks of 24 table elements: several of each at once."""
    return use_chunk_policy(dataclasses.replace(CPU_POLICY, entropy_codes=16, entropy_table=24))


@pytest.fixture
def bit_logits_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(11, 2, 7, dtype=F64) * 2
    weights = torch.rand(11, dtype=F64)
    return logits, weights / weights.sum()


@pytest.mark.parametrize("chunked", [False, True])
def test_local_code_entropy_equals_plain_autograd(bit_logits_and_weights, chunked):
    logits, weights = bit_logits_and_weights
    upstream = [torch.tensor([0.7, -1.3], dtype=F64)]
    with small_chunks() if chunked else use_chunk_policy(CPU_POLICY):
        chunking = CodeChunking.plan(2, 7, logits.device)
        assert (chunking.num_chunks > 1) == chunked

        def fused(t):
            return autograd.LocalCodeEntropy.apply(t, weights, chunking, True)

        got = values_and_grads(fused, logits, upstream=upstream)
    expected = values_and_grads(lambda t: plain_batch_entropy(t, weights), logits, upstream=upstream)
    assert_same(got, expected)


def test_chunk_means_and_recomputed_chunk_entropies_equal_plain_autograd(bit_logits_and_weights):
    logits, weights = bit_logits_and_weights
    upstream = [torch.tensor([0.7, -1.3], dtype=F64)]
    with small_chunks():
        chunking = CodeChunking.plan(2, 7, logits.device)

        def fused(t):
            total = 0
            for chunk in range(chunking.num_chunks):
                dist = autograd.ChunkMean.apply(t, weights, chunking, chunk)
                total = total + autograd.RecomputedChunkEntropy.apply(dist, t, weights, chunking, chunk, lambda d: d)
            return total

        got = values_and_grads(fused, logits, upstream=upstream)
        means = values_and_grads(
            lambda t: torch.cat([autograd.ChunkMean.apply(t, weights, chunking, c) for c in range(16)], 1),
            logits,
            upstream=[torch.randn(2, 128, dtype=F64, generator=torch.Generator().manual_seed(1))],
        )
    expected = values_and_grads(lambda t: plain_batch_entropy(t, weights), logits, upstream=upstream)
    assert chunking.num_chunks == 16
    assert_same(got, expected)
    plain_means = values_and_grads(
        lambda t: (bit_product_table(t) * weights.view(-1, 1, 1)).sum(0),
        logits,
        upstream=[torch.randn(2, 128, dtype=F64, generator=torch.Generator().manual_seed(1))],
    )
    assert_same(means, plain_means)
