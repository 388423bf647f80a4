"""Argument and input validation across every public class.

Constructor arguments: a wrong type raises TypeError and an out-of-range or inconsistent value raises
ValueError, and the message names the argument and the value given. Forward inputs: a non-tensor or a
non-floating tensor raises TypeError, a wrong rank or feature size raises ValueError whose message shows
the shape received (and, for the feature size, the one expected). A call that fails changes nothing: the
state_dict, every buffer and every parameter are bit for bit what they were.

The family test files check each class's own rules in depth; this file sweeps all classes with the same
probes, so that a new argument or a new class cannot slip through unchecked.
"""

import inspect
import math
import re

import pytest
import torch
from torch import nn

import vector_quantize_pytorch as vqp

# ----------------------------------------------------------------------------------------------------------
# a small valid configuration of every public class


BASE_CONFIGS = {
    "VectorQuantize": dict(dim=4, codebook_size=8),
    "ResidualVQ": dict(dim=4, codebook_size=8, num_quantizers=2),
    "GroupedResidualVQ": dict(dim=4, codebook_size=8, num_quantizers=2, groups=2),
    "RandomProjectionQuantizer": dict(dim=4, codebook_size=8, codebook_dim=3),
    "FSQ": dict(levels=[3, 4]),
    "FSP": dict(levels=[3, 4]),
    "LFQ": dict(dim=4, codebook_size=16),
    "EvoLFQ": dict(encoder=nn.Identity(), decoder=nn.Identity(), dim=4, codebook_size=16),
    "ResidualLFQ": dict(dim=4, codebook_size=16, num_quantizers=2),
    "GroupedResidualLFQ": dict(dim=4, codebook_size=16, num_quantizers=2, groups=2),
    "ResidualFSQ": dict(levels=[3, 4], num_quantizers=2),
    "GroupedResidualFSQ": dict(levels=[3, 4], num_quantizers=2, dim=4, groups=2),
    "LatentQuantize": dict(levels=[3, 4], dim=2),
    "SimVQ": dict(dim=4, codebook_size=8),
    "ResidualSimVQ": dict(dim=4, codebook_size=8, num_quantizers=2),
    "BinaryMapper": dict(bits=3),
    "HierarchicalVQ": dict(dim=4, codebook_size=8, scales=(1, 2)),
}


def quantizer_names():
    return {getattr(cls, "__name__", cls) for cls in vqp.QUANTIZERS}


def test_every_public_quantizer_has_a_base_config():
    assert quantizer_names() <= set(BASE_CONFIGS), quantizer_names() - set(BASE_CONFIGS)
    for name, config in BASE_CONFIGS.items():
        getattr(vqp, name)(**config)


def constructor_parameters(class_name):
    """(name, annotation string) of every explicit constructor argument."""
    signature = inspect.signature(getattr(vqp, class_name).__init__)
    for name, parameter in signature.parameters.items():
        if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            yield name, str(parameter.annotation)


ALL_PARAMETERS = [(cls, name) for cls in BASE_CONFIGS for name, _ in constructor_parameters(cls)]


def assert_names(error: Exception, *words: str) -> None:
    message = str(error)
    for word in words:
        assert word in message, f"{word!r} not in the message {message!r}"


# ----------------------------------------------------------------------------------------------------------
# constructor arguments: a sweep over every argument of every class


class NotAnArgument:
    """A value of no type any constructor takes."""

    def __repr__(self):
        return "<NotAnArgument>"


@pytest.mark.parametrize("class_name,argument", ALL_PARAMETERS, ids=[f"{c}.{a}" for c, a in ALL_PARAMETERS])
def test_an_argument_of_a_foreign_type_raises_type_or_value_error_naming_it(class_name, argument):
    config = dict(BASE_CONFIGS[class_name], **{argument: NotAnArgument()})
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(vqp, class_name)(**config)
    assert_names(info.value, argument)


def _typed_bad_values(annotation: str):
    """Values of the wrong kind for an argument annotated as a number or a bool (and nothing else)."""
    words = set(re.findall(r"[A-Za-z_]+", annotation)) - {"None"}
    if words == {"bool"}:
        return [("yes", TypeError), (1, TypeError)]
    if words == {"int"}:
        return [(2.5, TypeError), ("3", TypeError)]
    if words == {"float"}:
        return [("0.5", TypeError), (math.nan, ValueError), (math.inf, ValueError)]
    return []


