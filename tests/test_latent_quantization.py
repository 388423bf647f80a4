import math

import pytest
import torch
import torch.nn.functional as F
from einops import pack
from torch import nn

from vector_quantize_pytorch import latent_quantization
from vector_quantize_pytorch.latent_quantization import LatentQuantize, LatentQuantizer


def fill_linear(lin, start):
    """Deterministic weights (the same formula is used in the reference script below)."""
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(start, -start, lin.weight.numel()).reshape(lin.weight.shape))
        lin.bias.copy_(torch.linspace(-0.1, 0.2, lin.bias.numel()))


def latents_of(quantizer, x):
    """Projected latents (b, n, c, d) of a channel-first image, computed independently of forward."""
    tokens = x.flatten(2).transpose(1, 2)
    return quantizer.project_in(tokens).unflatten(-1, (quantizer.num_codebooks, quantizer.codebook_dim))


def brute_force_level_indices(latents, grids):
    """Nearest value per latent dimension, first index on ties, by plain Python loops."""
    flat = latents.detach().reshape(-1, len(grids))
    out = torch.empty(flat.shape, dtype=torch.long)
    for row in range(flat.shape[0]):
        for i, grid in enumerate(grids):
            distances = [abs(flat[row, i].item() - v) for v in grid.tolist()]
            out[row, i] = distances.index(min(distances))
    return out.view(latents.shape)


def codes_by_hand(level_indices, grids):
    """The grid value each level index names, per latent dimension."""
    return torch.stack([grid[level_indices[..., i]] for i, grid in enumerate(grids)], dim=-1)


def mixed_radix(level_indices, levels):
    index, place = torch.zeros(level_indices.shape[:-1], dtype=torch.long), 1
    for i, level in enumerate(levels):
        index += level_indices[..., i] * place
        place *= level
    return index


# ----- the reference's usage examples -----------------------------------------------------------------------------


def test_seed_image_example():
    quantizer = LatentQuantize(levels=[5, 5, 8], dim=16, commitment_loss_weight=0.1, quantization_loss_weight=0.1)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, loss = quantizer(image_feats)
    assert quantized.shape == (1, 16, 32, 32)
    assert indices.shape == (1, 32, 32)
    assert loss.shape == ()
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()


def test_seed_sequence_and_video_examples():
    quantizer = LatentQuantize(levels=[5, 5, 8], dim=16, commitment_loss_weight=0.1, quantization_loss_weight=0.1)
    quantized, *_ = quantizer(torch.randn(1, 32, 16))
    assert quantized.shape == (1, 32, 16)
    quantized, indices, _ = quantizer(torch.randn(1, 16, 10, 32, 32))
    assert quantized.shape == (1, 16, 10, 32, 32)
    assert indices.shape == (1, 10, 32, 32)


def test_seed_multi_codebook_example():
    dim, num_codebooks = 9, 3
    model = LatentQuantize(levels=[4, 8, 16], dim=dim, num_codebooks=num_codebooks)
    input_tensor = torch.randn(2, 3, dim)
    output_tensor, indices, loss = model(input_tensor)
    assert output_tensor.shape == input_tensor.shape
    assert indices.shape == (2, 3, num_codebooks)
    assert loss.item() >= 0
    assert not model.has_projections
    # no projection: each feature group of 3 is quantized with the same three grids
    grids = [g.detach() for g in model.values_per_latent]
    expected = brute_force_level_indices(input_tensor.view(2, 3, 3, 3), grids)
    assert torch.equal(indices.long(), mixed_radix(expected, [4, 8, 16]))


# ----- agreement with the reference -------------------------------------------------------------------------

