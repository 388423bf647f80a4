"""Gradient estimators: forward value is the code, gradients follow each method's closed form."""

import math

import pytest
import torch

from vector_quantize_pytorch.core import estimators

# the rotation is computed in float32 whatever the input dtype
F32_TOL = dict(atol=1e-6, rtol=1e-5)


def rotation_2d(u, v):
    """The rotation of the plane taking direction u to direction v, from their angles."""
    theta = math.atan2(v[1], v[0]) - math.atan2(u[1], u[0])
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def rotation_3d(u, v):
    """Rodrigues' formula: rotation about u x v by the angle between u and v (u, v unit, not parallel)."""
    u, v = torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64)
    axis = torch.linalg.cross(u, v)
    sin, cos = axis.norm(), (u * v).sum()
    k = axis / sin
    K = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + sin * K + (1 - cos) * K @ K


def jacobian(fn, x):
    """d fn(x) / d x for one vector x (rows: outputs)."""
    return torch.autograd.functional.jacobian(fn, x)


@pytest.mark.parametrize(
    "x,q,g",
    [
        ([3.0, 4.0], [-1.0, 2.0], [0.5, -2.0]),
        ([1.0, 0.0], [0.0, 2.0], [1.0, 1.0]),
        ([-2.0, 1.0], [2.0, 0.5], [-1.0, 3.0]),
    ],
)
def test_rotation_trick_gradient_2d_equals_lambda_R_transpose_g(x, q, g):
    x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    q = torch.tensor(q, dtype=torch.float64)
    g = torch.tensor(g, dtype=torch.float64)
    out = estimators.rotation_trick(x, q)
    out.backward(g)
    u, v = (x / x.norm()).detach(), q / q.norm()
    R = rotation_2d(u.tolist(), v.tolist())
    lam = q.norm() / x.detach().norm()
    torch.testing.assert_close(R @ u, v)  # the hand-made R is the right rotation
    torch.testing.assert_close(x.grad, lam * R.T @ g, **F32_TOL)


def test_rotation_trick_gradient_3d_batched_equals_rodrigues():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    q = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    g = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    estimators.rotation_trick(x, q).backward(g)
    for i in range(4):
        xi = x[i].detach()
        R = rotation_3d(xi / xi.norm(), q[i] / q[i].norm())
        lam = q[i].norm() / xi.norm()
        torch.testing.assert_close(x.grad[i], lam * R.T @ g[i], **F32_TOL)


def test_rotation_trick_forward_is_exactly_q():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 6, generator=gen, requires_grad=True)
    q = torch.randn(5, 7, 6, generator=gen)
    assert torch.equal(estimators.rotation_trick(x, q), q)


def test_rotation_trick_keeps_low_precision_dtype_and_value():
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(3, 8, dtype=torch.bfloat16)
    out = estimators.rotation_trick(x, q)
    assert out.dtype == torch.bfloat16 and torch.equal(out, q)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def assert_proper_rotation_taking(R, u, v):
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    torch.testing.assert_close(R.T @ R, eye, **F32_TOL)
    torch.testing.assert_close(torch.linalg.det(R), torch.tensor(1.0, dtype=R.dtype), **F32_TOL)
    torch.testing.assert_close(R @ u, v, **F32_TOL)


@pytest.mark.parametrize(
    "x,q",
    [
        ([2.0, 0.0, 0.0], [-3.0, 0.0, 0.0]),
        ([1.0, 2.0, -2.0], [-0.5, -1.0, 1.0]),
        ([1.0, -1.0], [-4.0, 4.0]),
    ],
)
def test_rotation_trick_antipodal_input_is_a_proper_rotation_with_finite_gradient(x, q):
    x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    q = torch.tensor(q, dtype=torch.float64)
    out = estimators.rotation_trick(x, q)
    assert torch.equal(out, q)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    lam = q.norm() / x.detach().norm()
    J = jacobian(lambda t: estimators.rotation_trick(t, q), x.detach())
    R = J / lam
    assert_proper_rotation_taking(R, x.detach() / x.detach().norm(), q / q.norm())


def test_rotation_trick_general_case_is_a_proper_rotation():
    x = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    q = torch.tensor([1.5, 0.1, -0.4, 0.2], dtype=torch.float64)
    R = jacobian(lambda t: estimators.rotation_trick(t, q), x) / (q.norm() / x.norm())
    assert_proper_rotation_taking(R, x / x.norm(), q / q.norm())


def test_rotation_trick_same_direction_scales_only():
    x = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    q = 2 * x.detach()
    g = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    estimators.rotation_trick(x, q).backward(g)
    torch.testing.assert_close(x.grad, 2 * g)


def test_rotation_trick_zero_input_falls_back_to_identity_gradient():
    x = torch.zeros(2, 3, requires_grad=True)
    q = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    g = torch.tensor([[0.1, 0.2, 0.3], [1.0, -2.0, 3.0]])
    out = estimators.rotation_trick(x, q)
    assert torch.equal(out, q)
    out.backward(g)
    assert torch.equal(x.grad, g)


def test_straight_through_forward_is_q_and_gradient_is_identity():
    x = torch.randn(4, 5, requires_grad=True)
    q = torch.randn(4, 5)
    g = torch.randn(4, 5)
    out = estimators.straight_through(x, q)
    assert torch.equal(out, q)
    out.backward(g)
    assert torch.equal(x.grad, g)