TYPED_CASES = [
    (cls, name, value, error)
    for cls in BASE_CONFIGS
    for name, annotation in constructor_parameters(cls)
    for value, error in _typed_bad_values(annotation)
]


@pytest.mark.parametrize(
    "class_name,argument,value,error", TYPED_CASES, ids=[f"{c}.{a}={v!r}" for c, a, v, _ in TYPED_CASES]
)
def test_a_wrong_kind_of_number_or_bool_raises_naming_the_argument_and_value(class_name, argument, value, error):
    config = dict(BASE_CONFIGS[class_name], **{argument: value})
    with pytest.raises(error) as info:
        getattr(vqp, class_name)(**config)
    assert_names(info.value, argument)
    assert repr(value) in str(info.value) or str(value) in str(info.value), str(info.value)


def test_the_sweep_covers_the_typed_arguments():
    """Most arguments are annotated as a plain number or bool, so the typed sweep has real coverage."""
    assert len(TYPED_CASES) > 250


# ----------------------------------------------------------------------------------------------------------
# constructor arguments: values out of range or inconsistent with each other (class by class)


INVALID_VALUES = [
    ("VectorQuantize", dict(dim=0), ValueError, ["dim", "0"]),
    ("VectorQuantize", dict(codebook_size=-3), ValueError, ["codebook_size", "-3"]),
    ("VectorQuantize", dict(decay=1.5), ValueError, ["decay", "1.5"]),
    ("VectorQuantize", dict(kmeans_iters=-1), ValueError, ["kmeans_iters", "-1"]),
    ("VectorQuantize", dict(orthogonal_reg_max_codes=0), ValueError, ["orthogonal_reg_max_codes", "0"]),
    ("ResidualVQ", dict(num_quantizers=0), ValueError, ["num_quantizers", "0"]),
    ("ResidualVQ", dict(codebook_size=(8, 0)), ValueError, ["codebook_size[1]", "0"]),
    ("ResidualVQ", dict(codebook_size=(8, 16, 32)), ValueError, ["codebook_size", "num_quantizers"]),
    ("ResidualVQ", dict(heads=2), ValueError, ["heads", "2"]),
    ("ResidualVQ", dict(quant_grad_frac=1.5), ValueError, ["quant_grad_frac", "1.5"]),
    ("ResidualVQ", dict(quantize_dropout_cutoff_index=2), ValueError, ["quantize_dropout_cutoff_index", "2"]),
    ("ResidualVQ", dict(quantize_dropout_multiple_of=0), ValueError, ["quantize_dropout_multiple_of", "0"]),
    ("ResidualVQ", dict(quantize_dropout_per_sample="yes"), TypeError, ["quantize_dropout_per_sample", "yes"]),
    ("ResidualVQ", dict(beam_size=0), ValueError, ["beam_size", "0"]),
    ("ResidualVQ", dict(beam_score_quantizer_weights=[1.0]), ValueError, ["beam_score_quantizer_weights", "1"]),
    ("ResidualVQ", dict(beam_score_quantizer_weights=2.0), TypeError, ["beam_score_quantizer_weights", "2.0"]),
    ("ResidualVQ", dict(beam_score_quantizer_weights=[1.0, "a"]), TypeError, ["beam_score_quantizer_weights[1]"]),
    ("ResidualVQ", dict(beam_score="best"), ValueError, ["beam_score", "best"]),
    ("ResidualVQ", dict(beam_score=["final"]), ValueError, ["beam_score", "final"]),
    ("ResidualVQ", dict(mlp_kwargs=[("depth", 2)]), TypeError, ["mlp_kwargs"]),
    ("ResidualVQ", dict(shared_codebook=True, codebook_size=(8, 16)), ValueError, ["shared_codebook"]),
    ("ResidualVQ", dict(decay=-0.1), ValueError, ["decay", "-0.1"]),  # forwarded to every layer
    ("ResidualVQ", dict(not_an_option=1), TypeError, ["not_an_option"]),
    ("GroupedResidualVQ", dict(groups=3), ValueError, ["groups", "3"]),
    ("GroupedResidualVQ", dict(groups=0), ValueError, ["groups", "0"]),
    ("RandomProjectionQuantizer", dict(codebook_dim=0), ValueError, ["codebook_dim", "0"]),
    ("RandomProjectionQuantizer", dict(num_codebooks=0), ValueError, ["num_codebooks", "0"]),
    ("RandomProjectionQuantizer", dict(kmeans_init=True), ValueError, ["kmeans_init"]),
    ("FSQ", dict(levels=[]), ValueError, ["levels"]),
    ("FSQ", dict(levels=[3, 1]), ValueError, ["levels[1]", "1"]),
    ("FSQ", dict(levels=[3, 2]), ValueError, ["levels", "preserve_symmetry"]),
    ("FSQ", dict(levels=[3, 4], num_codebooks=2, keep_num_codebooks_dim=False), ValueError, ["keep_num_codebooks_dim"]),
    ("FSQ", dict(noise_dropout=0.5), ValueError, ["noise_dropout", "preserve_symmetry"]),
    ("FSQ", dict(noise_dropout=1.5, preserve_symmetry=True), ValueError, ["noise_dropout", "1.5"]),
    ("FSQ", dict(allowed_dtypes=("float32",)), TypeError, ["allowed_dtypes"]),
    ("FSP", dict(levels=[3, 0]), ValueError, ["levels[1]", "0"]),
    ("FSP", dict(act_name="relu"), ValueError, ["act_name", "relu"]),
    ("FSP", dict(vector_norm="l2"), ValueError, ["vector_norm", "l2"]),
    ("FSP", dict(quantize_rate=-0.1), ValueError, ["quantize_rate", "-0.1"]),
    ("LFQ", dict(codebook_size=12), ValueError, ["codebook_size", "12"]),
    ("LFQ", dict(dim=None, codebook_size=None), ValueError, ["dim", "codebook_size"]),
    ("LFQ", dict(has_projections=False, dim=5), ValueError, ["has_projections", "5"]),
    ("LFQ", dict(frac_per_sample_entropy=0.0), ValueError, ["frac_per_sample_entropy", "0.0"]),
    ("LFQ", dict(soft_clamp_input_value=0.5), ValueError, ["soft_clamp_input_value", "0.5"]),
    ("LFQ", dict(codebook_scale=0.0), ValueError, ["codebook_scale", "0.0"]),
    ("LFQ", dict(straight_through_activation="tanh"), TypeError, ["straight_through_activation"]),
    ("EvoLFQ", dict(pop_size=1), ValueError, ["pop_size", "1"]),
    ("EvoLFQ", dict(elitism_count=64), ValueError, ["elitism_count", "64"]),
    ("EvoLFQ", dict(mutation_rate=1.5), ValueError, ["mutation_rate", "1.5"]),
    ("EvoLFQ", dict(dim=None, codebook_size=None), ValueError, ["dim", "codebook_size"]),
    ("EvoLFQ", dict(lfq=nn.Linear(4, 4)), TypeError, ["lfq", "Linear"]),
    ("EvoLFQ", dict(encoder=None), TypeError, ["encoder", "None"]),
    ("ResidualLFQ", dict(codebook_size=24), ValueError, ["codebook_size", "24"]),
    ("ResidualLFQ", dict(soft_clamp_input_value=-1.0), ValueError, ["soft_clamp_input_value", "-1.0"]),
    ("ResidualLFQ", dict(quantize_dropout="yes"), TypeError, ["quantize_dropout", "yes"]),
    ("GroupedResidualLFQ", dict(groups=3), ValueError, ["groups", "3"]),
    ("ResidualFSQ", dict(num_quantizers=0), ValueError, ["num_quantizers", "0"]),
    ("ResidualFSQ", dict(levels=[3, 1]), ValueError, ["levels[1]", "1"]),
    ("ResidualFSQ", dict(soft_clamp_input_value=2.0), ValueError, ["soft_clamp_input_value", "bound_hard_clamp"]),
    ("ResidualFSQ", dict(quantize_dropout_multiple_of=2.5), TypeError, ["quantize_dropout_multiple_of", "2.5"]),
    ("GroupedResidualFSQ", dict(groups=3), ValueError, ["groups", "3"]),
    ("GroupedResidualFSQ", dict(accept_image_fmap=True, is_channel_first=False), ValueError, ["is_channel_first"]),
    ("LatentQuantize", dict(levels=[3, 0]), ValueError, ["levels[1]", "0"]),
    ("LatentQuantize", dict(levels=[3, 4], codebook_dim=3), ValueError, ["codebook_dim", "3"]),
    ("LatentQuantize", dict(levels=3), ValueError, ["codebook_dim"]),
    ("LatentQuantize", dict(commitment_loss_weight=-1.0), ValueError, ["commitment_loss_weight", "-1.0"]),
    ("LatentQuantize", dict(optimize_values="yes"), TypeError, ["optimize_values", "yes"]),
    (
        "LatentQuantize",
        dict(optimize_values=False, in_place_codebook_optimizer=torch.optim.SGD),
        ValueError,
        ["in_place_codebook_optimizer", "optimize_values"],
    ),  # fmt: skip
    ("SimVQ", dict(codebook_size=0), ValueError, ["codebook_size", "0"]),
    ("SimVQ", dict(frozen_codebook_dim=0), ValueError, ["frozen_codebook_dim", "0"]),
    ("SimVQ", dict(codebook_transform=lambda t: t), TypeError, ["codebook_transform"]),
    ("SimVQ", dict(init_fn=lambda t: t[:2]), ValueError, ["init_fn", "(8, 4)"]),
    ("SimVQ", dict(commitment_weight=-1.0), ValueError, ["commitment_weight", "-1.0"]),
    ("ResidualSimVQ", dict(heads=2), ValueError, ["heads", "2"]),
    ("ResidualSimVQ", dict(quantize_dropout_cutoff_index=-1), ValueError, ["quantize_dropout_cutoff_index", "-1"]),
    ("BinaryMapper", dict(bits=0), ValueError, ["bits", "0"]),
    ("BinaryMapper", dict(bits=100), ValueError, ["bits", "100"]),
    ("HierarchicalVQ", dict(scales=()), TypeError, ["scales"]),
    ("HierarchicalVQ", dict(scales=(2, 1)), ValueError, ["scales", "(2, 1)"]),
    ("HierarchicalVQ", dict(scales=(1, 0)), ValueError, ["scales", "0"]),
    ("HierarchicalVQ", dict(scales=((1, 2, 2), 2), accept_image_fmap=True), ValueError, ["scales", "(1, 2, 2)"]),
    ("HierarchicalVQ", dict(codebook_size=(8, 16)), ValueError, ["shared_codebook", "codebook_size"]),
    ("HierarchicalVQ", dict(codebook_size=(8, 16, 32), shared_codebook=False), ValueError, ["codebook_size"]),
    ("HierarchicalVQ", dict(nested_dropout=1.5), ValueError, ["nested_dropout", "1.5"]),
    ("HierarchicalVQ", dict(accept_image_fmap=True, accept_3d_fmap=True), ValueError, ["accept_3d_fmap"]),
]


