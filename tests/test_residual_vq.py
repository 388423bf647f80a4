"""ResidualVQ and GroupedResidualVQ: the seed examples, decoding round trips for every option, quantize dropout
(with torch.compile for every residual family, which share one loop), beam search, gradients, the cross-entropy
path, masks, the shared codebook and argument validation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from residual_helpers import kept_layers
from torch_release import needs_torch

from vector_quantize_pytorch import GroupedResidualVQ, ResidualFSQ, ResidualLFQ, ResidualSimVQ, ResidualVQ


def buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b, exact=False):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        same = torch.equal(sa[key], sb[key]) if exact else torch.allclose(sa[key], sb[key], atol=1e-5, rtol=1e-5)
        assert same, key


def layer_inputs(rvq, h, indices):
    """The residual each layer quantizes when the layers take ``indices`` ``(b, n, q)`` (codebook space)."""
    residual, out = h, []
    for index, layer in enumerate(rvq.layers):
        out.append(residual)
        idx = indices[..., index]
        code = layer.codebook[idx.clamp(min=0)] * (idx >= 0).unsqueeze(-1)
        residual = residual - code
    return out


def ema_step_by_hand(layer, rows, indices, mask=None, decay=0.8, eps=1e-5):
    """One EMA step of ``layer``'s codebook (no dead codes), written out in float64 and copied into ``layer``:
    count and sum of the rows each code got, lerp toward them with weight 1 - decay, codes = sums / Laplace-
    smoothed counts. Rows outside ``mask`` and indices -1 take no part."""
    book = layer._codebook
    size = book.cluster_size.shape[-1]
    rows, indices = rows.reshape(-1, rows.shape[-1]).double(), indices.reshape(-1)
    keep = indices >= 0 if mask is None else mask.reshape(-1) & (indices >= 0)
    onehot = F.one_hot(indices.clamp(min=0), size).double() * keep.unsqueeze(-1)
    cluster_size = decay * book.cluster_size[0].double() + (1 - decay) * onehot.sum(0)
    embed_avg = decay * book.embed_avg[0].double() + (1 - decay) * onehot.T @ rows
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + size * eps) * total
    with torch.no_grad():
        book.cluster_size[0] = cluster_size.float()
        book.embed_avg[0] = embed_avg.float()
        book.embed[0] = (embed_avg / smoothed.unsqueeze(-1)).float()


# ----------------------------------------------------- the reference's usage examples


def test_seed_residual_vq_example():
    residual_vq = ResidualVQ(dim=256, codebook_size=1024, num_quantizers=8)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = residual_vq(x)  # the seed writes vq(x): a stale name for residual_vq
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)
    assert indices.dtype == torch.int64
    quantized, indices, commit_loss, all_codes = residual_vq(x, return_all_codes=True)
    assert all_codes.shape == (8, 1, 1024, 256) and commit_loss.shape == (8,)


def test_seed_rq_vae_example():
    residual_vq = ResidualVQ(
        dim=256,
        codebook_size=1024,
        num_quantizers=8,
        stochastic_sample_codes=True,
        sample_codebook_temp=0.1,
        shared_codebook=True,
    )
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 8) and commit_loss.shape == (8,)


def test_seed_grouped_residual_vq_example():
    residual_vq = GroupedResidualVQ(dim=256, codebook_size=1024, num_quantizers=8, groups=2)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (2, 1, 1024, 8) and commit_loss.shape == (2, 8)


def test_seed_kmeans_init_example():
    residual_vq = ResidualVQ(dim=256, codebook_size=145, num_quantizers=4, kmeans_init=True, kmeans_iters=10)
    x = torch.randn(1, 1024, 256)
    quantized, indices, commit_loss = residual_vq(x)
    assert quantized.shape == (1, 1024, 256) and indices.shape == (1, 1024, 4) and commit_loss.shape == (4,)
    assert all(bool(layer._codebook.initted) for layer in residual_vq.layers)


# ---------------------------------------------------------------- eval round trips

SEQ = (2, 12, 16)
IMAGE = (2, 16, 3, 4)
ROUND_TRIPS = {
    "plain": (dict(num_quantizers=3, codebook_size=32), SEQ),
    "shared_codebook": (dict(num_quantizers=3, codebook_size=32, shared_codebook=True), SEQ),
    "per_layer_sizes": (dict(codebook_size=(5, 128, 256)), SEQ),
    "codebook_dim_projection": (dict(num_quantizers=3, codebook_size=32, codebook_dim=8), SEQ),
    "image_fmap": (dict(num_quantizers=3, codebook_size=32, accept_image_fmap=True), IMAGE),
    "image_fmap_projection": (dict(num_quantizers=3, codebook_size=32, accept_image_fmap=True, codebook_dim=6), IMAGE),
    "cosine_sim": (dict(num_quantizers=3, codebook_size=32, use_cosine_sim=True), SEQ),
    "kmeans_init": (dict(num_quantizers=3, codebook_size=8, kmeans_init=True), SEQ),
    "implicit_neural_codebook": (dict(num_quantizers=3, codebook_size=16, implicit_neural_codebook=True), SEQ),
    "eval_beam": (dict(num_quantizers=3, codebook_size=32, eval_beam_size=4), SEQ),
    "eval_beam_sizes_cosine": (dict(codebook_size=(5, 16, 32), eval_beam_size=8, use_cosine_sim=True), SEQ),
    "eval_beam_projection": (dict(num_quantizers=4, codebook_size=16, eval_beam_size=3, codebook_dim=8), SEQ),
    "eight_layers_odd_dim": (dict(dim=7, num_quantizers=8, codebook_size=16), (3, 20, 7)),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_eval_output_equals_decoded_indices_exactly(name):
    kwargs, shape = ROUND_TRIPS[name]
    torch.manual_seed(0)
    rvq = ResidualVQ(**{"dim": shape[1] if len(shape) == 4 else shape[-1], **kwargs})
    x = torch.randn(*shape)
    rvq(x)  # one training step: k-means, EMA
    rvq.eval()
    quantized, indices, losses, all_codes = rvq(x, return_all_codes=True)
    channel_first = len(shape) == 4
    spatial = shape[2:] if channel_first else shape[1:-1]
    q = rvq.num_quantizers
    assert quantized.shape == x.shape and indices.shape == (shape[0], *spatial, q) and losses.shape == (q,)
    assert all_codes.shape == (q, shape[0], *spatial, rvq.codebook_dim)
    assert (indices >= 0).all()
    assert torch.equal(rvq.get_output_from_indices(indices), quantized)
    assert torch.equal(rvq.get_codes_from_indices(indices), all_codes)
    # eval never changes state
    state = buffers(rvq)
    rvq(x)
    assert all(torch.equal(v, rvq.state_dict()[k]) for k, v in state.items())


def test_eval_beam_changes_encodings_and_decodes_them():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16).eval()
    x = torch.randn(2, 64, 8)
    greedy = rvq(x)[1]
    quantized, beamed, _ = rvq(x, beam_size=4)
    assert (greedy != beamed).any()  # the round trip above covers beams that actually differ
    assert torch.equal(rvq.get_output_from_indices(beamed), quantized)


@pytest.mark.parametrize("accept_image_fmap", [False, True])
def test_grouped_round_trip_and_shapes(accept_image_fmap):
    torch.manual_seed(0)
    grvq = GroupedResidualVQ(
        dim=16, groups=2, num_quantizers=3, codebook_size=32, accept_image_fmap=accept_image_fmap, codebook_dim=4
    )
    x = torch.randn(*(IMAGE if accept_image_fmap else SEQ))
    grvq(x)
    grvq.eval()
    quantized, indices, losses, all_codes = grvq(x, return_all_codes=True)
    spatial = (3, 4) if accept_image_fmap else (12,)
    assert quantized.shape == x.shape and indices.shape == (2, 2, *spatial, 3) and losses.shape == (2, 3)
    assert all_codes.shape == (2, 3, 2, *spatial, 4)
    assert grvq.codebooks.shape == (2, 3, 32, 4)
    assert torch.equal(grvq.get_output_from_indices(indices), quantized)
    assert torch.equal(grvq.get_codes_from_indices(indices), all_codes)


def test_bfloat16_input_is_quantized_in_float32_and_decodes_exactly():
    """The residuals are kept in float32 (a bfloat16 residual loses its low bits at every layer); the output comes
    back in the input's dtype."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=8, codebook_size=64).eval()
    x = torch.randn(2, 100, 16).bfloat16()
    quantized, indices, _ = rvq(x)
    assert quantized.dtype == torch.bfloat16 and indices.dtype == torch.int64
    assert torch.equal(indices, rvq(x.float())[1])
    assert torch.equal(rvq.get_output_from_indices(indices).bfloat16(), quantized)