# Numbers printed by vector-quantize-pytorch 1.32.0 (~/ref-venv/bin/python, run outside the repo):
#     lq = LatentQuantize(levels=[5, 5, 8], dim=4); fill_linear(lq.project_in, 0.9); fill_linear(lq.project_out, 0.7)
#     x = torch.linspace(-1.5, 1.5, 24).reshape(1, 4, 2, 3); out, idx, loss = lq(x)   # training mode
#     print(loss.item(), out.flatten().tolist(), idx.tolist())
#     lq3 = LatentQuantize(levels=[5, 5, 8], dim=3); x3 = torch.linspace(-0.7, 0.6, 18).reshape(1, 3, 2, 3)
REF_LOSS = 0.026492122560739517
REF_OUT = [
    -0.5693181753158569, -0.6806818246841431, -0.8477272987365723, -0.9590909481048584, -0.7840908765792847,
    -0.6090909242630005, -0.23068180680274963, -0.24659091234207153, -0.2704545259475708, -0.2863636314868927,
    -0.20681817829608917, -0.12727272510528564, 0.10795454680919647, 0.1875, 0.3068181872367859,
    0.3863636255264282, 0.3704545199871063, 0.3545454442501068, 0.4465909004211426, 0.6215909123420715,
    0.8840909004211426, 1.0590909719467163, 0.9477272629737854, 0.8363636136054993,
]  # fmt: skip
REF_INDICES = [[[175, 125, 50], [0, 1, 2]]]
REF3_OUT = [-0.5] * 5 + [-0.25] * 3 + [0.0] * 3 + [0.25] * 3 + [0.375] * 4
REF3_INDICES = [[[155, 155, 185], [185, 185, 191]]]
REF3_LOSS = 0.002070261863991618


def test_matches_reference_image_with_projections():
    lq = LatentQuantize(levels=[5, 5, 8], dim=4)
    fill_linear(lq.project_in, 0.9)
    fill_linear(lq.project_out, 0.7)
    x = torch.linspace(-1.5, 1.5, 24).reshape(1, 4, 2, 3)
    out, indices, loss = lq(x)
    assert torch.equal(out.flatten(), torch.tensor(REF_OUT))
    assert indices.dtype == torch.int32 and indices.tolist() == REF_INDICES
    assert loss.item() == pytest.approx(REF_LOSS, rel=1e-6)
    out_eval, indices_eval, loss_eval = lq.eval()(x)
    assert torch.equal(out_eval, out) and torch.equal(indices_eval, indices)
    assert loss_eval.shape == () and loss_eval.item() == 0.0


def test_matches_reference_image_without_projections():
    lq = LatentQuantize(levels=[5, 5, 8], dim=3)
    out, indices, loss = lq(torch.linspace(-0.7, 0.6, 18).reshape(1, 3, 2, 3))
    assert out.flatten().tolist() == REF3_OUT
    assert indices.tolist() == REF3_INDICES
    assert loss.item() == pytest.approx(REF3_LOSS, rel=1e-6)


def test_state_dict_keys_and_initial_grids_match_reference():
    lq = LatentQuantize(levels=[5, 5, 8], dim=16)
    shapes = {k: tuple(v.shape) for k, v in lq.state_dict().items()}
    assert shapes == {
        "project_in.weight": (3, 16),
        "project_in.bias": (3,),
        "project_out.weight": (16, 3),
        "project_out.bias": (16,),
        "values_per_latent.0": (5,),
        "values_per_latent.1": (5,),
        "values_per_latent.2": (8,),
    }
    assert lq.values_per_latent[0].tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert lq.values_per_latent[2].tolist() == [k / 8 - 0.5 for k in range(8)]
    assert LatentQuantizer is LatentQuantize


def test_fixed_grids_are_buffers_outside_state_dict():
    lq = LatentQuantize(levels=[3, 4], dim=2, optimize_values=False)
    assert list(lq.state_dict()) == []
    assert list(lq.parameters()) == []
    assert [g.tolist() for g in lq.values_per_latent] == [[-0.5, 0.0, 0.5], [-0.5, -0.25, 0.0, 0.25]]
    assert lq.double().values_per_latent[1].dtype == torch.float64


def test_int_levels_repeat_over_codebook_dim():
    lq = LatentQuantize(levels=4, dim=16, codebook_dim=2)
    assert lq.codebook_dim == 2 and lq.codebook_size == 16
    assert {k: tuple(v.shape) for k, v in lq.state_dict().items() if k.startswith("values")} == {
        "values_per_latent.0": (4,),
        "values_per_latent.1": (4,),
    }


# ----- learned grids: indices and round trips ----------------------------------------------------------------


