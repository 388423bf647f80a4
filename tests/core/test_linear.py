"""core/linear.py: ``project`` applies a projection exactly as calling it, hooks and autograd included."""

import pytest
import torch
from torch import nn

from vector_quantize_pytorch.core.linear import project


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
    # the same autograd backward: the same gradients, bit for bit
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(linear.weight.grad, linear2.weight.grad)
    assert torch.equal(linear.bias.grad, linear2.bias.grad)


def test_project_runs_module_and_global_hooks():
    linear = nn.Linear(3, 8)
    calls = []
    linear.register_forward_hook(lambda module, args, out: calls.append(("module", out.shape)))
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(("global", out.shape))
    )
    try:
        project(linear, torch.randn(2, 3, requires_grad=True))
    finally:
        handle.remove()
    assert calls == [("global", torch.Size([2, 8])), ("module", torch.Size([2, 8]))]


def test_project_calls_other_modules():
    assert torch.equal(project(nn.Identity(), torch.ones(2, 3)), torch.ones(2, 3))
    assert torch.equal(project(nn.Tanh(), torch.zeros(2, 3)), torch.zeros(2, 3))