def test_beam_search_under_autocast_searches_in_float32():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=4, codebook_size=256, eval_beam_size=4).eval()
    x = torch.randn(2, 200, 16)
    expected = rvq(x)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rvq(x)[1], expected)


def test_greedy_search_under_autocast_searches_in_float32():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=4, codebook_size=256).eval()
    x = torch.randn(2, 200, 16)
    expected = rvq(x)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rvq(x)[1], expected)


# ---------------------------------------------------------------- quantize dropout


@pytest.mark.parametrize("cutoff_index,multiple_of", [(0, 1), (2, 1), (0, 2), (1, 4), (0, 4)])
def test_dropout_respects_cutoff_and_multiple_over_many_seeds(cutoff_index, multiple_of):
    rvq = ResidualVQ(
        dim=4,
        num_quantizers=6,
        codebook_size=4,
        quantize_dropout=True,
        quantize_dropout_cutoff_index=cutoff_index,
        quantize_dropout_multiple_of=multiple_of,
    )
    x = torch.randn(1, 2, 4)
    seen = set()
    for seed in range(60):
        _, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed, freeze_codebook=True)
        kept = kept_layers(indices)
        assert (kept == kept.flatten()[0]).all()  # one cutoff per batch
        k = int(kept.flatten()[0])
        assert k >= cutoff_index + 1
        assert k % multiple_of == 0 or k == 6
        assert (losses[k:] == 0).all()
        seen.add(k)
    allowed = {k for k in range(cutoff_index + 1, 7) if k % multiple_of == 0 or k == 6}
    assert seen == allowed