def train_values(lq, x, steps=5, lr=0.5):
    optimizer = torch.optim.SGD(lq.parameters(), lr=lr)
    for _ in range(steps):
        out, _, loss = lq(x)
        (loss + (out - x).pow(2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_indices_follow_learned_grids():
    torch.manual_seed(0)
    levels = [5, 4, 7]
    lq = LatentQuantize(levels=levels, dim=6)
    x = torch.randn(2, 6, 4, 4)
    before = [g.detach().clone() for g in lq.values_per_latent]
    train_values(lq, x)
    after = [g.detach() for g in lq.values_per_latent]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))

    lq.eval()
    out, indices, _ = lq(x)
    with torch.no_grad():
        latents = latents_of(lq, x)
    expected = mixed_radix(brute_force_level_indices(latents, after), levels)
    assert torch.equal(indices.long(), expected.view(2, 4, 4))
    assert torch.equal(lq.indices_to_codes(indices), out)
    codes = codes_by_hand(brute_force_level_indices(latents, after), after)
    assert torch.equal(lq.codes_to_indices(codes).long(), expected)


def test_indices_with_unsorted_grids():
    lq = LatentQuantize(levels=[3, 4], dim=2)
    with torch.no_grad():
        lq.values_per_latent[0].copy_(torch.tensor([0.9, -0.7, 0.1]))
        lq.values_per_latent[1].copy_(torch.tensor([0.3, 0.3, -0.2, 2.0]))  # a duplicate: first one wins
    x = torch.tensor([[[0.95, 0.31]], [[-0.5, -5.0]], [[0.2, 0.25]], [[0.0, 1.2]]])  # (4, 1, 2)
    out, indices, _ = lq.eval()(x)
    # dim 0 -> positions 0, 1, 2, 2; dim 1 -> 0, 2, 0, 3 (1.2 is nearer 2.0 than 0.3)
    assert indices.squeeze(-1).tolist() == [0 + 3 * 0, 1 + 3 * 2, 2 + 3 * 0, 2 + 3 * 3]
    assert torch.equal(out.squeeze(1), torch.tensor([[0.9, 0.3], [-0.7, -0.2], [0.1, 0.3], [0.1, 2.0]]))
    assert torch.equal(lq.indices_to_codes(indices), out)


def test_in_place_optimizer_updates_grids_only():
    torch.manual_seed(1)
    lq = LatentQuantize(levels=[5, 5], dim=4, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    assert isinstance(lq.in_place_codebook_optimizer, torch.optim.SGD)
    marker = torch.full((5,), 7.0)
    lq.values_per_latent[0].grad = marker.clone()
    before = [g.detach().clone() for g in lq.values_per_latent]
    x = torch.randn(3, 4, 2, 2, requires_grad=True)

    out, indices, loss = lq(x)
    after = [g.detach().clone() for g in lq.values_per_latent]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert torch.equal(lq.values_per_latent[0].grad, marker)  # the user's gradient is left alone
    assert lq.project_in.weight.grad is None
    # the output already uses the stepped grids
    assert torch.equal(lq.indices_to_codes(indices), out)
    (loss + out.sum()).backward()  # the graph is still intact

    lq.eval()
    lq(x)
    assert all(torch.equal(a, g.detach()) for a, g in zip(after, lq.values_per_latent))


def test_in_place_step_moves_grids_towards_latents():
    lq = LatentQuantize(levels=[3], dim=1, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.25))
    x = torch.tensor([[[0.4]], [[0.4]]])  # nearest value 0.5, loss (0.5 - 0.4)^2: gradient 2 * 0.1
    lq(x)
    assert lq.values_per_latent[0].tolist() == pytest.approx([-0.5, 0.0, 0.5 - 0.25 * 0.2])


# ----- losses and gradients -------------------------------------------------------------------------------