@pytest.mark.parametrize(
    "class_name,overrides,error,words",
    INVALID_VALUES,
    ids=[f"{c}-" + ",".join(f"{k}={v!r}" for k, v in o.items()) for c, o, _, _ in INVALID_VALUES],
)
def test_invalid_values_raise_naming_the_argument_and_the_value(class_name, overrides, error, words):
    config = dict(BASE_CONFIGS[class_name], **overrides)
    with pytest.raises(error) as info:
        getattr(vqp, class_name)(**config)
    assert_names(info.value, *words)


def test_sequential_needs_exactly_one_quantizer():
    with pytest.raises(ValueError, match="exactly one quantizer, got 0"):
        vqp.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="exactly one quantizer, got 2"):
        vqp.Sequential(vqp.FSQ(levels=[3]), vqp.FSQ(levels=[3]))


def test_a_failing_constructor_draws_no_random_numbers():
    """Arguments are checked before any state is built: the global RNG is where it was."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    for class_name, overrides, error, words in INVALID_VALUES:
        if "init_fn" in overrides:  # what init_fn returns is known only by calling it on random codes
            continue
        torch.manual_seed(0)
        with pytest.raises(error, match=re.escape(str(words[0]))):
            getattr(vqp, class_name)(**dict(BASE_CONFIGS[class_name], **overrides))
        assert torch.equal(torch.rand(3), expected), f"{class_name}({overrides}) drew random numbers"


# ----------------------------------------------------------------------------------------------------------
# forward inputs


class InputSpec:
    """A training-mode module, a valid input shape, the axis holding the features and the ranks it takes."""

    def __init__(self, make, shape, feature_axis, min_rank, max_rank=None):
        self.make, self.shape, self.feature_axis = make, shape, feature_axis
        self.min_rank, self.max_rank = min_rank, max_rank


INPUT_SPECS = {
    "VectorQuantize": InputSpec(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True, threshold_ema_dead_code=1),
        (2, 5, 4), -1, 2, 3,
    ),
    "VectorQuantize-image": InputSpec(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, accept_image_fmap=True, affine_param=True),
        (2, 4, 3, 3), 1, 4, 4,
    ),
    "VectorQuantize-channel-first": InputSpec(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, channel_last=False, kmeans_init=True), (2, 4, 5), 1, 3, 3
    ),
    "ResidualVQ": InputSpec(
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, kmeans_init=True), (2, 5, 4), -1, 3, 3
    ),
    "ResidualVQ-image": InputSpec(
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, accept_image_fmap=True),
        (2, 4, 3, 3), 1, 4, 4,
    ),
    "GroupedResidualVQ": InputSpec(
        lambda: vqp.GroupedResidualVQ(dim=4, codebook_size=8, num_quantizers=2, groups=2, kmeans_init=True),
        (2, 5, 4), -1, 3, 3,
    ),
    "RandomProjectionQuantizer": InputSpec(
        lambda: vqp.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3, num_codebooks=2),
        (2, 5, 4), -1, 3, 3,
    ),
    "FSQ": InputSpec(lambda: vqp.FSQ(levels=[3, 4], dim=4), (2, 5, 4), -1, 2),
    "FSP": InputSpec(lambda: vqp.FSP(levels=[3, 4], dim=4), (2, 5, 4), -1, 2),
    "LFQ": InputSpec(lambda: vqp.LFQ(dim=4, codebook_size=16), (2, 5, 4), -1, 2),
    "EvoLFQ": InputSpec(
        lambda: vqp.EvoLFQ(nn.Identity(), nn.Identity(), dim=4, codebook_size=16), (2, 5, 4), -1, 2
    ),
    "ResidualLFQ": InputSpec(
        lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2), (2, 5, 4), -1, 3
    ),
    "GroupedResidualLFQ": InputSpec(
        lambda: vqp.GroupedResidualLFQ(dim=4, codebook_size=16, num_quantizers=2, groups=2), (2, 5, 4), -1, 3, 3
    ),
    "ResidualFSQ": InputSpec(lambda: vqp.ResidualFSQ(levels=[3, 4], num_quantizers=2, dim=4), (2, 5, 4), -1, 3),
    "GroupedResidualFSQ": InputSpec(
        lambda: vqp.GroupedResidualFSQ(levels=[3, 4], num_quantizers=2, dim=4, groups=2), (2, 5, 4), -1, 3
    ),
    "LatentQuantize": InputSpec(
        lambda: vqp.LatentQuantize(
            levels=[3, 4], dim=4, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
        ),
        (2, 5, 4), -1, 2,
    ),
    "SimVQ": InputSpec(lambda: vqp.SimVQ(dim=4, codebook_size=8), (2, 5, 4), -1, 2),
    "ResidualSimVQ": InputSpec(
        lambda: vqp.ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=2), (2, 5, 4), -1, 3
    ),
    "BinaryMapper": InputSpec(lambda: vqp.BinaryMapper(bits=3), (2, 5, 3), -1, 1),
    "HierarchicalVQ": InputSpec(
        lambda: vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2)), (2, 4, 4), 1, 3, 3
    ),
}  # fmt: skip


def test_every_public_quantizer_has_an_input_spec():
    covered = {name.split("-")[0] for name in INPUT_SPECS}
    assert quantizer_names() <= covered, quantizer_names() - covered


def full_state(module):
    """Every parameter and buffer (persistent or not), cloned."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return {name: t.detach().clone() for name, t in tensors.items()}