def test_fixed_seed_makes_dropout_deterministic():
    rvq = ResidualVQ(dim=4, num_quantizers=8, codebook_size=4, quantize_dropout=True)
    x = torch.randn(2, 3, 4)
    patterns = []
    for seed in range(6):
        torch.manual_seed(seed)  # the global generator must not matter
        first = rvq(x, rand_quantize_dropout_fixed_seed=7, freeze_codebook=True)[1]
        torch.manual_seed(seed + 100)
        again = rvq(x, rand_quantize_dropout_fixed_seed=7, freeze_codebook=True)[1]
        assert torch.equal(first, again)
        patterns.append(kept_layers(rvq(x, rand_quantize_dropout_fixed_seed=seed, freeze_codebook=True)[1])[0, 0])
    assert len(set(int(p) for p in patterns)) > 1
    rvq.eval()
    assert (rvq(x, rand_quantize_dropout_fixed_seed=7)[1] >= 0).all()  # no dropout in eval


def test_per_sample_dropout_draws_a_cutoff_per_sample():
    rvq = ResidualVQ(
        dim=4,
        num_quantizers=6,
        codebook_size=4,
        quantize_dropout=True,
        quantize_dropout_per_sample=True,
        quantize_dropout_cutoff_index=1,
        quantize_dropout_multiple_of=2,
    )
    x = torch.randn(16, 3, 4)
    _, indices, _ = rvq(x, rand_quantize_dropout_fixed_seed=3, freeze_codebook=True)
    kept = kept_layers(indices)
    assert (kept == kept[:, :1]).all()  # the same cutoff for every token of a sample
    per_sample = set(kept[:, 0].tolist())
    assert len(per_sample) > 1 and per_sample <= {2, 4, 6}


def test_per_sample_dropout_updates_each_layer_with_the_samples_that_keep_it():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=4, codebook_size=8, quantize_dropout=True, quantize_dropout_per_sample=True)
    before = copy.deepcopy(rvq)
    x = torch.randn(6, 10, 6)
    _, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=11)
    kept = kept_layers(indices)
    assert len(set(kept[:, 0].tolist())) > 1

    # by hand: layer l sees the residuals of the samples that keep it, and nothing else
    inputs = layer_inputs(before, x, indices)
    for l, layer in enumerate(before.layers):
        keep = kept > l
        assert keep.any(), "this seed must leave every layer some sample (dropped layers: tests/core/test_residual)"
        assert ((indices[..., l] >= 0) == keep).all()
        expected_loss = (inputs[l] - layer.codebook[indices[..., l].clamp(min=0)]).pow(2).mean(-1)[keep].mean()
        assert torch.allclose(losses[l], expected_loss, atol=1e-6)
        ema_step_by_hand(layer, inputs[l], indices[..., l], mask=keep)
    assert_same_state(rvq, before)


@pytest.mark.parametrize("per_sample", [False, True])
def test_training_output_with_dropout_decodes_from_its_indices(per_sample):
    """The codebooks a step used are the ones before it (each layer updates after quantizing)."""
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=8, num_quantizers=5, codebook_size=16, quantize_dropout=True, quantize_dropout_per_sample=per_sample
    )
    x = torch.randn(4, 6, 8)
    dropped_any = False
    for seed in range(4):
        before = copy.deepcopy(rvq).eval()
        quantized, indices, _, all_codes = rvq(x, rand_quantize_dropout_fixed_seed=seed, return_all_codes=True)
        dropped_any |= bool((indices == -1).any())
        assert torch.equal(before.get_output_from_indices(indices), quantized)
        dropped = indices == -1
        assert (all_codes.permute(1, 2, 0, 3)[dropped] == 0).all()
        if not per_sample:  # trailing dropped layers may be left out of the indices
            k = int(kept_layers(indices).flatten()[0])
            assert torch.equal(before.get_output_from_indices(indices[..., :k]), quantized)
    assert dropped_any


