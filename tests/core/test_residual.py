"""The shared residual stack (core/residual.py), driven by a toy family of fixed random codebooks so that every
expectation is computed independently with plain torch: the greedy loop, quantize dropout (per batch and per
sample), masks, the residual gradient fraction and decoding."""

import math

import pytest
import torch
from torch import nn

from vector_quantize_pytorch.core import residual as residual_module
from vector_quantize_pytorch.core.residual import ResidualStack, frac_gradient, round_up_cutoff


class ToyStack(ResidualStack):
    """A residual stack of fixed codebooks; nearest code by brute force, loss = masked MSE, masked -> zero, -1."""

    def __init__(self, codebooks, cutoff_index=0, multiple_of=1, per_sample=False, quantize_dropout=True):
        super().__init__()
        self.books = [torch.as_tensor(c) for c in codebooks]
        self.layers = nn.ModuleList(nn.Identity() for _ in codebooks)
        self._init_dropout(quantize_dropout, cutoff_index, multiple_of, per_sample)

    def _quantize_layer(self, index, residual, mask, *, previous):
        book = self.books[index]
        indices = torch.cdist(residual.detach(), book.expand(residual.shape[0], -1, -1)).argmin(-1)
        codes = book[indices]
        out = codes + (residual - residual.detach())  # straight-through, forward value exactly the code
        per_token = (residual - codes).pow(2).mean(-1)
        if mask is not None:
            out = out * mask.unsqueeze(-1)
            indices = torch.where(mask, indices, torch.full_like(indices, -1))
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        else:
            loss = per_token.mean()
        return out, indices, loss

    def _layer_codes(self, index, indices, previous):
        return self.books[index][indices]


def toy_books(num_layers=3, num_codes=5, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_codes, dim, generator=g) / (i + 1) for i in range(num_layers)]


def greedy_by_hand(books, x):
    """Independent greedy residual quantization of tokens ``(N, d)``: codes summed and indices ``(N, q)``."""
    residual, total, chosen = x.clone(), torch.zeros_like(x), []
    for book in books:
        idx = ((residual.unsqueeze(1) - book) ** 2).sum(-1).argmin(-1)
        chosen.append(idx)
        residual = residual - book[idx]
        total = total + book[idx]
    return total, torch.stack(chosen, dim=-1)


# ---------------------------------------------------------------- cutoff rounding and dropout plan


@pytest.mark.parametrize("multiple_of", [1, 2, 3, 4])
def test_round_up_cutoff_keeps_the_smallest_multiple_of_layers(multiple_of):
    for cutoff in range(12):
        kept = round_up_cutoff(cutoff, multiple_of) + 1
        assert kept % multiple_of == 0 and kept >= cutoff + 1
        assert kept - multiple_of < cutoff + 1  # the smallest such multiple