def test_training_loss_value_and_gradient_routing():
    torch.manual_seed(2)
    lq = LatentQuantize(levels=[5, 8], dim=2, commitment_loss_weight=0.3, quantization_loss_weight=0.05)
    x = torch.randn(4, 5, 2, requires_grad=True)
    out, _, loss = lq(x)
    assert loss.item() == pytest.approx(0.35 * (out - x).pow(2).mean().item(), rel=1e-6)

    # the output's gradient reaches the input unchanged and never the grids
    (grad_x,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    assert torch.equal(grad_x, torch.ones_like(x))
    assert torch.autograd.grad(out.sum(), list(lq.values_per_latent), allow_unused=True) == (None, None)

    # the loss trains the chosen grid values towards the inputs: d/dv of 0.3 * mean((v - x)^2)
    grads = torch.autograd.grad(loss, list(lq.values_per_latent))
    chosen = out.detach().reshape(-1, 2)
    inputs = x.detach().reshape(-1, 2)
    for i, grid in enumerate(lq.values_per_latent):
        expected = torch.zeros_like(grid)
        for v, target in zip(chosen[:, i], inputs[:, i]):
            expected[grid.detach().tolist().index(v.item())] += 0.3 * 2 * (v - target) / x.numel()
        assert torch.allclose(grads[i], expected, atol=1e-6)


def test_eval_loss_is_zero_scalar():
    lq = LatentQuantize(levels=[5, 5], dim=2).eval()
    _, _, loss = lq(torch.randn(2, 3, 2))
    assert loss.shape == () and loss.item() == 0.0 and loss.dtype == torch.float32


def test_dtypes():
    lq = LatentQuantize(levels=[5, 5], dim=2)
    out, indices, loss = lq(torch.randn(2, 3, 2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and indices.dtype == torch.int32 and loss.dtype == torch.float32
    out64, _, _ = lq(torch.randn(2, 3, 2, dtype=torch.float64))
    assert out64.dtype == torch.float64


# ----- layouts and helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, index_shape",
    [((2, 3), (2, 1)), ((2, 5, 3), (2, 5, 1)), ((2, 3, 4, 5), (2, 4, 5, 1)), ((2, 3, 2, 4, 5), (2, 2, 4, 5, 1))],
)
def test_keep_codebook_axis_and_round_trip(shape, index_shape):
    lq = LatentQuantize(levels=[5, 4, 3], dim=3, keep_num_codebooks_dim=True).eval()
    x = torch.randn(shape)
    out, indices, _ = lq(x)
    assert out.shape == x.shape and indices.shape == index_shape
    assert torch.equal(lq.indices_to_codes(indices), out)


def test_indices_to_codes_without_projection_out():
    torch.manual_seed(3)
    lq = LatentQuantize(levels=[5, 4], dim=6, num_codebooks=2).eval()
    x = torch.randn(1, 6, 2, 3)
    _, indices, _ = lq(x)
    codes = lq.indices_to_codes(indices, project_out=False)
    assert codes.shape == (1, 4, 2, 3)
    grids = [g.detach() for g in lq.values_per_latent]
    with torch.no_grad():
        latents = latents_of(lq, x)  # (1, 6, 2, 2): tokens, codebooks, latent dims
    by_hand = codes_by_hand(brute_force_level_indices(latents, grids), grids)
    expected = by_hand.flatten(-2).transpose(1, 2).reshape(1, 4, 2, 3)
    assert torch.equal(codes, expected)


def test_implicit_codebook_enumerates_current_grids():
    lq = LatentQuantize(levels=[3, 2], dim=2)
    with torch.no_grad():
        lq.values_per_latent[1].copy_(torch.tensor([-0.3, 0.7]))
    expected = torch.tensor([[-0.5, -0.3], [0.0, -0.3], [0.5, -0.3], [-0.5, 0.7], [0.0, 0.7], [0.5, 0.7]])
    assert torch.equal(lq.implicit_codebook, expected)


def test_quantize_and_project_matches_forward():
    torch.manual_seed(4)
    lq = LatentQuantize(levels=[5, 5, 8], dim=16).eval()
    x = torch.randn(2, 16, 3, 4)
    out, indices, _ = lq(x)
    tokens, ps = pack([x.movedim(1, -1)], "b * d")
    z = lq.project_in(tokens).unflatten(-1, (1, 3))
    codes, out2, indices2 = lq.quantize_and_project(z, True, ps)
    assert codes.shape == (2, 12, 3)
    assert torch.equal(out2, out) and torch.equal(indices2, indices)


def test_chunked_search_equals_single_block(monkeypatch):
    torch.manual_seed(5)
    lq = LatentQuantize(levels=[5, 7, 3], dim=3).eval()
    x = torch.randn(4, 37, 3)
    _, expected, _ = lq(x)
    monkeypatch.setattr(latent_quantization, "MAX_DISTANCES", 50)
    _, chunked, _ = lq(x)
    assert torch.equal(chunked, expected)


def test_infinite_inputs_give_valid_indices():
    lq = LatentQuantize(levels=[5, 8], dim=2).eval()
    _, indices, _ = lq(torch.tensor([[[math.inf, -math.inf]]]))
    assert 0 <= indices.item() < lq.codebook_size


# ----- argument checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(levels=[5, 0], dim=2), ValueError, "levels"),
        (dict(levels="55", dim=2), TypeError, "levels"),
        (dict(levels=4, dim=2), ValueError, "codebook_dim"),
        (dict(levels=[4, 4], dim=2, codebook_dim=3), ValueError, "codebook_dim"),
        (dict(levels=[4, 4], dim=0), ValueError, "dim"),
        (dict(levels=[4, 4], dim=2.0), TypeError, "dim"),
        (dict(levels=[4, 4], dim=2, num_codebooks=0), ValueError, "num_codebooks"),
        (dict(levels=[4, 4], dim=2, commitment_loss_weight=-1.0), ValueError, "commitment_loss_weight"),
        (dict(levels=[4, 4], dim=2, quantization_loss_weight="x"), TypeError, "quantization_loss_weight"),
        (dict(levels=[4, 4], dim=2, keep_num_codebooks_dim=1), TypeError, "keep_num_codebooks_dim"),
        (dict(levels=[4, 4], dim=2, in_place_codebook_optimizer=3), TypeError, "in_place_codebook_optimizer"),
        (
            dict(levels=[4, 4], dim=2, optimize_values=False, in_place_codebook_optimizer=torch.optim.SGD),
            ValueError,
            "in_place_codebook_optimizer",
        ),
        (dict(levels=[2**16, 2**16], dim=2), ValueError, "levels"),
    ],
)
def test_invalid_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        LatentQuantize(**kwargs)