def test_grouped_groups_share_the_dropout_cutoff():
    for per_sample in (False, True):
        grvq = GroupedResidualVQ(
            dim=8,
            groups=4,
            num_quantizers=6,
            codebook_size=4,
            quantize_dropout=True,
            quantize_dropout_per_sample=per_sample,
        )
        x = torch.randn(5, 3, 8)
        dropped_any = False
        for seed in range(5):
            torch.manual_seed(seed)
            _, indices, _ = grvq(x, freeze_codebook=True)  # no fixed seed: one is drawn and shared
            drops = indices == -1
            dropped_any |= bool(drops.any())
            assert all(torch.equal(drops[0], drops[g]) for g in range(4))
        assert dropped_any


def test_dropout_cutoffs_are_uniform_over_the_allowed_layers():
    rvq = ResidualVQ(dim=4, num_quantizers=6, codebook_size=4, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    cutoffs = torch.stack([rvq._dropout_plan(1, "cpu", seed) for seed in range(1000)])
    assert cutoffs.shape == (1000,) and cutoffs.dtype == torch.int64
    counts = torch.bincount(cutoffs, minlength=6)
    assert counts[0] == 0 and (counts[1:] > 150).all()  # 200 expected for each of the five allowed cutoffs


def test_per_sample_cutoffs_depend_on_the_position_only_and_take_one_random_number():
    """What keeps distributed ranks equal to one process on the concatenated batch: a sample's cutoff does not
    depend on the batch size (a rank's samples continue the positions of the ranks before it), and a draw
    takes one number from the default generator whatever the batch size (ranks stay in step)."""
    rvq = ResidualVQ(dim=4, num_quantizers=8, codebook_size=4, quantize_dropout=True, quantize_dropout_per_sample=True)
    long, short = rvq._dropout_plan(16, "cpu", 5), rvq._dropout_plan(3, "cpu", 5)
    assert torch.equal(long[:3], short) and len(set(long.tolist())) > 1
    next_numbers = []
    for batch in (1, 3, 17):
        torch.manual_seed(0)
        cutoffs = rvq._dropout_plan(batch, "cpu", None)
        next_numbers.append(torch.rand(()))
        torch.manual_seed(0)
        assert torch.equal(cutoffs, rvq._dropout_plan(batch, "cpu", None))  # unseeded: the generator decides
    assert next_numbers[0] == next_numbers[1] == next_numbers[2]


def test_batch_dropout_leaves_the_dropped_layers_untouched():
    """Every layer runs (the cutoff is never read on the host), but a dropped layer sees only masked tokens:
    no k-means, no EMA step, no dead-code replacement, zero loss, as when the reference skips it."""
    torch.manual_seed(0)
    state_updates = dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.0)
    rvq = ResidualVQ(dim=6, num_quantizers=5, codebook_size=8, quantize_dropout=True, **state_updates)
    seed = next(s for s in range(100) if int(rvq._dropout_plan(1, "cpu", s)) == 1)  # keeps two layers
    before = copy.deepcopy(rvq)
    _, indices, losses = rvq(torch.randn(3, 10, 6), rand_quantize_dropout_fixed_seed=seed)
    assert (indices[..., :2] >= 0).all() and (indices[..., 2:] == -1).all()
    assert (losses[:2] > 0).all() and (losses[2:] == 0).all()
    for l, (layer, old) in enumerate(zip(rvq.layers, before.layers)):
        unchanged = all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), old.state_dict().values()))
        assert unchanged == (l >= 2), l
    assert [bool(layer._codebook.initted) for layer in rvq.layers] == [True, True, False, False, False]


DROPPING_STACKS = {
    "ResidualVQ": lambda **kw: ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, threshold_ema_dead_code=1.0, **kw),
    "ResidualFSQ": lambda **kw: ResidualFSQ(levels=[5, 4, 3], num_quantizers=4, dim=8, **kw),
    "ResidualLFQ": lambda **kw: ResidualLFQ(dim=8, codebook_size=16, num_quantizers=4, entropy_loss_weight=0.1, **kw),
    "ResidualSimVQ": lambda **kw: ResidualSimVQ(dim=8, codebook_size=16, num_quantizers=4, **kw),
}


OLDER_DYNAMO = needs_torch((2, 6), "fullgraph compilation of the FSQ, LFQ and SimVQ stacks")


@pytest.mark.parametrize("per_sample", [False, True])
# the first stack in the default run, the others with `pytest -m slow`
@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=() if i == 0 else (pytest.mark.slow, OLDER_DYNAMO)) for i, f in enumerate(DROPPING_STACKS)],
)
def test_compiled_training_step_with_dropout_equals_eager(family, per_sample):
    """Every residual family (one shared loop): the cutoff stays a tensor, so torch.compile(fullgraph=True)
    captures the whole training step (a graph break or a host read would raise) and gives eager's outputs,
    gradients and state updates for the same seed."""
    torch.manual_seed(0)
    eager = DROPPING_STACKS[family](quantize_dropout=True, quantize_dropout_per_sample=per_sample).train()
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 10, 8)
    dropped = []
    for step in range(3):
        results = []
        for model in (eager, compiled):
            torch.manual_seed(step)
            inputs = x.clone().requires_grad_()
            outputs = model(inputs)
            sum(t.square().mean() for t in outputs if t.is_floating_point()).backward()
            results.append((*outputs, inputs.grad))
        for actual, expected in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
        dropped.append(bool((results[1][1] == -1).any()))
    assert any(dropped)
    assert_same_state(module, eager, exact=False)
    grads = [(a.grad, b.grad) for a, b in zip(module.parameters(), eager.parameters()) if b.grad is not None]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in grads)


