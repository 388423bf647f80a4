"""core/linear.py: ``token_linear`` equals ``F.linear`` (forward bit for bit, gradients to rounding), and
``project`` applies a projection like calling it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vector_quantize_pytorch.core.linear import (
    is_plain_linear,
    project,
    token_linear,
    token_linear_grads,
    transposed_copy,
)


@pytest.mark.parametrize("features", [(4, 256), (256, 4), (3, 3)], ids=["few to many", "many to few", "square"])
@pytest.mark.parametrize("shape", [(2, 5), (0, 5), (5,)], ids=["sequence", "empty", "rows"])
def test_project_equals_calling_the_linear(features, shape):
    torch.manual_seed(0)
    linear = nn.Linear(*features)
    x = torch.randn(*shape, features[0], requires_grad=True)
    y = project(linear, x)
    expected = linear(x.detach().clone().requires_grad_())
    assert y.shape == expected.shape and torch.equal(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    x2 = x.detach().clone().requires_grad_()
    linear2 = nn.Linear(*features)
    linear2.load_state_dict(linear.state_dict())
    linear2(x2).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(linear.weight.grad, linear2.weight.grad)
    torch.testing.assert_close(linear.bias.grad, linear2.bias.grad)


def test_project_calls_modules_with_hooks_and_other_modules():
    linear = nn.Linear(3, 8)
    calls = []
    linear.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    assert not is_plain_linear(linear)
    project(linear, torch.randn(2, 3))
    assert calls == [torch.Size([2, 8])]
    assert torch.equal(project(nn.Identity(), torch.ones(2, 3)), torch.ones(2, 3))


@pytest.mark.parametrize("features", [(16, 3), (3, 16), (4, 4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_linear_matches_f_linear(features, bias, dtype):
    in_features, out_features = features
    torch.manual_seed(7)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    tokens = torch.randn(37, in_features, dtype=dtype, requires_grad=True)
    upstream = torch.randn(37, out_features, dtype=dtype)

    out = token_linear(tokens, layer.weight, layer.bias)
    expected = F.linear(tokens, layer.weight, layer.bias)
    assert torch.equal(out, expected)  # the same forward, bit for bit

    params = [tokens, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad((out * upstream).sum(), params)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.shape == expected_grad.shape
        torch.testing.assert_close(grad, expected_grad)


def test_token_linear_broadcast_gradient_and_partial_needs():
    """A mean's expanded (stride-0) gradient, and inputs that do not need a gradient."""
    layer = nn.Linear(3, 16)
    tokens = torch.randn(50, 3)
    out = token_linear(tokens, layer.weight, layer.bias)
    grad_weight, grad_bias = torch.autograd.grad(out.mean(), [layer.weight, layer.bias])
    torch.testing.assert_close(grad_weight, tokens.sum(0).expand(16, 3) / out.numel())
    torch.testing.assert_close(grad_bias, torch.full((16,), 50 / out.numel()))

    frozen_weight = layer.weight.detach()
    tokens.requires_grad_(True)
    (grad_tokens,) = torch.autograd.grad(token_linear(tokens, frozen_weight).sum(), [tokens])
    torch.testing.assert_close(grad_tokens, frozen_weight.sum(0).expand(50, 3))


def test_token_linear_falls_back_to_f_linear():
    layer = nn.Linear(3, 16)
    tokens = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(token_linear(tokens, layer.weight, layer.bias), layer(tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_linear(tokens, layer.weight, layer.bias)
        assert out.dtype == torch.bfloat16 and torch.equal(out, layer(tokens))
    batched = torch.randn(2, 5, 3)
    assert torch.equal(token_linear(batched, layer.weight, layer.bias), layer(batched))


@pytest.mark.parametrize("features", [(16, 3), (3, 16)])
@pytest.mark.parametrize("needs", [(True, True, True), (False, True, False), (True, False, False)])
def test_token_linear_grads_match_autograd(features, needs):
    in_features, out_features = features
    torch.manual_seed(10)
    tokens = torch.randn(29, in_features, requires_grad=True)
    weight = torch.randn(out_features, in_features, requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True)
    upstream = torch.randn(29, out_features)
    expected = torch.autograd.grad(F.linear(tokens, weight, bias), [tokens, weight, bias], upstream)
    grads = token_linear_grads(upstream, tokens.detach(), weight.detach(), needs)
    for grad, expected_grad, needed in zip(grads, expected, needs):
        if needed:
            torch.testing.assert_close(grad, expected_grad)
        else:
            assert grad is None


@pytest.mark.parametrize("shape", [(3, 4096), (4096, 3), (5, 7), (1, 4), (0, 3)])
def test_transposed_copy(shape):
    matrix = torch.randn(shape)
    copied = transposed_copy(matrix)
    assert copied.is_contiguous() and torch.equal(copied, matrix.t())
