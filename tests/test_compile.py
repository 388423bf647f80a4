"""torch.compile(fullgraph=True): training and eval forwards compile without graph breaks and give the eager
outputs, gradients and state updates.

The tests use the "aot_eager" backend (dynamo's graph capture plus AOTAutograd, no code generation), which
is what finds graph breaks and runs the same kernels as eager mode, so outputs must be equal, random draws
included. One slow test (``python -m pytest -m slow``, which CI runs) compiles with inductor, which needs a C++
compiler and takes a minute.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch_release import needs_torch

import vector_quantize_pytorch as vqp

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    """Each test compiles from scratch: recompilations of the quantizers' forwards left by earlier tests (in this
    file or others run in the same process) would otherwise count against dynamo's recompile limit."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def vq():
    return vqp.VectorQuantize(dim=8, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2)


def vq_cosine_heads():
    return vqp.VectorQuantize(
        dim=8,
        codebook_size=16,
        heads=2,
        codebook_dim=4,
        separate_codebook_per_head=True,
        use_cosine_sim=True,
        kmeans_init=True,
        threshold_ema_dead_code=1,
    )


def rvq():
    return vqp.ResidualVQ(dim=8, codebook_size=16, num_quantizers=3, kmeans_init=True, threshold_ema_dead_code=2)


def fsq():
    return vqp.FSQ(levels=[3, 5, 4], dim=8)


def lfq():
    return vqp.LFQ(dim=8, codebook_size=16, num_codebooks=2, entropy_loss_weight=0.1, commitment_loss_weight=0.25)


def simvq():
    return vqp.SimVQ(dim=8, codebook_size=16)


CASES = {"VectorQuantize": vq, "VectorQuantize-cosine-heads": vq_cosine_heads, "ResidualVQ": rvq, "FSQ": fsq,
         "LFQ": lfq, "SimVQ": simvq}  # fmt: skip


def outputs_of(result):
    """Tensors of a forward's result (LFQ returns a namedtuple, FSQ a pair)."""
    items = result if isinstance(result, tuple) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def float_outputs(result):
    return [t for t in outputs_of(result) if t.is_floating_point()]


def assert_same(actual, expected, what):
    for a, e in zip(actual, expected, strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
        else:
            assert torch.equal(a, e), what


def state_of(module):
    return [t.detach().clone() for t in module.state_dict().values()]


def run_step(module, x, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    result = module(x)
    loss = sum(t.float().square().mean() for t in float_outputs(result) if t.requires_grad or t.ndim == 0)
    if module.training and loss.requires_grad:
        loss.backward()
    grads = [x.grad] + [p.grad for p in module.parameters() if p.grad is not None]
    return outputs_of(result), [g.clone() for g in grads if g is not None]


# VectorQuantize in the default run, every other quantizer with `pytest -m slow`
# dynamo before torch 2.6 cannot trace these (autograd.Functions taking functions, int.bit_length, a module
# attribute set in forward): on torch 2.3 only VectorQuantize and ResidualVQ compile without graph breaks
NEEDS_TORCH_2_6 = ("FSQ", "LFQ", "SimVQ")
OLDER_DYNAMO = needs_torch((2, 6), "fullgraph compilation of FSQ, LFQ and SimVQ")


def case_marks(name: str) -> tuple:
    slow = () if name == "VectorQuantize" else (pytest.mark.slow,)
    return slow + ((OLDER_DYNAMO,) if any(name.endswith(family) for family in NEEDS_TORCH_2_6) else ())


@pytest.mark.parametrize("name", [pytest.param(n, marks=case_marks(n)) for n in CASES])
def test_compiled_training_and_eval_forwards_equal_eager(name):
    torch.manual_seed(0)
    eager = CASES[name]().train()
    first = torch.randn(2, 12, 8) * 2
    eager(first)  # k-means initialisation (a one-time host step) happens eagerly
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND)

    for step in range(3):
        x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(step)) * 2
        expected = run_step(eager, x, seed=step)
        actual = run_step(compiled, x, seed=step)
        assert_same(actual[0], expected[0], f"{name} training outputs, step {step}")
        assert_same(actual[1], expected[1], f"{name} gradients, step {step}")
        assert_same(state_of(module), state_of(eager), f"{name} state after step {step}")

    eager.eval()
    module.eval()
    x = torch.randn(3, 12, 8)
    with torch.no_grad():
        assert_same(outputs_of(compiled(x)), outputs_of(eager(x)), f"{name} eval outputs")


def test_compiled_vector_quantize_with_a_mask_equals_eager():
    torch.manual_seed(0)
    eager = vq().train()
    eager(torch.randn(2, 12, 8))
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND)
    x = torch.randn(2, 12, 8)
    mask = torch.rand(2, 12) > 0.4
    torch.manual_seed(5)
    expected = eager(x, mask=mask)
    torch.manual_seed(5)
    actual = compiled(x, mask=mask)
    assert_same(outputs_of(actual), outputs_of(expected), "masked outputs")
    assert_same(state_of(module), state_of(eager), "masked state")


def test_dead_codes_are_replaced_inside_the_compiled_graph():
    """The compiled training step must actually run the replacement (not only match a no-op)."""
    torch.manual_seed(0)
    module = vq().train()
    module(torch.randn(2, 12, 8))
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND)
    cb = module._codebook
    cb.cluster_size[0, :4] = 0.0  # four dead codes
    before = cb.embed.clone()
    compiled(torch.randn(2, 12, 8) + 10)  # far from every code: the replaced codes come from this batch
    assert (cb.embed[0, :4] - before[0, :4]).abs().amax() > 1
    assert (cb.embed[0, :4] > 5).all()


@pytest.mark.slow  # about a minute of C++ compilation; CI runs it with the other slow tests
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_inductor_compiles_a_vector_quantize_training_step():
    torch.manual_seed(0)
    eager = vq().train()
    eager(torch.randn(2, 12, 8))
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 12, 8)
    torch.manual_seed(1)
    quantized, indices, loss = compiled(x)
    torch.manual_seed(1)
    expected = eager(x)
    assert torch.equal(indices, expected[1])
    torch.testing.assert_close(quantized, expected[0])
    assert torch.isfinite(loss)