def test_grouped_forward_draws_a_seed_only_when_it_drops_layers():
    x = torch.randn(2, 3, 8)
    plain = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=4)
    dropping = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=4, quantize_dropout=True)
    state = torch.get_rng_state()
    plain(x)
    assert torch.equal(torch.get_rng_state(), state)
    dropping(x)
    assert not torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- beam search


def structured_data(num, dim=16, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, dim, generator=torch.Generator().manual_seed(123))
    return torch.tanh(torch.randn(num, rank, generator=g) @ mixing) + 0.1 * torch.randn(num, dim, generator=g)


def test_eval_beam_search_beats_greedy_on_held_out_data():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=4, codebook_size=64, kmeans_init=True, decay=0.9)
    train = structured_data(4096, seed=1)
    for _ in range(6):
        rvq(train[torch.randperm(4096)[:2048]].unsqueeze(0))
    rvq.eval()
    test = structured_data(1024, seed=2).unsqueeze(0)
    greedy_mse = (rvq(test)[0] - test).pow(2).mean()
    beam_mse = (rvq(test, beam_size=4)[0] - test).pow(2).mean()
    assert beam_mse < 0.97 * greedy_mse  # about 0.91 over seeds


def test_beam_search_is_exact_when_the_beam_holds_every_path():
    """K = 4 codes, 3 layers, beam 16: every one of the 64 paths is scored; the result is the brute-force
    minimum of the weighted sum of per-layer mean squared errors."""
    torch.manual_seed(0)
    for weights in ([1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [2.0, 0.5, 1.0]):
        rvq = ResidualVQ(
            dim=3, num_quantizers=3, codebook_size=4, eval_beam_size=16, beam_score_quantizer_weights=weights
        ).eval()
        x = torch.randn(1, 30, 3)
        books = [layer.codebook for layer in rvq.layers]
        paths = torch.cartesian_prod(*[torch.arange(4)] * 3)  # (64, 3)
        residual, score = x[0].unsqueeze(1), torch.zeros(30, 64)
        for l, book in enumerate(books):
            codes = book[paths[:, l]]  # (64, d)
            score = score + weights[l] * (residual - codes).pow(2).mean(-1)
            residual = residual - codes
        expected = paths[score.argmin(-1)]
        assert torch.equal(rvq(x)[1][0], expected)


def test_final_error_beam_is_exact_when_the_beam_holds_every_path():
    """The default beam score (no per-layer weights) ranks paths by the final reconstruction error, as faiss
    does: with every path in the beam the result is the brute-force best reconstruction."""
    torch.manual_seed(1)
    rvq = ResidualVQ(dim=3, num_quantizers=3, codebook_size=4, eval_beam_size=16).eval()
    assert rvq.beam_score == "final"
    x = torch.randn(1, 30, 3)
    books = [layer.codebook for layer in rvq.layers]
    paths = torch.cartesian_prod(*[torch.arange(4)] * 3)  # (64, 3)
    reconstruction = sum(book[paths[:, l]] for l, book in enumerate(books))  # (64, d)
    error = (x[0].unsqueeze(1) - reconstruction).pow(2).sum(-1)  # (30, 64)
    assert torch.equal(rvq(x)[1][0], paths[error.argmin(-1)])


def test_beam_score_argument():
    assert ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_score_quantizer_weights=[1, 1]).beam_score == "sum"
    with pytest.raises(ValueError, match="beam_score"):
        ResidualVQ(dim=4, num_quantizers=2, codebook_size=4, beam_score="best")


def test_beam_search_in_token_chunks_equals_one_chunk():
    from dataclasses import replace

    from vector_quantize_pytorch.core.policy import CPU_POLICY, use_chunk_policy

    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, codebook_size=(5, 16, 16), eval_beam_size=4).eval()
    x = torch.randn(3, 50, 6)
    whole = rvq(x)[1]
    with use_chunk_policy(replace(CPU_POLICY, logit_scores=2000)):  # chunks of a few tokens
        assert torch.equal(rvq(x)[1], whole)


def test_training_beam_updates_codebooks_with_the_chosen_indices():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, beam_size=4)
    x = torch.randn(2, 40, 8)
    before = copy.deepcopy(rvq)
    _, indices, _ = rvq(x)
    chosen = before.eval()(x)[1]  # eval beam (eval_beam_size defaults to beam_size) on the same codebooks
    assert torch.equal(indices, chosen)
    assert (chosen != before(x, beam_size=1)[1]).any()  # the beam chose differently from greedy somewhere
    for layer, inputs, l in zip(before.layers, layer_inputs(before, x, chosen), range(3)):
        ema_step_by_hand(layer, inputs, chosen[..., l])
    assert_same_state(rvq, before)


