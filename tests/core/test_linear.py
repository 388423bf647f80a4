"""core/linear.py: ``project`` applies a projection like calling it, with token_linear's backward."""

import pytest
import torch
from torch import nn

from vector_quantize_pytorch.core.linear import is_plain_linear, project


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