def assert_state_unchanged(module, before):
    after = full_state(module)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), f"{name} changed by a failing call"


def bad_inputs(spec: InputSpec):
    """(label, input, error type, words the message must contain)."""
    shape = list(spec.shape)
    size = shape[spec.feature_axis]
    yield "list", torch.randn(spec.shape).tolist(), TypeError, []
    yield "int64", torch.ones(spec.shape, dtype=torch.long), TypeError, ["int64"]
    yield "bool", torch.ones(spec.shape, dtype=torch.bool), TypeError, ["bool"]
    wider = list(shape)
    wider[spec.feature_axis] = size + 1
    yield "feature size", torch.randn(wider), ValueError, [str(size), str(tuple(wider))]
    low = torch.randn(shape[-spec.min_rank + 1 :]) if spec.min_rank > 1 else torch.tensor(1.0)
    yield "rank too low", low, ValueError, [str(tuple(low.shape))]
    if spec.max_rank is not None:
        high = torch.randn(*shape, 1) if spec.feature_axis == 1 else torch.randn(shape[0], 1, *shape[1:])
        yield "rank too high", high, ValueError, [str(tuple(high.shape))]


INPUT_CASES = [(name, *case) for name, spec in INPUT_SPECS.items() for case in bad_inputs(spec)]