def test_training_beam_with_dropout_stops_at_the_cutoff():
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, beam_size=4, quantize_dropout=True)
    x = torch.randn(2, 10, 8)
    kept = {int(kept_layers(rvq(x, rand_quantize_dropout_fixed_seed=s)[1]).max()) for s in range(12)}
    assert kept == {1, 2, 3, 4}


@pytest.mark.parametrize("beam_score", ["final", "sum"])
def test_training_beam_with_dropout_equals_a_beam_through_the_kept_layers(beam_score):
    """The beam runs through every layer, and each token takes the best path at its last kept layer: the path a
    beam over the kept layers alone finds."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, beam_size=4, beam_score=beam_score)
    rvq._init_dropout(True, 0, 1, num_quantizers=4)
    x = torch.randn(2, 40, 8)
    kept = set()
    for seed in range(8):
        k = int(rvq._dropout_plan(1, "cpu", seed)) + 1
        kept.add(k)
        _, indices, _ = rvq(x, rand_quantize_dropout_fixed_seed=seed, freeze_codebook=True)
        shorter = ResidualVQ(dim=8, num_quantizers=k, codebook_size=16, eval_beam_size=4, beam_score=beam_score)
        shorter.layers.load_state_dict(rvq.layers[:k].state_dict())
        assert torch.equal(indices[..., :k], shorter.eval()(x)[1]), k
        assert (indices[..., k:] == -1).all()
        if k == 4:
            assert (indices != rvq(x, beam_size=1, freeze_codebook=True)[1]).any()  # the beam is not greedy
    assert len(kept) > 2


def test_training_beam_waits_for_kmeans_init():
    """Before k-means the codebooks are zeros; a beam over them would force one code on every token."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, beam_size=4, kmeans_init=True)
    _, indices, _ = rvq(torch.randn(2, 64, 8))
    assert all(len(indices[..., l].unique()) > 4 for l in range(3))


def test_beam_with_implicit_neural_codebook_is_refused():
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, implicit_neural_codebook=True)
    with pytest.raises(ValueError, match="beam"):
        rvq(torch.randn(1, 3, 8), beam_size=2)
    with pytest.raises(ValueError, match="beam"):
        ResidualVQ(dim=8, num_quantizers=2, codebook_size=4, implicit_neural_codebook=True, beam_size=2)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("rotation_trick", [True, False])
@pytest.mark.parametrize("codebook_dim", [None, 4])
def test_every_layer_commitment_loss_reaches_the_input(rotation_trick, codebook_dim):
    """EnCodec issue #25: subtracting a straight-through output from the residual cancels the input's gradient."""
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=8, num_quantizers=4, codebook_size=16, rotation_trick=rotation_trick, codebook_dim=codebook_dim
    )
    x = torch.randn(2, 10, 8, requires_grad=True)
    _, _, losses = rvq(x)
    for l in range(4):
        (grad,) = torch.autograd.grad(losses[l], x, retain_graph=True)
        assert grad.abs().sum() > 0, l


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_quant_grad_frac_lets_gradient_through_the_residual(frac):
    """Straight-through layers: d output / d x = sum_l (1 - frac)^l."""
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, rotation_trick=False, quant_grad_frac=frac)
    x = torch.randn(2, 5, 4, requires_grad=True)
    quantized, _, _ = rvq(x, freeze_codebook=True)
    (grad,) = torch.autograd.grad(quantized.sum(), x)
    assert torch.allclose(grad, torch.full_like(grad, sum((1 - frac) ** l for l in range(3))))


def test_quant_grad_frac_reaches_earlier_codebooks_through_later_losses():
    rvq = ResidualVQ(
        dim=4, num_quantizers=2, codebook_size=8, quant_grad_frac=0.5, learnable_codebook=True, ema_update=False
    )
    _, _, losses = rvq(torch.randn(2, 5, 4))
    (grad,) = torch.autograd.grad(losses[1], rvq.layers[0]._codebook.embed)
    assert grad.abs().sum() > 0
    plain = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, learnable_codebook=True, ema_update=False)
    _, _, losses = plain(torch.randn(2, 5, 4))
    (grad,) = torch.autograd.grad(losses[1], plain.layers[0]._codebook.embed, allow_unused=True)
    assert grad is None or grad.abs().sum() == 0


# ---------------------------------------------------------------- cross-entropy path (reference bug 2)


def cross_entropy_by_hand(books, x, indices):
    residual, total = x.reshape(-1, x.shape[-1]), 0.0
    for l, book in enumerate(books):
        target = indices[..., l].reshape(-1)
        total = total + F.cross_entropy(-torch.cdist(residual, book), target)
        residual = residual - book[target]
    return total


