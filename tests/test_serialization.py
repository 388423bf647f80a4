"""Saving, loading, copying and reseeding every public class.

For each configuration (every public class, plus variants that carry extra state: k-means flags, dead-code
counts, affine moments, multi-head projections, shared codebooks, QINCo MLPs, rotations, learned grids):

- a ``state_dict`` loaded into a freshly built module (built under another seed) gives bit-identical eval
  outputs and the same ``state_dict``, and the two modules then train identically (no state outside the
  ``state_dict``, such as a cached "initialised?" flag, leaks through);
- ``copy.deepcopy`` gives an equal module that trains independently of the original;
- ``torch.save`` / ``torch.load`` of the whole module (``weights_only=False``) and of the ``state_dict``
  (``weights_only=True``) round-trip;
- the same ``torch.manual_seed`` gives the same module and the same training outputs, including the
  stochastic options (Gumbel sampling, quantize dropout, noise dropout, perturbation, bit sampling).
"""

import copy
import io

import pytest
import torch
from torch import nn

import vector_quantize_pytorch as vqp


class Config:
    """A factory and an input shape; ``make`` must build the same module under the same seed."""

    def __init__(self, make, shape):
        self.make, self.shape = make, shape


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


CONFIGS = {
    "VectorQuantize": Config(lambda: vqp.VectorQuantize(dim=4, codebook_size=8), (2, 6, 4)),
    "VectorQuantize-kmeans-dead-codes": Config(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, threshold_ema_dead_code=2), (2, 6, 4)
    ),
    "VectorQuantize-affine": Config(lambda: vqp.VectorQuantize(dim=4, codebook_size=8, affine_param=True), (2, 6, 4)),
    "VectorQuantize-heads-cosine-projection": Config(
        lambda: vqp.VectorQuantize(
            dim=8, codebook_size=8, heads=2, separate_codebook_per_head=True, use_cosine_sim=True, codebook_dim=3,
            layernorm_after_project_in=True,
        ),
        (2, 6, 8),
    ),
    "VectorQuantize-image": Config(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, accept_image_fmap=True, orthogonal_reg_weight=1.0),
        (2, 4, 3, 3),
    ),
    "VectorQuantize-in-place-optimizer": Config(
        lambda: vqp.VectorQuantize(
            dim=4, codebook_size=8, learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=sgd
        ),
        (2, 6, 4),
    ),
    "VectorQuantize-stochastic": Config(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, stochastic_sample_codes=True), (2, 6, 4)
    ),
    "ResidualVQ": Config(
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=3, kmeans_init=True, quantize_dropout=True),
        (2, 6, 4),
    ),
    "ResidualVQ-shared-projected": Config(
        lambda: vqp.ResidualVQ(dim=6, codebook_size=8, num_quantizers=2, shared_codebook=True, codebook_dim=4),
        (2, 6, 6),
    ),
    "ResidualVQ-implicit": Config(
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, implicit_neural_codebook=True),
        (2, 6, 4),
    ),
    "ResidualVQ-beam": Config(
        lambda: vqp.ResidualVQ(dim=4, codebook_size=(4, 8), beam_size=2, quantize_dropout=True,
                               quantize_dropout_per_sample=True),  # fmt: skip
        (2, 6, 4),
    ),
    "GroupedResidualVQ": Config(
        lambda: vqp.GroupedResidualVQ(dim=4, codebook_size=8, num_quantizers=2, groups=2, quantize_dropout=True),
        (2, 6, 4),
    ),
    "RandomProjectionQuantizer": Config(
        lambda: vqp.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3, num_codebooks=2), (2, 6, 4)
    ),
    "FSQ": Config(lambda: vqp.FSQ(levels=[3, 4]), (2, 6, 2)),
    "FSQ-projected-rotated-noisy": Config(
        lambda: vqp.FSQ(levels=[3, 4], dim=5, orthogonal_rotation=True, preserve_symmetry=True, noise_dropout=0.5),
        (2, 6, 5),
    ),
    "FSP": Config(lambda: vqp.FSP(levels=[3, 4], dim=4, quantize_rate=0.3, need_inv_act=True), (2, 6, 4)),
    "LFQ": Config(lambda: vqp.LFQ(dim=4, codebook_size=16), (2, 6, 4)),
    "LFQ-projected-rotated": Config(
        lambda: vqp.LFQ(dim=6, codebook_size=16, num_codebooks=2, orthogonal_rotation=True, spherical=True,
                        frac_per_sample_entropy=0.5),  # fmt: skip
        (2, 6, 6),
    ),
    "EvoLFQ": Config(lambda: vqp.EvoLFQ(nn.Linear(4, 4), nn.Linear(4, 4), dim=4, codebook_size=16), (2, 6, 4)),
    "ResidualLFQ": Config(
        lambda: vqp.ResidualLFQ(dim=6, codebook_size=16, num_quantizers=2, quantize_dropout=True), (2, 6, 6)
    ),
    "GroupedResidualLFQ": Config(
        lambda: vqp.GroupedResidualLFQ(dim=8, codebook_size=16, num_quantizers=2, groups=2), (2, 6, 8)
    ),
    "ResidualFSQ": Config(
        lambda: vqp.ResidualFSQ(levels=[3, 4], num_quantizers=2, dim=4, quantize_dropout=True), (2, 6, 4)
    ),
    "GroupedResidualFSQ": Config(
        lambda: vqp.GroupedResidualFSQ(levels=[3, 4], num_quantizers=2, dim=8, groups=2), (2, 6, 8)
    ),
    "LatentQuantize": Config(lambda: vqp.LatentQuantize(levels=[3, 4], dim=4), (2, 6, 4)),
    "LatentQuantize-in-place": Config(
        lambda: vqp.LatentQuantize(levels=[3, 4], dim=2, num_codebooks=2, in_place_codebook_optimizer=sgd),
        (2, 6, 2),
    ),
    "LatentQuantize-fixed-grids": Config(
        lambda: vqp.LatentQuantize(levels=[3, 4], dim=2, optimize_values=False), (2, 6, 2)
    ),
    "SimVQ": Config(lambda: vqp.SimVQ(dim=4, codebook_size=8, frozen_codebook_dim=3), (2, 6, 4)),
    "ResidualSimVQ": Config(
        lambda: vqp.ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=2, quantize_dropout=True), (2, 6, 4)
    ),
    "BinaryMapper": Config(lambda: vqp.BinaryMapper(bits=3, deterministic_on_eval=True), (2, 6, 3)),
    "HierarchicalVQ": Config(
        lambda: vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), accept_image_fmap=True,
                                   share_quant_resi=0, nested_dropout=0.5),  # fmt: skip
        (2, 4, 4, 4),
    ),
    "Sequential": Config(
        lambda: vqp.Sequential(nn.Linear(4, 4), vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True)),
        (2, 6, 4),
    ),
}  # fmt: skip