@pytest.mark.parametrize("spec_name,label,x,error,words", INPUT_CASES, ids=[f"{c[0]}-{c[1]}" for c in INPUT_CASES])
def test_a_bad_input_raises_showing_the_shape_and_changes_nothing(spec_name, label, x, error, words):
    spec = INPUT_SPECS[spec_name]
    module = spec.make().train()
    module(torch.randn(spec.shape))  # past k-means initialisation: statistics exist to be disturbed
    before = full_state(module)
    with pytest.raises(error) as info:
        module(x)
    assert_names(info.value, *words)
    assert_state_unchanged(module, before)


@pytest.mark.parametrize("spec_name", list(INPUT_SPECS))
def test_a_valid_input_still_works_after_a_failed_call(spec_name):
    spec = INPUT_SPECS[spec_name]
    module = spec.make().train()
    with pytest.raises(TypeError, match=r"(x|z|logits) must be a floating point tensor, got (dtype )?torch.int64"):
        module(torch.ones(spec.shape, dtype=torch.long))
    out = module(torch.randn(spec.shape))
    first = out[0] if isinstance(out, tuple) else out
    assert isinstance(first, torch.Tensor)


# ----------------------------------------------------------------------------------------------------------
# forward keyword arguments that fail must fail before any state changes


def _kmeans_vq():
    return vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True)