def test_cross_entropy_path_sums_layers_with_the_residual_of_the_given_codes():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=3, codebook_size=10).eval()
    x = torch.randn(2, 7, 6)
    indices = torch.randint(0, 10, (2, 7, 3))
    quantized, ce = rvq(x, indices=indices)
    assert ce.ndim == 0 and torch.isfinite(ce)
    expected = cross_entropy_by_hand([layer.codebook for layer in rvq.layers], x, indices)
    assert torch.allclose(ce, expected, atol=1e-5)
    assert torch.equal(quantized, rvq.get_output_from_indices(indices))
    # a list of per-layer indices is accepted as well
    assert torch.allclose(rvq(x, indices=list(indices.unbind(-1)))[1], expected, atol=1e-5)


def test_cross_entropy_path_in_training_has_gradients():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=3, codebook_size=10)
    x = torch.randn(2, 7, 6, requires_grad=True)
    indices = torch.randint(0, 10, (2, 7, 3))
    books = [layer.codebook.clone() for layer in rvq.layers]
    quantized, ce = rvq(x, indices=indices, freeze_codebook=True)
    assert torch.allclose(ce, cross_entropy_by_hand(books, x.detach(), indices), atol=1e-5)
    ce.backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="-1"):
        rvq(x, indices=torch.full((2, 7, 3), -1))


def test_cross_entropy_in_training_scores_against_the_codebooks_before_the_step():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=3, codebook_size=10)
    x = torch.randn(2, 7, 6)
    indices = torch.randint(0, 10, (2, 7, 3))
    books = [layer.codebook.clone() for layer in rvq.layers]
    _, ce = rvq(x, indices=indices)
    assert torch.allclose(ce, cross_entropy_by_hand(books, x, indices), atol=1e-5)


def test_grouped_cross_entropy_path():
    torch.manual_seed(0)
    grvq = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=6).eval()
    x = torch.randn(2, 5, 8)
    indices = torch.randint(0, 6, (2, 2, 5, 2))
    quantized, ce = grvq(x, indices=indices)
    expected = sum(
        cross_entropy_by_hand([layer.codebook for layer in rvq.layers], chunk, idx)
        for rvq, chunk, idx in zip(grvq.rvqs, x.chunk(2, dim=-1), indices)
    )
    assert torch.allclose(ce, expected, atol=1e-5)
    assert torch.equal(quantized, grvq.get_output_from_indices(indices))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("options", [{}, {"shared_codebook": True}, {"codebook_dim": 4}, {"beam_size": 3}])
def test_masked_tokens_give_zeros_and_minus_one_and_leave_statistics_alone(options):
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=6, num_quantizers=3, codebook_size=8, **options)
    valid_only = copy.deepcopy(rvq)
    x = torch.randn(2, 8, 6)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, :2] = False
    x_garbage = x.masked_fill(~mask.unsqueeze(-1), 1e4)
    quantized, indices, losses = rvq(x_garbage, mask=mask)
    assert (quantized[~mask] == 0).all() and (indices[~mask] == -1).all() and (indices[mask] >= 0).all()
    # the same step on the valid tokens alone gives the same statistics and losses
    _, valid_indices, valid_losses = valid_only(x[mask].unsqueeze(0))
    assert torch.equal(indices[mask], valid_indices[0])
    assert torch.allclose(losses, valid_losses, atol=1e-6)
    assert_same_state(rvq, valid_only)


def test_masked_tokens_never_become_codes_of_a_shared_codebook():
    """Every code is dead (threshold above any count) and there are fewer valid tokens than codes, so the
    end-of-step expiry over all layers' inputs has dead codes left to replace: only by valid inputs."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=16, shared_codebook=True, threshold_ema_dead_code=1e6)
    x = torch.randn(2, 16, 4)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 0] = True
    for _ in range(3):
        rvq(x.masked_fill(~mask.unsqueeze(-1), 1e4), mask=mask)
        assert rvq.layers[0].codebook.abs().max() < 100


@pytest.mark.parametrize("accept_image_fmap", [False, True])
def test_masked_output_decodes_from_its_indices_with_projections(accept_image_fmap):
    """Masked tokens decode to zeros as forward outputs them, not to project_out's bias."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, codebook_dim=4, accept_image_fmap=accept_image_fmap)
    rvq.eval()
    x = torch.randn(2, 8, 3, 4) if accept_image_fmap else torch.randn(2, 12, 8)
    mask = torch.rand(2, 3, 4) > 0.4 if accept_image_fmap else torch.rand(2, 12) > 0.4
    quantized, indices, _ = rvq(x, mask=mask)
    assert torch.equal(rvq.get_output_from_indices(indices), quantized)