NAMES = list(CONFIGS)


def test_every_public_class_is_covered():
    covered = {name.split("-")[0] for name in CONFIGS}
    assert {getattr(cls, "__name__", cls) for cls in vqp.QUANTIZERS} | {"Sequential"} <= covered


# ----------------------------------------------------------------------------------------------------------
# helpers


def tensors_in(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in tensors_in(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors_in(v)]
    return []


def assert_outputs_equal(actual, expected):
    actual, expected = tensors_in(actual), tensors_in(expected)
    assert len(actual) == len(expected) and len(expected) > 0
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert torch.equal(a.detach(), e.detach()), (a, e)


def full_state(module):
    """Parameters and every buffer, persistent or not."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return {name: t.detach().clone() for name, t in tensors.items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def train_steps(module, config, seed, steps=2):
    """Training forwards (and an SGD step on the outputs, so learned parameters move too) under one seed."""
    torch.manual_seed(seed)
    module.train()
    outputs = []
    for _ in range(steps):
        out = module(torch.randn(config.shape))
        outputs.append(out)
        floats = [t for t in tensors_in(out) if t.is_floating_point() and t.requires_grad]
        params = [p for p in module.parameters() if p.requires_grad]
        if floats and params:
            loss = sum(t.float().square().mean() for t in floats)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.sub_(0.1 * g)
    return outputs


def eval_output(module, x):
    module.eval()
    with torch.no_grad():
        return module(x)


def trained(name, seed=0):
    config = CONFIGS[name]
    torch.manual_seed(seed)
    module = config.make()
    train_steps(module, config, seed=seed + 100)
    return module


def eval_input(name):
    return torch.randn(CONFIGS[name].shape, generator=torch.Generator().manual_seed(7))


# ----------------------------------------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_into_a_fresh_module_with_equal_outputs_and_training(name):
    config = CONFIGS[name]
    module = trained(name)
    fresh = trained(name, seed=1234)  # other weights and caches, all overwritten or reset by the load
    fresh.load_state_dict(module.state_dict(), strict=True)

    x = eval_input(name)
    assert_outputs_equal(eval_output(fresh, x), eval_output(module, x))
    assert_states_equal({k: v for k, v in fresh.state_dict().items()}, {k: v for k, v in module.state_dict().items()})
    # and they keep training alike: no state outside the state_dict (a cached flag, a stale buffer) differs
    assert_outputs_equal(train_steps(fresh, config, seed=5), train_steps(module, config, seed=5))
    assert_states_equal(fresh.state_dict(), module.state_dict())


@pytest.mark.parametrize("name", [name for name in NAMES if "kmeans" in name or name in ("ResidualVQ", "Sequential")])
def test_an_untrained_state_dict_loaded_into_a_trained_module_brings_back_kmeans_initialisation(name):
    config = CONFIGS[name]
    torch.manual_seed(3)
    untrained = config.make()
    module = trained(name)
    module.load_state_dict(untrained.state_dict(), strict=True)
    assert_outputs_equal(train_steps(module, config, seed=6), train_steps(untrained, config, seed=6))
    assert_states_equal(module.state_dict(), untrained.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_through_torch_save_with_weights_only(name):
    config = CONFIGS[name]
    module = trained(name)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    torch.manual_seed(99)
    fresh = config.make()
    fresh.load_state_dict(loaded, strict=True)
    x = eval_input(name)
    assert_outputs_equal(eval_output(fresh, x), eval_output(module, x))


# ----------------------------------------------------------------------------------------------------------
# whole modules


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_of_the_whole_module_round_trips(name):
    config = CONFIGS[name]
    module = trained(name)
    x = eval_input(name)
    expected = eval_output(module, x)

    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    assert type(loaded) is type(module)
    assert_outputs_equal(eval_output(loaded, x), expected)
    assert_states_equal(full_state(loaded), full_state(module))
    assert_outputs_equal(train_steps(loaded, config, seed=3), train_steps(module, config, seed=3))


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_is_equal_and_independent(name):
    config = CONFIGS[name]
    module = trained(name)
    x = eval_input(name)
    expected = eval_output(module, x)
    before = full_state(module)

    clone = copy.deepcopy(module)
    assert_outputs_equal(eval_output(clone, x), expected)
    assert_states_equal(full_state(clone), before)

    train_steps(clone, config, seed=11, steps=3)  # the copy learns ...
    assert_states_equal(full_state(module), before)  # ... the original does not
    assert_outputs_equal(eval_output(module, x), expected)


# ----------------------------------------------------------------------------------------------------------
# seeds


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_builds_the_same_module_and_trains_it_the_same_way(name):
    config = CONFIGS[name]
    torch.manual_seed(42)
    first = config.make()
    torch.manual_seed(42)
    second = config.make()
    assert_states_equal(full_state(first), full_state(second))

    assert_outputs_equal(train_steps(first, config, seed=8), train_steps(second, config, seed=8))
    assert_states_equal(full_state(first), full_state(second))
    x = eval_input(name)
    assert_outputs_equal(eval_output(first, x), eval_output(second, x))


@pytest.mark.parametrize("name", ["VectorQuantize-stochastic", "ResidualVQ", "FSP", "BinaryMapper"])
def test_another_seed_gives_other_random_draws(name):
    """The seeded test above is not vacuous: these configurations do draw random numbers in training."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    module = config.make()
    twin = copy.deepcopy(module)
    torch.manual_seed(0)
    x = torch.randn(8, 16, *config.shape[2:])
    outputs = []
    for seed, m in ((1, module), (2, twin)):
        torch.manual_seed(seed)
        outputs.append(tensors_in(m.train()(x)))
    assert any(not torch.equal(a.detach(), b.detach()) for a, b in zip(*outputs))


def test_eval_forward_never_changes_state():
    for name in NAMES:
        module = trained(name).eval()
        before = full_state(module)
        with torch.no_grad():
            module(eval_input(name))
        assert_states_equal(full_state(module), before)