def _kmeans_rvq():
    return vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, kmeans_init=True, threshold_ema_dead_code=1)


X = torch.randn(2, 5, 4)
LONG = dict(dtype=torch.long)

FAILING_CALLS = [
    ("vq mask shape", _kmeans_vq, lambda m: m(X, mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, ["(2, 3)"]),
    ("vq mask type", _kmeans_vq, lambda m: m(X, mask=[[True] * 5] * 2), TypeError, ["mask"]),
    (
        "vq mask and lens",
        _kmeans_vq,
        lambda m: m(X, mask=torch.ones(2, 5).bool(), lens=torch.tensor([1, 2])),
        ValueError,
        ["lens"],
    ),  # fmt: skip
    ("vq lens batch", _kmeans_vq, lambda m: m(X, lens=torch.tensor([1, 2, 3])), ValueError, ["lens", "(2,)", "(3,)"]),
    ("vq topk 0", _kmeans_vq, lambda m: m(X, topk=0), ValueError, ["topk", "0"]),
    ("vq indices range", _kmeans_vq, lambda m: m(X, indices=torch.full((2, 5), 8)), ValueError, ["indices", "8"]),
    ("rvq mask shape", _kmeans_rvq, lambda m: m(X, mask=torch.ones(2, 4).bool()), ValueError, ["(2, 4)"]),
    ("rvq beam 0", _kmeans_rvq, lambda m: m(X, beam_size=0), ValueError, ["beam_size", "0"]),
    (
        "rvq indices depth",
        _kmeans_rvq,
        lambda m: m(X, indices=torch.zeros(2, 5, 3, **LONG)),
        ValueError,
        ["(2, 5, 2)", "(2, 5, 3)"],
    ),  # fmt: skip
    (
        "rvq indices range",
        _kmeans_rvq,
        lambda m: m(X, indices=torch.full((2, 5, 2), 8, **LONG)),
        ValueError,
        ["codebook_size"],
    ),  # fmt: skip
    (
        "rvq indices dropped",
        _kmeans_rvq,
        lambda m: m(X, indices=torch.full((2, 5, 2), -1, **LONG)),
        ValueError,
        ["-1"],
    ),  # fmt: skip
    ("rvq indices float", _kmeans_rvq, lambda m: m(X, indices=torch.zeros(2, 5, 2)), TypeError, ["integer"]),
    (
        "grvq indices groups",
        lambda: vqp.GroupedResidualVQ(dim=4, groups=2, codebook_size=8, num_quantizers=2, kmeans_init=True),
        lambda m: m(X, indices=[torch.zeros(2, 5, 2, **LONG)]),
        ValueError,
        ["2"],
    ),  # fmt: skip
    (
        "lfq mask shape",
        lambda: vqp.LFQ(dim=4, codebook_size=16),
        lambda m: m(X, mask=torch.ones(2, 3).bool()),
        ValueError,
        ["(2, 3)"],
    ),  # fmt: skip
    (
        "lfq inv_temperature",
        lambda: vqp.LFQ(dim=4, codebook_size=16),
        lambda m: m(X, inv_temperature="hot"),
        TypeError,
        ["inv_temperature"],
    ),  # fmt: skip
    (
        "rlfq mask shape",
        lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2),
        lambda m: m(X, mask=torch.ones(2, 3).bool()),
        ValueError,
        ["(2, 3)"],
    ),  # fmt: skip
    ("fsp eps", lambda: vqp.FSP(levels=[3, 4], dim=4), lambda m: m(X, eps="small"), TypeError, ["eps"]),
    (
        "rpq indices shape",
        lambda: vqp.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3),
        lambda m: m(X, indices=torch.zeros(2, 4, **LONG)),
        ValueError,
        ["(2, 5)", "(2, 4)"],
    ),  # fmt: skip
    (
        "rpq indices float",
        lambda: vqp.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3),
        lambda m: m(X, indices=torch.zeros(2, 5)),
        TypeError,
        ["integer"],
    ),  # fmt: skip
    (
        "hvq mask shape",
        lambda: vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2)),
        lambda m: m(torch.randn(2, 4, 4), mask=torch.ones(2, 3).bool()),
        ValueError,
        ["(2, 3)"],
    ),  # fmt: skip
    (
        "hvq indices",
        lambda: vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2)),
        lambda m: m(torch.randn(2, 4, 4), indices=(torch.zeros(2, 1, **LONG),)),
        ValueError,
        ["indices"],
    ),  # fmt: skip
    (
        "bm temperature",
        lambda: vqp.BinaryMapper(bits=3),
        lambda m: m(torch.randn(2, 3), temperature=0.0),
        ValueError,
        ["temperature", "0.0"],
    ),  # fmt: skip
    ("bm logits bits", lambda: vqp.BinaryMapper(bits=3), lambda m: m(torch.randn(2, 4)), ValueError, ["3", "(2, 4)"]),
]