def test_image_fmap_mask_over_positions():
    rvq = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, accept_image_fmap=True)
    x = torch.randn(2, 4, 3, 5)
    mask = torch.rand(2, 3, 5) > 0.5
    quantized, indices, _ = rvq(x, mask=mask)
    assert indices.shape == (2, 3, 5, 2)
    assert (indices[~mask] == -1).all() and (quantized.movedim(1, -1)[~mask] == 0).all()


# ---------------------------------------------------------------- shared codebook


def test_shared_codebook_is_one_object_with_the_reference_keys():
    rvq = ResidualVQ(dim=64, num_quantizers=2, codebook_size=64, shared_codebook=True)
    assert all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    shapes = {k: tuple(v.shape) for k, v in rvq.state_dict().items()}
    expected = {}
    for l in range(2):
        expected.update(
            {
                f"layers.{l}._codebook.initted": (),
                f"layers.{l}._codebook.cluster_size": (1, 64),
                f"layers.{l}._codebook.embed_avg": (1, 64, 64),
                f"layers.{l}._codebook.embed": (1, 64, 64),
            }
        )
    assert shapes == expected
    assert {
        k: tuple(v.shape) for k, v in ResidualVQ(dim=64, num_quantizers=2, codebook_size=64).state_dict().items()
    } == (expected)


def test_grouped_state_dict_keys():
    grvq = GroupedResidualVQ(dim=64, groups=2, num_quantizers=2, codebook_size=64)
    shapes = {k: tuple(v.shape) for k, v in grvq.state_dict().items()}
    expected = {}
    for g in range(2):
        for l in range(2):
            prefix = f"rvqs.{g}.layers.{l}._codebook."
            expected.update(
                {
                    prefix + "initted": (),
                    prefix + "cluster_size": (1, 64),
                    prefix + "embed_avg": (1, 64, 32),
                    prefix + "embed": (1, 64, 32),
                }
            )
    assert shapes == expected


def test_shared_codebook_writes_its_ema_once_per_step_after_every_layer():
    torch.manual_seed(0)
    decay, num_codes, layers = 0.8, 16, 4
    rvq = ResidualVQ(dim=5, num_quantizers=layers, codebook_size=num_codes, shared_codebook=True, decay=decay)
    codebook = rvq.layers[0]._codebook
    writes = []
    original = codebook.update_ema
    codebook.update_ema = lambda: (writes.append(1), original())[1]
    before = copy.deepcopy(rvq).eval()
    x = torch.randn(1, 30, 5)
    _, indices, _ = rvq(x)
    assert len(writes) == 1
    # every layer searched the codebook the step started from
    assert torch.equal(indices, before(x)[1])
    # the statistics fold in every layer's assignments, one EMA step per layer as in the reference
    expected = torch.ones(num_codes)
    for l in range(layers):
        counts = torch.bincount(indices[..., l].flatten(), minlength=num_codes).float()
        expected = decay * expected + (1 - decay) * counts
    assert torch.allclose(codebook.cluster_size[0], expected, atol=1e-5)
    assert torch.equal(codebook.embed, codebook._ema_codes())


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_quantizers=2, codebook_size=8, heads=2), "heads"),
        (dict(num_quantizers=3, codebook_size=(4, 8)), "codebook_size"),
        (dict(codebook_size=8), "num_quantizers"),
        (dict(num_quantizers=0, codebook_size=8), "num_quantizers"),
        (
            dict(num_quantizers=3, codebook_size=8, quantize_dropout=True, quantize_dropout_cutoff_index=3),
            "cutoff_index",
        ),
        (dict(num_quantizers=3, codebook_size=8, quantize_dropout_cutoff_index=-1), "cutoff_index"),
        (dict(num_quantizers=3, codebook_size=8, quantize_dropout_multiple_of=0), "multiple_of"),
        (dict(num_quantizers=3, codebook_size=8, beam_size=2, beam_score_quantizer_weights=[1.0, 1.0]), "beam_score"),
        (dict(num_quantizers=3, codebook_size=8, beam_size=0), "beam_size"),
        (dict(num_quantizers=3, codebook_size=8, quant_grad_frac=1.5), "quant_grad_frac"),
        (dict(codebook_size=(4, 8), shared_codebook=True), "shared_codebook"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        ResidualVQ(dim=8, **kwargs)


def test_invalid_inputs_and_grouping():
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualVQ(dim=10, groups=3, num_quantizers=2, codebook_size=4)
    grvq = GroupedResidualVQ(dim=8, groups=2, num_quantizers=2, codebook_size=4)
    with pytest.raises(ValueError, match="8"):
        grvq(torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="one tensor per group"):
        grvq(torch.randn(1, 3, 8), indices=torch.zeros(3, 1, 3, 2, dtype=torch.long))
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=4)
    with pytest.raises(ValueError, match="8"):
        rvq(torch.randn(1, 3, 5))
    with pytest.raises(TypeError, match="x must be a floating point tensor, got dtype torch.int64"):
        rvq(torch.zeros(1, 3, 8, dtype=torch.long))