def test_gumbel_straight_through_forward_is_one_hot_and_gradient_is_softmax_jacobian():
    logits = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    one_hot = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    out = estimators.gumbel_straight_through(one_hot, logits, temperature=2.0)
    assert torch.equal(out, one_hot)
    g = torch.tensor([[1.0, -1.0, 3.0]], dtype=torch.float64)
    out.backward(g)
    p = (logits.detach() / 2.0).softmax(-1)[0]
    expected = (torch.diag(p) - torch.outer(p, p)) @ g[0] / 2.0
    torch.testing.assert_close(logits.grad[0], expected)


def test_directional_reparam_without_noise_is_q_with_distance_gradient():
    x = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[1.0, 4.0, 4.0]], dtype=torch.float64, requires_grad=True)
    out = estimators.directional_reparam(x, q, noise_variance=0.0)
    torch.testing.assert_close(out, q.detach())
    g = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    out.backward(g)
    direction = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    # d out / d q = direction direction^T; d out / d x = I - direction direction^T
    torch.testing.assert_close(q.grad[0], direction * (direction @ g[0]))
    torch.testing.assert_close(x.grad[0], g[0] - direction * (direction @ g[0]))


def test_synchronized_update_keeps_value_and_scales_code_gradient():
    out = torch.randn(3, 4, requires_grad=True)
    q = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    result = estimators.synchronized_update(out, q, 0.25)
    assert torch.equal(result, out.detach())
    result.backward(g)
    torch.testing.assert_close(q.grad, 0.25 * g)
    assert torch.equal(out.grad, g)


# ---------------------------------------------------------------------------------------------------------------
# the rotation trick's closed-form backward (a custom autograd function)


def householder_rotation(x, q):
    """``R = I - 2 w w^T + 2 v u^T`` built explicitly for one pair of vectors (float64)."""
    u, v = x / x.norm(), q / q.norm()
    w = (u + v) / (u + v).norm()
    eye = torch.eye(x.shape[0], dtype=torch.float64)
    return eye - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)


def test_rotation_trick_grad_equals_lambda_R_transpose_g_in_float64():
    gen = torch.Generator().manual_seed(2)
    x, q, g = (torch.randn(6, 9, dtype=torch.float64, generator=gen) for _ in range(3))
    got = estimators.rotation_trick_grad(x, q, g)
    assert got.dtype == torch.float64
    for i in range(6):
        R = householder_rotation(x[i], q[i])
        torch.testing.assert_close(got[i], q[i].norm() / x[i].norm() * R.T @ g[i], atol=1e-12, rtol=1e-10)


def test_rotation_trick_backward_matches_the_function_and_saves_only_x_and_q():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=gen, requires_grad=True)
    q, g = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    out = estimators.rotation_trick(x, q)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2 and torch.equal(saved[0], x) and torch.equal(saved[1], q)
    out.backward(g)
    xd, qd, gd = x.detach().double(), q.double(), g.double()
    expected = torch.stack([qd[i].norm() / xd[i].norm() * householder_rotation(xd[i], qd[i]).T @ gd[i]
                            for i in range(4)])  # fmt: skip
    torch.testing.assert_close(x.grad, expected.float(), **F32_TOL)


def test_rotation_trick_gradient_of_an_expanded_input_sums_over_the_copies():
    # top-k: one token compared with k codes is an expanded (stride 0) view of the token
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 6, generator=gen, requires_grad=True)
    q, g = torch.randn(3, 2, 6, generator=gen), torch.randn(3, 2, 6, generator=gen)
    estimators.rotation_trick(x.expand(3, 2, 6), q).backward(g)
    xd, qd, gd = x.detach()[:, 0].double(), q.double(), g.double()
    expected = torch.stack([
        sum(qd[i, k].norm() / xd[i].norm() * householder_rotation(xd[i], qd[i, k]).T @ gd[i, k] for k in range(2))
        for i in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(x.grad[:, 0], expected.float(), **F32_TOL)


def test_rotation_trick_double_backward_is_linear_in_the_incoming_gradient():
    # d/dg <lambda R^T g, h> = lambda R h, with R and lambda constants
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    q, h = torch.randn(5, 4, dtype=torch.float64, generator=gen), torch.randn(5, 4, dtype=torch.float64, generator=gen)
    g = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    (grad_x,) = torch.autograd.grad(estimators.rotation_trick(x, q), x, g, create_graph=True)
    (grad_x * h).sum().backward()
    for i in range(5):
        R = householder_rotation(x[i].detach(), q[i])
        torch.testing.assert_close(g.grad[i], q[i].norm() / x[i].detach().norm() * R @ h[i])


def test_rotation_trick_backward_twice_with_retained_graph_is_the_same():
    x = torch.randn(4, 6, requires_grad=True)
    out = estimators.rotation_trick(x, torch.randn(4, 6))
    g = torch.randn(4, 6)
    out.backward(g, retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    out.backward(g)
    assert torch.equal(x.grad, first)


def test_rotation_trick_without_gradient_is_a_detached_copy_of_q():
    x, q = torch.randn(3, 4), torch.randn(3, 4)
    out = estimators.rotation_trick(x, q)
    assert torch.equal(out, q) and not out.requires_grad and out.data_ptr() != q.data_ptr()
    with torch.no_grad():
        assert not estimators.rotation_trick(x.requires_grad_(), q).requires_grad


def test_rotation_trick_near_antipodal_input_keeps_a_proper_rotation():
    x = torch.tensor([1.0, 2.0, -2.0, 0.5], dtype=torch.float64)
    q = -3.0 * x + torch.tensor([0.0, 0.0, 0.0, 1e-9], dtype=torch.float64)  # almost opposite
    R = jacobian(lambda t: estimators.rotation_trick(t, q), x) / (q.norm() / x.norm())
    assert torch.isfinite(R).all()
    assert_proper_rotation_taking(R, x / x.norm(), q / q.norm())