@pytest.mark.parametrize("label,make,call,error,words", FAILING_CALLS, ids=[case[0] for case in FAILING_CALLS])
def test_a_failing_call_raises_before_changing_any_state(label, make, call, error, words):
    module = make().train()
    before = full_state(module)
    with pytest.raises(error) as info:
        call(module)
    assert_names(info.value, *words)
    assert_state_unchanged(module, before)


def test_vector_quantize_indices_of_the_wrong_shape_raise_value_error_and_change_nothing():
    module = _kmeans_vq().train()
    before = full_state(module)
    with pytest.raises(ValueError, match=r"indices must have the shape .*\(2, 5\), got \(2, 3\)"):
        module(X, indices=torch.zeros(2, 3, dtype=torch.long))
    assert_state_unchanged(module, before)


def test_vector_quantize_float_indices_raise_type_error():
    with pytest.raises(TypeError, match="indices must be an integer torch.Tensor, got torch.float32"):
        _kmeans_vq().train()(X, indices=torch.zeros(2, 5))


# ----------------------------------------------------------------------------------------------------------
# empty batches: either the documented empty outputs or a ValueError


EMPTY_CASES = [
    ("FSQ", lambda: vqp.FSQ(levels=[3, 4], dim=4)),
    ("LFQ", lambda: vqp.LFQ(dim=4, codebook_size=16)),
    ("FSP", lambda: vqp.FSP(levels=[3, 4], dim=4)),
    ("LatentQuantize", lambda: vqp.LatentQuantize(levels=[3, 4], dim=4)),
    ("ResidualFSQ", lambda: vqp.ResidualFSQ(levels=[3, 4], num_quantizers=2, dim=4)),
    ("ResidualLFQ", lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2)),
    ("RandomProjectionQuantizer", lambda: vqp.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3)),
    ("VectorQuantize", lambda: vqp.VectorQuantize(dim=4, codebook_size=8, threshold_ema_dead_code=1)),
    ("ResidualVQ", lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2)),
    ("SimVQ", lambda: vqp.SimVQ(dim=4, codebook_size=8)),
    ("ResidualSimVQ", lambda: vqp.ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=2)),
    ("VectorQuantize-kmeans", lambda: vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True)),
    ("ResidualVQ-kmeans", lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, kmeans_init=True)),
]