def test_wrong_input_feature_size():
    lq = LatentQuantize(levels=[5, 5, 8], dim=16)
    with pytest.raises(ValueError, match="16"):
        lq(torch.randn(1, 32, 8))
    with pytest.raises(ValueError, match="16"):
        lq(torch.randn(1, 8, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        lq(torch.ones(1, 4, 16, dtype=torch.long))


def test_loss_sends_the_quantization_term_gradient_to_the_input():
    """The commitment term trains the grids only; its input gradient (through the straight-through path)
    would cancel the quantization term's when the weights are equal, leaving the encoder no gradient."""
    torch.manual_seed(0)
    quantizer = LatentQuantize(levels=[5, 5, 8], dim=3, commitment_loss_weight=0.1, quantization_loss_weight=0.1)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out, _, loss = quantizer(z)
    loss.backward()
    expected = 0.1 * 2 * (z - out).detach() / z.numel()
    torch.testing.assert_close(z.grad, expected)
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in quantizer.values_per_latent)


def test_first_nearest_equals_argmin_with_ties_nans_and_infinities():
    from vector_quantize_pytorch.latent_quantization import _first_nearest

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        grid = torch.randint(-3, 4, (6, 1, 3), generator=generator).float()
        grid[4:, :, 0] = math.inf  # padding of a shorter grid
        rows = torch.randint(-6, 7, (40, 3), generator=generator).float() / 2  # many ties half-way
        rows[torch.rand(rows.shape, generator=generator) < 0.1] = math.nan
        rows[torch.rand(rows.shape, generator=generator) < 0.1] = math.inf
        rows[torch.rand(rows.shape, generator=generator) < 0.1] = -math.inf
        expected = (grid - rows).abs().argmin(0)
        assert torch.equal(_first_nearest(grid, rows), expected)


def plain_autograd_step(lq, x):
    """The training loss and output of ``lq`` written with plain autograd ops (F.linear, advanced indexing)
    and brute-force nearest values: the commitment term reaches the grids and project_out, the quantization
    term the input, the output's gradient the latents (straight through)."""
    b, d = x.shape[:2]
    tokens = x.flatten(2).transpose(1, 2).reshape(-1, d)
    latents = F.linear(tokens, lq.project_in.weight, lq.project_in.bias)
    grids = list(lq.values_per_latent)
    level_indices = brute_force_level_indices(latents, grids)
    chosen = torch.stack([grid[level_indices[:, i]] for i, grid in enumerate(grids)], dim=-1)
    codes = chosen.detach() + (latents - latents.detach())
    out = F.linear(codes, lq.project_out.weight, lq.project_out.bias)
    out_for_commitment = F.linear(chosen, lq.project_out.weight, lq.project_out.bias)
    loss = lq.commitment_loss_weight * F.mse_loss(tokens.detach(), out_for_commitment)
    loss = loss + lq.quantization_loss_weight * F.mse_loss(out_for_commitment.detach(), tokens)
    out = out.view(b, -1, out.shape[-1]).transpose(1, 2).reshape(x.shape)
    return out, loss


@pytest.mark.parametrize("weights", [(0.1, 0.1), (0.3, 0.05), (0.0, 0.2)])
def test_training_gradients_match_plain_autograd(weights):
    torch.manual_seed(6)
    lq = LatentQuantize(
        levels=[5, 5, 8], dim=16, commitment_loss_weight=weights[0], quantization_loss_weight=weights[1]
    )
    x = torch.randn(2, 16, 3, 5, requires_grad=True)
    out, _, loss = lq(x)
    (out.sin().mean() + loss).backward()
    grads = {name: p.grad.clone() for name, p in lq.named_parameters()}
    grad_x = x.grad.clone()

    lq.zero_grad()
    x.grad = None
    expected_out, expected_loss = plain_autograd_step(lq, x)
    (expected_out.sin().mean() + expected_loss).backward()
    assert torch.equal(out, expected_out)
    torch.testing.assert_close(loss, expected_loss)
    for name, p in lq.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    torch.testing.assert_close(grad_x, x.grad)


def test_forward_hooks_on_the_projections_still_run():
    """A hooked projection is called as a module (twice for project_out: the output and the loss); the
    results equal the unhooked ones, where the loss applies project_out itself."""
    torch.manual_seed(8)
    lq = LatentQuantize(levels=[5, 5, 8], dim=16)
    x = torch.randn(1, 16, 2, 2)
    out, _, loss = lq(x)
    grads = torch.autograd.grad(out.sin().sum() + loss, list(lq.parameters()))
    seen = []
    lq.project_in.register_forward_hook(lambda module, args, output: seen.append("in"))
    lq.project_out.register_forward_hook(lambda module, args, output: seen.append("out"))
    hooked, _, hooked_loss = lq(x)
    assert seen == ["in", "out", "out"]
    assert torch.equal(hooked, out)
    torch.testing.assert_close(hooked_loss, loss)
    hooked_grads = torch.autograd.grad(hooked.sin().sum() + hooked_loss, list(lq.parameters()))
    for grad, hooked_grad in zip(grads, hooked_grads):
        torch.testing.assert_close(grad, hooked_grad)


@pytest.mark.parametrize("dim", [2, 7])  # project_out from 3 latents to fewer or more features
def test_projections_without_bias(dim):
    torch.manual_seed(9)
    lq = LatentQuantize(levels=[5, 5, 8], dim=dim)
    lq.project_in = nn.Linear(dim, 3, bias=False)
    lq.project_out = nn.Linear(3, dim, bias=False)
    x = torch.randn(2, 4, dim, requires_grad=True)
    out, _, loss = lq(x)
    (out.sin().sum() + loss).backward()
    grads = [p.grad.clone() for p in lq.parameters()] + [x.grad.clone()]

    lq.zero_grad()
    x.grad = None
    lq.project_out.register_forward_hook(lambda module, args, output: None)  # the unfused path
    hooked, _, hooked_loss = lq(x)
    (hooked.sin().sum() + hooked_loss).backward()
    assert torch.equal(hooked, out)
    torch.testing.assert_close(hooked_loss, loss)
    for grad, expected in zip(grads, [p.grad for p in lq.parameters()] + [x.grad]):
        torch.testing.assert_close(grad, expected)