@pytest.mark.parametrize("num_layers,cutoff_index,multiple_of", [(6, 0, 1), (6, 2, 1), (6, 0, 2), (7, 1, 4), (5, 4, 1)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_dropout_plan_stays_in_range_and_covers_every_allowed_cutoff(num_layers, cutoff_index, multiple_of, per_sample):
    stack = ToyStack(toy_books(num_layers), cutoff_index, multiple_of, per_sample)
    allowed = {
        min(math.ceil(c / multiple_of) * multiple_of, num_layers) - 1 for c in range(cutoff_index + 1, num_layers + 1)
    }
    seen = set()
    for seed in range(80):
        cutoffs = stack._dropout_plan(4, "cpu", seed)
        assert cutoffs.shape == ((4,) if per_sample else ()) and cutoffs.dtype == torch.long
        values = cutoffs.reshape(-1).tolist()
        assert set(values) <= allowed
        for c in values:
            assert round_up_cutoff(c, multiple_of) == c or c == num_layers - 1
        seen |= set(values)
    assert seen == allowed


def test_dropout_plan_is_a_function_of_the_seed():
    stack = ToyStack(toy_books(8), per_sample=True)
    first = stack._dropout_plan(16, "cpu", 123)
    torch.manual_seed(999)  # the global generator plays no part when a seed is given
    again = stack._dropout_plan(16, "cpu", 123)
    assert torch.equal(first, again)
    assert len(set(first.tolist())) > 1  # per sample: the samples draw different cutoffs
    others = [stack._dropout_plan(16, "cpu", seed) for seed in range(5)]
    assert any(not torch.equal(first, o) for o in others)
    torch.manual_seed(5)
    unseeded = stack._dropout_plan(16, "cpu", None)
    torch.manual_seed(5)
    assert torch.equal(unseeded, stack._dropout_plan(16, "cpu", None))  # reproducible under torch.manual_seed


def test_invalid_dropout_arguments_name_the_argument():
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index"):
        ToyStack(toy_books(3), cutoff_index=3)
    with pytest.raises(ValueError, match="quantize_dropout_cutoff_index"):
        ToyStack(toy_books(3), cutoff_index=-1)
    with pytest.raises(ValueError, match="quantize_dropout_multiple_of"):
        ToyStack(toy_books(3), multiple_of=0)


def test_a_single_layer_never_drops():
    assert not ToyStack(toy_books(1)).quantize_dropout


# ---------------------------------------------------------------- the loop


def test_loop_equals_greedy_residual_quantization_by_hand():
    books = toy_books(num_layers=4, num_codes=7, dim=3)
    stack = ToyStack(books)
    x = torch.randn(2, 9, 3)
    quantized, indices, losses, residuals = stack._residual_loop(x, None, None)
    expected, expected_indices = greedy_by_hand(books, x.reshape(-1, 3))
    assert torch.equal(indices.reshape(-1, 4), expected_indices)
    assert torch.allclose(quantized.reshape(-1, 3), expected, atol=1e-6)
    assert len(losses) == 4 and len(residuals) == 4
    assert torch.equal(residuals[0][0], x) and residuals[0][1] is None


def test_batch_dropout_masks_the_later_layers():
    """The dropped layers give zero codes, index -1 and zero loss, and their residuals come with an all-False
    mask (so shared-codebook maintenance takes no row from them)."""
    books = toy_books(num_layers=4)
    stack = ToyStack(books)
    x = torch.randn(2, 5, 4)
    quantized, indices, losses, residuals = stack._residual_loop(x, None, torch.tensor(1))
    full_q, full_i, *_ = ToyStack(books[:2])._residual_loop(x, None, None)
    assert torch.equal(indices[..., :2], full_i) and (indices[..., 2:] == -1).all()
    assert torch.equal(quantized, full_q)
    assert losses[2] == 0 and losses[3] == 0 and len(residuals) == 4
    assert [bool(mask.all()) for _, mask in residuals] == [True, True, False, False]
    assert not residuals[2][1].any() and not residuals[3][1].any()
    stacked = stack._stack_losses(losses, x)
    assert stacked.shape == (4,) and (stacked[2:] == 0).all()


def test_per_sample_dropout_masks_each_sample_from_its_own_cutoff():
    books = toy_books(num_layers=4)
    stack = ToyStack(books, per_sample=True)
    x = torch.randn(3, 5, 4)
    cutoffs = torch.tensor([0, 3, 1])
    quantized, indices, losses, residuals = stack._residual_loop(x, None, cutoffs)
    for b, c in enumerate(cutoffs.tolist()):
        expected_q, expected_i = greedy_by_hand(books[: c + 1], x[b])
        assert torch.equal(indices[b, :, : c + 1], expected_i)
        assert (indices[b, :, c + 1 :] == -1).all()
        assert torch.allclose(quantized[b], expected_q, atol=1e-6)
    # the mask each layer ran under is the set of samples that keep it
    for layer, (_, mask) in enumerate(residuals):
        assert torch.equal(mask, (cutoffs >= layer).unsqueeze(-1).expand(3, 5))
    # a layer's loss averages over the tokens that kept it only
    layer2 = x[1] - books[0][indices[1, :, 0]] - books[1][indices[1, :, 1]]
    assert torch.allclose(losses[2], (layer2 - books[2][indices[1, :, 2]]).pow(2).mean())


def test_user_mask_and_dropout_combine():
    stack = ToyStack(toy_books(num_layers=3), per_sample=True)
    x = torch.randn(2, 4, 4)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    _, indices, _, residuals = stack._residual_loop(x, mask, torch.tensor([2, 0]))
    assert (indices[~mask] == -1).all()
    assert (indices[1, :, 1:] == -1).all()
    assert torch.equal(residuals[1][1], torch.stack([mask[0], torch.zeros(4, dtype=torch.bool)]))


@pytest.mark.parametrize("frac", [0.0, 0.25, 1.0])
def test_quant_grad_frac_scales_the_gradient_through_the_residual(frac):
    """Straight-through layers: d output / d x = sum_l (1 - frac)^l, exactly."""
    stack = ToyStack(toy_books(num_layers=3))
    x = torch.randn(2, 5, 4, requires_grad=True)
    quantized, *_ = stack._residual_loop(x, None, None, quant_grad_frac=frac)
    (grad,) = torch.autograd.grad(quantized.sum(), x)
    assert torch.allclose(grad, torch.full_like(grad, sum((1 - frac) ** l for l in range(3))))


def test_frac_gradient_keeps_the_value_and_scales_the_gradient():
    t = torch.randn(5, requires_grad=True)
    for frac in (0.0, 0.3, 1.0):
        out = frac_gradient(t, frac)
        assert torch.equal(out, t)
        (grad,) = torch.autograd.grad(out.sum(), t, allow_unused=True) if frac > 0 else (None,)
        if frac > 0:
            assert torch.allclose(grad, torch.full_like(grad, frac))
        else:
            assert not out.requires_grad


# ---------------------------------------------------------------- decoding


def test_decoding_reproduces_the_loop_bit_for_bit():
    """Eight layers of 7-dimensional codes: an order of summation other than the loop's changes the last bits."""
    stack = ToyStack(toy_books(num_layers=8, num_codes=11, dim=7))
    x = torch.randn(3, 40, 7)
    quantized, indices, *_ = stack._residual_loop(x, None, None)
    codes = stack._codes_from_token_indices(indices)
    assert codes.shape == (8, 3, 40, 7)
    assert torch.equal(stack._sum_in_layer_order(codes), quantized)


def test_decoding_gives_zero_codes_for_dropped_and_missing_layers():
    books = toy_books(num_layers=4)
    stack = ToyStack(books)
    indices = torch.tensor([[[1, -1], [0, 2]]])  # (1, 2, 2): two of four layers given
    codes = stack._codes_from_token_indices(indices)
    assert codes.shape == (4, 1, 2, 4)
    assert torch.equal(codes[0, 0], books[0][[1, 0]])
    assert torch.equal(codes[1, 0, 1], books[1][2])
    assert (codes[1, 0, 0] == 0).all() and (codes[2:] == 0).all()
    with pytest.raises(ValueError, match="layers"):
        stack._codes_from_token_indices(torch.zeros(1, 2, 5, dtype=torch.long))


@pytest.mark.parametrize("cutoffs", [torch.tensor(1), torch.tensor([0, 3, 1])], ids=["per batch", "per sample"])
def test_skipping_the_layers_every_sample_drops_equals_running_them_masked(cutoffs, monkeypatch):
    """Eager CPU skips the layers after the largest cutoff; accelerators and torch.compile run them masked."""
    books = toy_books(num_layers=4)
    x = torch.randn(3, 5, 4)
    stack = ToyStack(books, per_sample=cutoffs.ndim == 1)
    skipped = stack._residual_loop(x, None, cutoffs)
    monkeypatch.setattr(residual_module, "_last_layer_to_run", lambda cutoffs, num_quantizers: num_quantizers - 1)
    masked = stack._residual_loop(x, None, cutoffs)
    assert torch.equal(skipped[0], masked[0]) and torch.equal(skipped[1], masked[1])
    assert torch.equal(stack._stack_losses(skipped[2], x), stack._stack_losses(masked[2], x))
    for (r_skip, m_skip), (r_mask, m_mask) in zip(skipped[3], masked[3]):
        assert torch.equal(r_skip, r_mask) and torch.equal(m_skip, m_mask)


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_layer_every_sample_drops_leaves_every_state_as_skipping_it_does(per_sample, monkeypatch):
    """One semantics on every device: running the dropped layers masked (accelerators, torch.compile) changes
    no statistic, moment, code or counter that skipping them (eager CPU) leaves alone. (Dead-code expiry
    and k-means initialisation are left out: a masked layer still draws its seeds from the default generator, so
    later random choices differ as they would with another seed.)"""
    from vector_quantize_pytorch import ResidualVQ

    def trained(run_every_layer: bool):
        if run_every_layer:
            monkeypatch.setattr(residual_module, "_last_layer_to_run", lambda cutoffs, q: q - 1)
        torch.manual_seed(0)
        batches = torch.randn(3, 3, 6, 4)
        rvq = ResidualVQ(dim=4, num_quantizers=4, codebook_size=8, quantize_dropout=True, affine_param=True,
                         quantize_dropout_per_sample=per_sample)  # fmt: skip
        for step, batch in enumerate(batches):
            rvq(batch, rand_quantize_dropout_fixed_seed=step)
        monkeypatch.undo()
        return rvq.state_dict()

    skipped, masked = trained(False), trained(True)
    moved = [name for name in skipped if not torch.equal(skipped[name], masked[name])]
    assert moved == []