@pytest.mark.parametrize("name,make", EMPTY_CASES)
@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 0, 4)], ids=["no samples", "no tokens"])
def test_an_empty_batch_gives_empty_outputs_and_changes_nothing(name, make, shape):
    module = make().train()
    before = full_state(module)
    out = module(torch.randn(shape))
    outputs = out if isinstance(out, tuple) else (out,)
    quantized_or_indices = outputs[0]
    assert quantized_or_indices.shape[:2] == shape[:2]
    assert_state_unchanged(module, before)
    for loss in outputs[1:]:  # a batch without tokens has nothing to penalise
        if isinstance(loss, torch.Tensor) and loss.is_floating_point():
            assert torch.equal(loss, torch.zeros_like(loss)), loss


# ----------------------------------------------------------------------------------------------------------
# decoders refuse indices that are not integers


def _long(*shape):
    return torch.zeros(shape, dtype=torch.long)


DECODERS = [
    ("VectorQuantize.get_output_from_indices", lambda: vqp.VectorQuantize(dim=4, codebook_size=8),
     "get_output_from_indices", _long(2, 5)),
    ("VectorQuantize.get_codes_from_indices", lambda: vqp.VectorQuantize(dim=4, codebook_size=8),
     "get_codes_from_indices", _long(2, 5)),
    ("ResidualVQ", lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2), "get_output_from_indices",
     _long(2, 5, 2)),
    ("GroupedResidualVQ", lambda: vqp.GroupedResidualVQ(dim=4, groups=2, codebook_size=8, num_quantizers=2),
     "get_output_from_indices", _long(2, 2, 5, 2)),
    ("ResidualFSQ", lambda: vqp.ResidualFSQ(levels=[3, 4], num_quantizers=2), "get_output_from_indices",
     _long(2, 5, 2)),
    ("GroupedResidualFSQ", lambda: vqp.GroupedResidualFSQ(levels=[3, 4], dim=4, groups=2, num_quantizers=2),
     "get_output_from_indices", _long(2, 2, 5, 2)),
    ("ResidualLFQ", lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2), "get_output_from_indices",
     _long(2, 5, 2)),
    ("GroupedResidualLFQ", lambda: vqp.GroupedResidualLFQ(dim=4, groups=2, codebook_size=4, num_quantizers=2),
     "get_output_from_indices", _long(2, 2, 5, 2)),
    ("ResidualSimVQ", lambda: vqp.ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=2),
     "get_output_from_indices", _long(2, 5, 2)),
    ("LatentQuantize", lambda: vqp.LatentQuantize(levels=[3, 4], dim=2), "indices_to_codes", _long(2, 5)),
    ("SimVQ", lambda: vqp.SimVQ(dim=4, codebook_size=8), "indices_to_codes", _long(2, 5)),
    ("FSP", lambda: vqp.FSP(levels=[3, 4]), "indices_to_codes", _long(2, 5)),
    ("FSQ", lambda: vqp.FSQ(levels=[3, 4]), "indices_to_codes", _long(2, 5)),
    ("LFQ", lambda: vqp.LFQ(dim=4, codebook_size=16), "indices_to_codes", _long(2, 5)),
]  # fmt: skip


@pytest.mark.parametrize("label,make,method,indices", DECODERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=["float", "bool"])
def test_decoders_refuse_indices_that_are_not_integers(label, make, method, indices, dtype):
    decode = getattr(make(), method)
    decode(indices)  # integer indices work
    with pytest.raises(TypeError, match="indices"):
        decode(indices.to(dtype))


def test_hierarchical_vq_decoder_refuses_float_indices():
    hvq = vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2))
    with pytest.raises(TypeError, match="indices"):
        hvq.get_output_from_indices((torch.zeros(2, 1), torch.zeros(2, 2)))


def test_binary_mapper_log_prob_refuses_float_indices():
    with pytest.raises(TypeError, match="indices"):
        vqp.BinaryMapper(bits=3).log_prob(torch.randn(2, 3), indices=torch.zeros(2))


# ----------------------------------------------------------------------------------------------------------
# accepted edge values must work


def test_kmeans_with_zero_iterations_initialises_finite_codes_from_the_batch():
    vq = vqp.VectorQuantize(dim=2, codebook_size=3, kmeans_init=True, kmeans_iters=0).train()
    x = torch.randn(2, 4, 2)
    quantized, _, _ = vq(x)
    assert torch.isfinite(vq.codebook).all() and torch.isfinite(quantized).all()
