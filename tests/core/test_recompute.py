"""Activation checkpointing (core/recompute.py): the recompute in backward changes no state and reproduces the
forward exactly, so a checkpointed training run equals the plain one bit for bit, for every family with state."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import vector_quantize_pytorch as vqp
from vector_quantize_pytorch.core import recompute

DIM = 8


def generator(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 + step)


class Block(nn.Module):
    """encoder -> quantizer -> decoder: what a user wraps in a checkpoint."""

    def __init__(self, quantizer: nn.Module, call=None, dim: int = DIM):
        super().__init__()
        self.encoder = nn.Linear(dim, dim)
        self.quantizer = quantizer
        self.decoder = nn.Linear(dim, dim)
        self.call = call or (lambda q, z: q(z))

    def forward(self, x):
        out = self.call(self.quantizer, self.encoder(x))
        quantized, indices = out[0], out[1]
        aux = out[2].sum() if len(out) > 2 else quantized.new_zeros(())
        return self.decoder(quantized), indices, aux


def train(make, steps: int = 3, checkpointed=None, lr: float = 0.1):
    """``steps`` SGD steps; per step the outputs, indices, input and parameter gradients; then the state."""
    torch.manual_seed(0)
    model = make().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(1)
    records = []
    for step in range(steps):
        x = torch.randn(2, 12, DIM, generator=generator(step)).requires_grad_()
        out, indices, aux = checkpointed(model, x) if checkpointed else model(x)
        optimizer.zero_grad()
        (out.pow(2).mean() + aux).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        records.append({"out": out.detach(), "indices": indices, "x.grad": x.grad, **grads})
        optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return records, state, model


def assert_identical(expected, actual):
    (expected_records, expected_state, _), (records, state, _) = expected, actual
    for step, (want, got) in enumerate(zip(expected_records, records)):
        assert want.keys() == got.keys(), step
        for key in want:
            assert torch.equal(want[key], got[key]), f"step {step}: {key}"
    assert expected_state.keys() == state.keys()
    for key in expected_state:
        assert torch.equal(expected_state[key], state[key]), f"state {key}"


def with_context(model, x):
    return torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False, context_fn=recompute.checkpoint_contexts)


FAMILIES = {
    "vq_ema": lambda: Block(vqp.VectorQuantize(dim=DIM, codebook_size=16, decay=0.8)),
    "vq_kmeans_dead_codes": lambda: Block(
        vqp.VectorQuantize(dim=DIM, codebook_size=32, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.5)
    ),
    "vq_affine": lambda: Block(vqp.VectorQuantize(dim=DIM, codebook_size=16, affine_param=True)),
    "vq_cosine_heads": lambda: Block(
        vqp.VectorQuantize(
            dim=DIM,
            codebook_size=16,
            heads=2,
            separate_codebook_per_head=True,
            use_cosine_sim=True,
            kmeans_init=True,
            kmeans_iters=2,
            threshold_ema_dead_code=1.0,
        )
    ),
    "vq_learnable": lambda: Block(
        vqp.VectorQuantize(dim=DIM, codebook_size=16, learnable_codebook=True, ema_update=False)
    ),
    "residual_vq_dropout": lambda: Block(
        vqp.ResidualVQ(
            dim=DIM,
            num_quantizers=3,
            codebook_size=16,
            quantize_dropout=True,
            kmeans_init=True,
            kmeans_iters=2,
            threshold_ema_dead_code=1.0,
        )
    ),
    "residual_vq_shared_codebook": lambda: Block(
        vqp.ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=32, shared_codebook=True, threshold_ema_dead_code=2.0)
    ),
    "grouped_residual_vq": lambda: Block(
        vqp.GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=16, kmeans_init=True, kmeans_iters=2)
    ),
    "simvq": lambda: Block(vqp.SimVQ(dim=DIM, codebook_size=16)),
    "lfq": lambda: Block(vqp.LFQ(dim=DIM, codebook_size=16, entropy_loss_weight=0.1)),
    "fsq": lambda: Block(vqp.FSQ(levels=[5, 4], dim=DIM)),
    "latent_quantize": lambda: Block(vqp.LatentQuantize(dim=DIM, levels=[5, 5])),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointed_training_equals_the_plain_run(family):
    make = FAMILIES[family]
    assert_identical(train(make), train(make, checkpointed=with_context))


def test_the_reference_bug_plain_checkpoint_updates_twice_and_warns():
    """Without the context the recompute updates the EMA statistics a second time (what the issue measured):
    this is what the tests above would catch. It is not silent: the forward warns, naming the fix."""
    make = FAMILIES["vq_ema"]
    plain = lambda model, x: torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    _, expected, _ = train(make, steps=1)
    with pytest.warns(UserWarning, match="context_fn=vector_quantize_pytorch.checkpoint_contexts"):
        _, twice, _ = train(make, steps=1, checkpointed=plain)
    key = "quantizer._codebook.cluster_size"
    assert not torch.equal(expected[key], twice[key])


def test_the_saved_tensor_hooks_probe():
    assert not recompute.saved_tensor_hooks_active()
    seen = []

    def block(x):
        seen.append(recompute.saved_tensor_hooks_active())
        return x.sin().sum()

    x = torch.randn(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).backward()
    assert seen == [True, True]  # the forward and the recompute
    with torch.autograd.graph.save_on_cpu():
        assert recompute.saved_tensor_hooks_active()
    with torch.autograd.graph.disable_saved_tensors_hooks("an outer disable"):
        assert not recompute.saved_tensor_hooks_active()  # the probe restores the caller's setting
    assert not recompute.saved_tensor_hooks_active()


@pytest.mark.parametrize("family", ["vq_ema", "residual_vq_dropout", "latent_quantize"])
def test_only_a_state_changing_forward_under_hooks_without_the_context_warns_and_only_once(family, recwarn):
    quantizer = FAMILIES[family]().quantizer
    x = torch.randn(2, 12, DIM, requires_grad=True)
    plain = lambda: torch.utils.checkpoint.checkpoint(lambda t: quantizer(t)[0], x, use_reentrant=False)
    quantizer(x)  # training, no hooks
    vqp.checkpoint(lambda t: quantizer(t)[0], x).sum().backward()  # our context
    quantizer.eval()
    plain().sum()  # eval changes nothing
    quantizer.train()
    with torch.no_grad():
        quantizer(x)
    assert not [w for w in recwarn if "checkpoint_contexts" in str(w.message)]
    with pytest.warns(UserWarning, match=f"^{type(quantizer).__name__} changes its state") as caught:
        plain().sum().backward()
        plain().sum().backward()
    assert sum("checkpoint_contexts" in str(w.message) for w in caught) == 1
    assert caught[0].filename == __file__  # points at the caller of the quantizer


def test_the_checkpoint_helper_and_a_combined_selective_policy():
    make = FAMILIES["vq_kmeans_dead_codes"]
    expected = train(make)
    assert_identical(expected, train(make, checkpointed=lambda m, x: vqp.checkpoint(m, x)))

    if not hasattr(torch.utils.checkpoint, "CheckpointPolicy"):
        pytest.skip("selective activation checkpointing (CheckpointPolicy) needs torch 2.4 or later")
    CheckpointPolicy = torch.utils.checkpoint.CheckpointPolicy
    create_selective_checkpoint_contexts = torch.utils.checkpoint.create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    selective = functools.partial(create_selective_checkpoint_contexts, policy)
    assert_identical(expected, train(make, checkpointed=lambda m, x: vqp.checkpoint(m, x, context_fn=selective)))


def test_two_calls_of_one_quantizer_in_a_region_replay_in_order():
    """The second call sees the state the first one left: each replays its own."""

    def twice(q, z):
        first = q(z)
        second = q(z * 0.5)
        return first[0] + second[0], torch.stack((first[1], second[1]), -1), first[2] + second[2]

    make = lambda: Block(vqp.VectorQuantize(dim=DIM, codebook_size=16, decay=0.8, threshold_ema_dead_code=1.0), twice)
    assert_identical(train(make), train(make, checkpointed=with_context))


def test_a_checkpoint_around_the_quantizer_alone_and_retained_graphs():
    make = FAMILIES["residual_vq_dropout"]
    torch.manual_seed(0)
    plain, checkpointed = make().train(), make().train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, DIM, generator=generator(0))
    z1 = plain.encoder(x)
    z2 = checkpointed.encoder(x)
    torch.manual_seed(5)
    expected = plain.quantizer(z1)
    torch.manual_seed(5)
    got = vqp.checkpoint(checkpointed.quantizer, z2)
    state = {k: v.clone() for k, v in checkpointed.state_dict().items()}
    for _ in range(2):  # a second backward recomputes again: still no change
        checkpointed.zero_grad()
        got[0].pow(2).sum().backward(retain_graph=True)
    expected[0].pow(2).sum().backward()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert torch.equal(plain.encoder.weight.grad, checkpointed.encoder.weight.grad)
    for key, value in checkpointed.state_dict().items():
        assert torch.equal(value, state[key]), key
        assert torch.equal(value, plain.state_dict()[key]), key


def test_eval_mode_and_no_grad_record_nothing():
    quantizer = vqp.VectorQuantize(dim=DIM, codebook_size=16)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    frame_contexts = recompute.checkpoint_contexts()
    with frame_contexts[0]:
        quantizer.eval()
        quantizer(x)
    assert frame_contexts[0].frame.records == []
    quantizer.train()
    with frame_contexts[0]:
        quantizer(x)
    assert len(frame_contexts[0].frame.records) == 1


def test_in_place_codebook_optimizers_are_refused():
    quantizer = vqp.LatentQuantize(
        dim=DIM, levels=[5, 5], in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1)
    )
    with pytest.raises(ValueError, match="in_place_codebook_optimizer"):
        vqp.checkpoint(quantizer, torch.randn(2, 12, DIM, requires_grad=True))


def test_a_recompute_that_calls_other_quantizers_is_an_error():
    first, second = vqp.VectorQuantize(dim=DIM, codebook_size=16), vqp.VectorQuantize(dim=DIM, codebook_size=16)
    calls = iter([first, second])
    fn = lambda x: next(calls)(x)[0]
    out = vqp.checkpoint(fn, torch.randn(2, 12, DIM, requires_grad=True))
    with pytest.raises(RuntimeError, match="same order"):
        out.sum().backward()


# ------------------------------------------------------------------------------- the mechanism on a toy module


class Counter(nn.Module):
    """A module whose training forward changes a buffer, a parameter and a Python flag, and whose output
    depends on all three."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0
        self.seen_recompute = []

    @recompute.stateful_forward
    def forward(self, x):
        self.seen_recompute.append(recompute.is_recompute())
        out = x * (self.scale + 0) + self.count + self.calls  # (the sum is saved, not the parameter)
        with torch.no_grad():
            self.count.add_(1)
            self.scale.mul_(2)
        self.calls += 1
        return out


def test_toy_module_state_is_replayed_and_restored():
    checkpointed = Counter()
    y = torch.ones(3, requires_grad=True)
    out = vqp.checkpoint(checkpointed, y)
    out.sum().backward()
    assert checkpointed.seen_recompute == [False, True]
    assert torch.equal(out, torch.ones(3))  # x * 1 + 0 + 0: the state before the update
    assert checkpointed.count == 1 and checkpointed.scale == 2 and checkpointed.calls == 1
    assert torch.equal(y.grad, torch.ones(3))  # d(x * scale)/dx with the scale before the update
    assert torch.equal(checkpointed.scale.grad, torch.tensor(3.0))  # sum(x), reached the module's own parameter
    assert not recompute.is_recompute()
