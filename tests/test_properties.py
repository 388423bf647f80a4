"""Property-based tests over the constructor arguments and input shapes of every public class.

Hypothesis draws a configuration from each class's valid space (sizes, options, input layouts, masks,
training or eval mode). Two tests per class:

- valid calls (VALID_EXAMPLES per class, none corrupted): the configuration builds, runs, and returns the
  documented output shapes in the input's dtype; decoding the indices reproduces the quantized output, bit for
  bit in eval mode and to 1e-5 in training mode (with the codebook state the forward used, see ``run``);
- every corruption kind for every class, one test each: a constructor argument (zero or negative sizes, wrong
  types, NaN, inconsistent options) or the input (wrong feature size, wrong rank, integer or bool dtype, not a
  tensor). It raises ValueError or TypeError whose message names the corrupted argument (the input's name, e.g.
  ``x``, for an input corruption), never an AssertionError, IndexError or RuntimeError from inside.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import vector_quantize_pytorch as vqp

# a fixed, small set of examples in the test suite; set VQ_PROPERTY_EXAMPLES=500 (say) to explore at random
EXPLORE = int(os.environ.get("VQ_PROPERTY_EXAMPLES", "0"))
VALID_EXAMPLES = 20
CORRUPT_EXAMPLES = 3
SETTINGS = settings(
    max_examples=EXPLORE or VALID_EXAMPLES,
    derandomize=not EXPLORE,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CORRUPT_SETTINGS = settings(SETTINGS, max_examples=EXPLORE or CORRUPT_EXAMPLES)


@dataclasses.dataclass
class Trial:
    """One drawn call: constructor arguments, input, forward arguments, and what the input's layout allows."""

    kwargs: dict
    x: object
    feature_axis: int
    min_rank: int
    max_rank: int | None
    forward_kwargs: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)  # what the checks need: token shape, depth, ...

    def replace(self, **changes) -> Trial:
        return dataclasses.replace(self, **changes)


sizes = st.integers(1, 3)


def randn(*shape):
    return torch.randn(shape)


def token_shape(trial: Trial) -> tuple[int, ...]:
    return trial.info["tokens"]


# ----------------------------------------------------------------------------------------------------------
# corruptions


def input_corruptions(trial: Trial):
    """Inputs that must be refused: (label, corrupted trial)."""
    x = trial.x
    shape = list(x.shape)
    wider = list(shape)
    wider[trial.feature_axis] += 1
    if len(shape) == 3 and trial.feature_axis in (-1, 2) and wider[1] == shape[-1]:
        wider[1] += 1  # LatentQuantize reads a 3-d input whose last axis lacks the features as (b, dim, n)
    yield "feature size", trial.replace(x=randn(*wider))
    low = shape[len(shape) - trial.min_rank + 1 :] if trial.min_rank > 1 else []
    yield "rank too low", trial.replace(x=randn(*low))
    if trial.max_rank is not None:
        ones = [1] * (trial.max_rank - len(shape) + 1)
        high = randn(*shape, *ones) if trial.feature_axis == 1 else randn(shape[0], *ones, *shape[1:])
        yield "rank too high", trial.replace(x=high)
    yield "int64 input", trial.replace(x=x.long())
    yield "int32 input", trial.replace(x=x.int())
    yield "bool input", trial.replace(x=x > 0)
    yield "not a tensor", trial.replace(x=x.tolist())


class Derived:
    """A bad value that depends on the drawn configuration, e.g. a group count that cannot divide ``dim``."""

    def __init__(self, describe: str, value_for):
        self.describe, self.value_for = describe, value_for

    def __repr__(self):
        return self.describe


def argument_corruptions(trial: Trial, bad_arguments):
    for name, values in bad_arguments:
        for value in values:
            value = value.value_for(trial) if isinstance(value, Derived) else value
            yield f"{name}={value!r}", trial.replace(kwargs={**trial.kwargs, name: value})


@dataclasses.dataclass
class Spec:
    cls: type
    trials: st.SearchStrategy
    bad_arguments: list
    check: object  # (module, trial, outputs, training) -> None


INPUT_CORRUPTIONS = ("feature size", "rank too low", "rank too high", "int64 input", "int32 input", "bool input",
                     "not a tensor")  # fmt: skip
# the name each class gives its input in error messages (EvoLFQ checks what its encoder returns)
INPUT_NAMES = {"FSQ": "z", "FSP": "z", "LatentQuantize": "z", "BinaryMapper": "logits", "EvoLFQ": "x|encoder"}
# classes that take inputs of any rank from their minimum up (extra axes are spatial): no rank is too high
ANY_RANK = {"FSQ", "FSP", "LFQ", "EvoLFQ", "ResidualLFQ", "ResidualFSQ", "GroupedResidualFSQ", "LatentQuantize",
            "SimVQ", "ResidualSimVQ", "BinaryMapper"}  # fmt: skip


def corruption_kind(label: str) -> str:
    return label.split("=")[0]


def corruption_kinds(class_name: str) -> list[str]:
    inputs = [kind for kind in INPUT_CORRUPTIONS if not (kind == "rank too high" and class_name in ANY_RANK)]
    return [name for name, _ in SPECS[class_name].bad_arguments] + inputs


def decodable_in_training(trial: Trial) -> bool:
    """Whether a training forward's output is the decoding of its indices with the state from before it: not when
    k-means initialises the codebook from the batch, the affine statistics move toward it before the search, a
    shared codebook is updated between levels, or the output is noisy on purpose (FSQ's noise dropout, FSP's
    perturbation, HierarchicalVQ's nested dropout)."""
    kw = trial.kwargs
    return not (kw.get("kmeans_init") or kw.get("affine_param") or kw.get("shared_codebook")
                or kw.get("noise_dropout", 0) > 0 or kw.get("quantize_rate", 1.0) < 1
                or kw.get("nested_dropout", 0) > 0)  # fmt: skip


def run(spec: Spec, data) -> None:
    """One valid call; in training mode the state from before the forward is put back before decoding, since
    EMA steps and dead-code replacement change the codes after the forward quantized with them."""
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="torch seed"))  # inputs and weights replay exactly
    trial = data.draw(spec.trials, label="trial")
    training = data.draw(st.booleans(), label="training")
    module = spec.cls(**trial.kwargs).train(training)
    before = copy.deepcopy(module.state_dict())
    out = module(trial.x, **trial.forward_kwargs)
    trial.info["decode"] = not training or decodable_in_training(trial)
    trial.info["training"] = training
    if training and trial.info["decode"]:
        module.load_state_dict(before)
    spec.check(module, trial, out, training)


def run_corrupted(spec: Spec, kind: str, class_name: str, data) -> None:
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="torch seed"))
    trial = data.draw(spec.trials, label="trial")
    training = data.draw(st.booleans(), label="training")
    corruptions = list(argument_corruptions(trial, spec.bad_arguments)) + list(input_corruptions(trial))
    corruptions = [(label, bad) for label, bad in corruptions if corruption_kind(label) == kind]
    if class_name in ANY_RANK:
        assert trial.max_rank is None, f"{class_name} is listed in ANY_RANK"
    assume(corruptions)  # a class with several layouts may have one of any rank
    label, trial = data.draw(st.sampled_from(corruptions), label="corruption")
    with pytest.raises((ValueError, TypeError)) as info:
        module = spec.cls(**trial.kwargs).train(training)
        module(trial.x, **trial.forward_kwargs)
    named = INPUT_NAMES.get(class_name, "x") if kind in INPUT_CORRUPTIONS else re.escape(kind)
    assert re.search(rf"\b({named})\b", str(info.value)), f"{label}: {info.value}"


def assert_shape(tensor, shape, what):
    assert isinstance(tensor, torch.Tensor), f"{what}: {type(tensor)}"
    assert tuple(tensor.shape) == tuple(shape), f"{what}: shape {tuple(tensor.shape)}, expected {tuple(shape)}"


def assert_decodes(decoded, quantized, trial):
    if not trial.info["decode"]:
        return
    assert decoded.shape == quantized.shape, (decoded.shape, quantized.shape)
    if trial.info["training"]:  # straight-through arithmetic (z + (q - z).detach()) may round the last bit
        torch.testing.assert_close(decoded.to(quantized.dtype), quantized.detach(), atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(decoded.to(quantized.dtype), quantized.detach())


def assert_indices_valid(indices, num_codes):
    assert not indices.is_floating_point()
    assert ((indices >= -1) & (indices < num_codes)).all()


# ----------------------------------------------------------------------------------------------------------
# VectorQuantize


@st.composite
def vq_trials(draw):
    dim = draw(st.integers(1, 5))
    heads = draw(st.sampled_from([1, 1, 2]))
    cosine = draw(st.booleans())
    layout = draw(st.sampled_from(["seq", "single", "channel_first", "image", "video"]))
    kwargs = dict(
        dim=dim,
        codebook_size=draw(st.integers(1, 9)),
        codebook_dim=draw(st.sampled_from([None, 1, 3])),
        heads=heads,
        separate_codebook_per_head=draw(st.booleans()),
        kmeans_init=draw(st.booleans()),
        kmeans_iters=draw(st.integers(0, 3)),
        use_cosine_sim=cosine,
        affine_param=not cosine and draw(st.booleans()),
        threshold_ema_dead_code=draw(st.sampled_from([0, 1, 2.5])),
        decay=draw(st.floats(0.0, 1.0)),
        commitment_weight=draw(st.floats(0.0, 2.0)),
        orthogonal_reg_weight=draw(st.sampled_from([0.0, 0.5])),
        codebook_diversity_loss_weight=draw(st.sampled_from([0.0, 0.1])),
        stochastic_sample_codes=draw(st.booleans()),
        rotation_trick=draw(st.sampled_from([None, False])),
        channel_last=layout != "channel_first",
        accept_image_fmap=layout == "image",
        accept_3d_fmap=layout == "video",
    )
    b, n = draw(sizes), draw(sizes)
    spatial = {"seq": (n,), "single": (), "channel_first": (n,), "image": (n, 2), "video": (2, n, 1)}[layout]
    if layout == "seq":
        x, feature_axis, ranks = randn(b, n, dim), -1, (2, 3)
    elif layout == "single":
        x, feature_axis, ranks = randn(b, dim), -1, (2, 3)
    else:
        x, feature_axis = randn(b, dim, *spatial), 1
        ranks = {"channel_first": (2, 3), "image": (4, 4), "video": (5, 5)}[layout]  # (b, dim) is a single token
    forward_kwargs = {}
    if layout == "seq" and draw(st.booleans()):
        forward_kwargs["mask"] = torch.rand(b, n) < 0.7
    info = dict(tokens=(b, *spatial), heads=heads)
    return Trial(kwargs, x, feature_axis, *ranks, forward_kwargs=forward_kwargs, info=info)


def check_vq(module, trial, out, training):
    quantized, indices, loss = out
    assert_shape(quantized, trial.x.shape, "quantized")
    assert quantized.dtype == trial.x.dtype
    heads = trial.info["heads"]
    assert_shape(indices, token_shape(trial) + ((heads,) if heads > 1 else ()), "indices")
    assert_indices_valid(indices, trial.kwargs["codebook_size"])
    assert_shape(loss, (), "loss")
    assert torch.isfinite(loss)
    assert_decodes(module.get_output_from_indices(indices), quantized, trial)


def test_vector_quantize_single_token_decoding_is_exact():
    torch.manual_seed(299)
    vq = vqp.VectorQuantize(dim=1, codebook_size=1, heads=2, separate_codebook_per_head=True).eval()
    quantized, indices, _ = vq(torch.randn(3, 1))
    assert torch.equal(vq.get_output_from_indices(indices), quantized)


VQ_BAD = [
    ("dim", [0, -2, 2.5]),
    ("codebook_size", [0, "8"]),
    ("heads", [0, 1.0]),
    ("codebook_dim", [0]),
    ("decay", [-0.1, 1.5, math.nan]),
    ("kmeans_iters", [-1]),
    ("threshold_ema_dead_code", [-1.0, math.inf]),
    ("use_cosine_sim", ["yes", 1]),
    ("commitment_weight", [-1.0]),
    ("accept_3d_fmap", [None]),
]


# ----------------------------------------------------------------------------------------------------------
# residual VQ and grouped residual VQ


@st.composite
def rvq_trials(draw):
    dim = draw(st.integers(1, 5))
    depth = draw(st.integers(1, 3))
    uniform = draw(st.booleans())
    codebook_size = draw(st.integers(1, 8)) if uniform else tuple(draw(st.integers(1, 8)) for _ in range(depth))
    implicit = draw(st.booleans()) and draw(st.booleans())
    image = draw(st.booleans())
    kwargs = dict(
        dim=dim,
        num_quantizers=depth,
        codebook_size=codebook_size,
        codebook_dim=draw(st.sampled_from([None, 2])),
        shared_codebook=uniform and draw(st.booleans()),
        kmeans_init=draw(st.booleans()),
        threshold_ema_dead_code=draw(st.sampled_from([0, 1])),
        quantize_dropout=draw(st.booleans()),
        quantize_dropout_cutoff_index=draw(st.integers(0, depth - 1)),
        quantize_dropout_per_sample=draw(st.booleans()),
        beam_size=None if implicit else draw(st.sampled_from([None, 2])),
        implicit_neural_codebook=implicit,
        quant_grad_frac=draw(st.floats(0.0, 1.0)),
        accept_image_fmap=image,
    )
    b, n = draw(sizes), draw(sizes)
    if image:
        x, feature_axis, tokens = randn(b, dim, n, 2), 1, (b, n, 2)
    else:
        x, feature_axis, tokens = randn(b, n, dim), -1, (b, n)
    forward_kwargs = {}
    if not image and draw(st.booleans()):
        forward_kwargs["mask"] = torch.rand(b, n) < 0.7
    sizes_ = codebook_size if isinstance(codebook_size, tuple) else (codebook_size,) * depth
    info = dict(tokens=tokens, depth=depth, num_codes=max(sizes_))
    return Trial(kwargs, x, feature_axis, x.ndim, x.ndim, forward_kwargs=forward_kwargs, info=info)


def check_rvq(module, trial, out, training):
    quantized, indices, losses = out
    depth = trial.info["depth"]
    assert_shape(quantized, trial.x.shape, "quantized")
    assert_shape(indices, token_shape(trial) + (depth,), "indices")
    assert_indices_valid(indices, trial.info["num_codes"])
    assert_shape(losses, (depth,), "losses")
    assert torch.isfinite(losses).all()
    assert_decodes(module.get_output_from_indices(indices), quantized, trial)


RVQ_BAD = [
    ("num_quantizers", [0, "2"]),
    ("codebook_size", [0, (4, 0, 4), "8"]),
    ("heads", [2]),
    ("quantize_dropout_cutoff_index", [-1, 3]),
    ("quantize_dropout_multiple_of", [0]),
    ("beam_size", [0]),
    ("quant_grad_frac", [1.5, math.nan]),
    ("shared_codebook", ["yes"]),
]


@st.composite
def grvq_trials(draw):
    groups = draw(st.integers(1, 3))
    per_group = draw(st.integers(1, 2))
    depth = draw(st.integers(1, 2))
    image = draw(st.booleans())
    dim = groups * per_group
    kwargs = dict(
        dim=dim,
        groups=groups,
        num_quantizers=depth,
        codebook_size=draw(st.integers(1, 6)),
        kmeans_init=draw(st.booleans()),
        quantize_dropout=draw(st.booleans()),
        accept_image_fmap=image,
    )
    b, n = draw(sizes), draw(sizes)
    x, feature_axis, tokens = (randn(b, dim, n, 2), 1, (b, n, 2)) if image else (randn(b, n, dim), -1, (b, n))
    info = dict(tokens=tokens, depth=depth, groups=groups, num_codes=kwargs["codebook_size"])
    return Trial(kwargs, x, feature_axis, x.ndim, x.ndim, info=info)


def check_grouped(module, trial, out, training, *, has_losses=True):
    quantized, indices, *rest = out
    groups, depth = trial.info["groups"], trial.info["depth"]
    assert_shape(quantized, trial.x.shape, "quantized")
    assert_shape(indices, (groups, *token_shape(trial), depth), "indices")
    assert_indices_valid(indices, trial.info["num_codes"])
    if has_losses:
        assert_shape(rest[0], (groups, depth), "losses")
    assert_decodes(module.get_output_from_indices(indices), quantized, trial)


GROUPED_BAD = [("groups", [0, 1.5, Derived("dim + 1", lambda t: t.kwargs["dim"] + 1)]), ("dim", [0])]


# ----------------------------------------------------------------------------------------------------------
# random projection quantizer


@st.composite
def rpq_trials(draw):
    dim, heads = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    kwargs = dict(
        dim=dim,
        codebook_size=draw(st.integers(1, 9)),
        codebook_dim=draw(st.integers(1, 4)),
        num_codebooks=heads,
        norm=draw(st.booleans()),
    )
    b, n = draw(sizes), draw(sizes)
    return Trial(kwargs, randn(b, n, dim), -1, 3, 3, info=dict(tokens=(b, n), heads=heads))


def check_rpq(module, trial, out, training):
    heads = trial.info["heads"]
    assert_shape(out, token_shape(trial) + ((heads,) if heads > 1 else ()), "indices")
    assert_indices_valid(out, trial.kwargs["codebook_size"])
    assert torch.equal(module.train(not training)(trial.x), out)  # the same targets in either mode


RPQ_BAD = [("codebook_dim", [0, None]), ("num_codebooks", [0]), ("norm", ["yes"]), ("kmeans_init", [True])]


# ----------------------------------------------------------------------------------------------------------
# FSQ, FSP, LFQ, EvoLFQ


def layout_input(draw, dim, layouts, channel_first_option=False):
    """An input for a class that takes (b, n, d), (b, d), channel-first (b, d, n) and images (b, d, h, w)."""
    layout = draw(st.sampled_from(layouts))
    b, n = draw(sizes), draw(sizes)
    if layout == "seq":
        return layout, randn(b, n, dim), -1, (b, n)
    if layout == "single":
        return layout, randn(b, dim), -1, (b,)
    if layout == "channel_first":
        return layout, randn(b, dim, n), 1, (b, n)
    return layout, randn(b, dim, n, 2), 1, (b, n, 2)


@st.composite
def fsq_trials(draw):
    levels = draw(st.lists(st.integers(2, 6), min_size=1, max_size=3))
    codebooks = draw(st.integers(1, 2))
    dim = draw(st.sampled_from([None, 1, 3, 5]))
    layout, x, axis, tokens = layout_input(
        draw, dim or len(levels) * codebooks, ["seq", "single", "channel_first", "image"]
    )
    symmetric = 2 in levels or draw(st.booleans())
    kwargs = dict(
        levels=levels,
        dim=dim,
        num_codebooks=codebooks,
        channel_first=layout == "channel_first",
        preserve_symmetry=symmetric,
        noise_dropout=draw(st.sampled_from([0.0, 0.5])) if symmetric else 0.0,
        bound_hard_clamp=draw(st.booleans()),
        orthogonal_rotation=draw(st.booleans()) and len(set(levels)) == 1,
    )
    info = dict(tokens=tokens + ((codebooks,) if codebooks > 1 else ()), num_codes=math.prod(levels))
    return Trial(kwargs, x, axis, 2, None, info=info)


def check_fsq(module, trial, out, training):
    quantized, indices = out
    assert_shape(quantized, trial.x.shape, "quantized")
    assert quantized.dtype == trial.x.dtype
    assert_shape(indices, token_shape(trial), "indices")
    assert_indices_valid(indices, trial.info["num_codes"])
    assert_decodes(module.indices_to_codes(indices), quantized, trial)


FSQ_BAD = [
    ("levels", [[], [3, 1], [3, 0], "35", 8]),
    ("num_codebooks", [0]),
    ("dim", [0, -1]),
    ("noise_dropout", [1.5, -0.5]),
    ("keep_num_codebooks_dim", ["yes"]),
    ("allowed_dtypes", ["float32"]),
]


@st.composite
def fsp_trials(draw):
    levels = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    dim = draw(st.sampled_from([None, 2, 4]))
    channel_first = draw(st.booleans())
    layout, x, axis, tokens = layout_input(
        draw, dim or len(levels), ["channel_first", "image"] if channel_first else ["seq"]
    )
    kwargs = dict(
        levels=levels,
        dim=dim,
        channel_first=channel_first,
        act_name=draw(st.sampled_from(["tanh", "sigmoid", "normal", "laplace", "cauchy"])),
        quantize_rate=draw(st.floats(0.0, 1.0)),
        need_inv_act=draw(st.booleans()),
        vector_norm=draw(st.sampled_from(["none", "var", "kurt", "var_tanh", "var_sigmoid", "var_laplace"])),
    )
    return Trial(kwargs, x, axis, 2, None, info=dict(tokens=tokens, num_codes=math.prod(levels)))


def check_fsp(module, trial, out, training):
    quantized, indices, loss, info = out
    assert_shape(quantized, trial.x.shape, "quantized")
    assert_shape(indices, token_shape(trial), "indices")
    assert indices.dtype == torch.int32
    assert_indices_valid(indices, trial.info["num_codes"])
    assert_shape(loss, (), "loss")
    assert isinstance(info, dict) and "level_indices" in info
    assert_decodes(module.indices_to_codes(indices), quantized, trial)


FSP_BAD = [
    ("levels", [[], [3, 0], "35"]),
    ("act_name", ["relu", ["tanh"]]),
    ("vector_norm", ["l2"]),
    ("quantize_rate", [1.5, math.nan]),
    ("dim", [0]),
    ("channel_first", [1]),
]


@st.composite
def lfq_trials(draw):
    bits = draw(st.integers(1, 4))
    codebooks = draw(st.integers(1, 2))
    dim = draw(st.sampled_from([None, 3]))
    layout, x, axis, tokens = layout_input(draw, dim or bits * codebooks, ["seq", "single", "channel_first", "image"])
    kwargs = dict(
        dim=dim,
        codebook_size=2**bits,
        num_codebooks=codebooks,
        channel_first=True if layout == "channel_first" else None,
        spherical=draw(st.booleans()),
        codebook_scale=draw(st.sampled_from([0.5, 1.0])),
        entropy_loss_weight=draw(st.sampled_from([0.0, 0.1])),
        commitment_loss_weight=draw(st.sampled_from([0.0, 0.25])),
        frac_per_sample_entropy=draw(st.sampled_from([1.0, 0.5])),
        experimental_softplus_entropy_loss=draw(st.booleans()),
    )
    forward_kwargs = {}
    if layout == "seq" and draw(st.booleans()):
        forward_kwargs["mask"] = torch.rand(*tokens) < 0.7
    info = dict(tokens=tokens + ((codebooks,) if codebooks > 1 else ()), num_codes=2**bits)
    return Trial(kwargs, x, axis, 2, None, forward_kwargs=forward_kwargs, info=info)


def check_lfq(module, trial, out, training):
    quantized, indices, loss = out
    assert_shape(quantized, trial.x.shape, "quantized")
    assert_shape(indices, token_shape(trial), "indices")
    assert_indices_valid(indices, trial.info["num_codes"])
    assert_shape(loss, (), "loss")
    assert torch.isfinite(loss)
    assert_decodes(module.indices_to_codes(indices), quantized, trial)


LFQ_BAD = [
    ("codebook_size", [0, 3, 12, 2.0]),
    ("num_codebooks", [0]),
    ("dim", [0]),
    ("frac_per_sample_entropy", [0.0, 1.5]),
    ("codebook_scale", [0.0, -1.0]),
    ("spherical", ["yes"]),
    ("entropy_loss_weight", [math.nan]),
]


@st.composite
def evo_trials(draw):
    bits = draw(st.integers(1, 4))
    layout, x, axis, tokens = layout_input(draw, bits, ["seq", "single"])
    kwargs = dict(encoder=nn.Identity(), decoder=nn.Identity(), dim=bits, codebook_size=2**bits)
    return Trial(kwargs, x, axis, 2, None, info=dict(tokens=tokens, num_codes=2**bits))


def check_evo(module, trial, out, training):
    reconstructed, indices, loss = out
    assert_shape(reconstructed, trial.x.shape, "reconstructed")
    assert_shape(indices, token_shape(trial), "indices")
    assert_indices_valid(indices, trial.info["num_codes"])
    assert_shape(loss, (), "loss")


EVO_BAD = [("pop_size", [1, 0]), ("mutation_rate", [2.0]), ("lfq", ["lfq"]), ("encoder", [3])]


# ----------------------------------------------------------------------------------------------------------
# residual LFQ / FSQ / SimVQ and their grouped variants


@st.composite
def rlfq_trials(draw):
    bits, depth = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dim = draw(st.sampled_from([bits, 3]))
    image = draw(st.booleans())
    kwargs = dict(
        dim=dim,
        num_quantizers=depth,
        codebook_size=2**bits,
        quantize_dropout=draw(st.booleans()),
        soft_clamp_input_value=draw(st.sampled_from([None, 2.0])),
    )
    b, n = draw(sizes), draw(sizes)
    x, axis, tokens = (randn(b, dim, n, 2), 1, (b, n, 2)) if image else (randn(b, n, dim), -1, (b, n))
    info = dict(tokens=tokens, depth=depth, num_codes=2**bits)
    return Trial(kwargs, x, axis, 3, None, info=info)  # rank 4 and up is a channel-first feature map


def check_residual(module, trial, out, training, *, has_losses=True):
    quantized, indices, *rest = out
    depth = trial.info["depth"]
    assert_shape(quantized, trial.x.shape, "quantized")
    assert_shape(indices, token_shape(trial) + (depth,), "indices")
    assert_indices_valid(indices, trial.info["num_codes"])
    if has_losses:
        assert_shape(rest[0], (depth,), "losses")
    assert_decodes(module.get_output_from_indices(indices), quantized, trial)


RESIDUAL_BAD = [
    ("num_quantizers", [0, 1.5]),
    ("quantize_dropout", ["yes"]),
    ("quantize_dropout_cutoff_index", [-1, 5]),
    ("quantize_dropout_multiple_of", [0, 2.5]),
]


@st.composite
def grlfq_trials(draw):
    groups, bits, depth = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    image = draw(st.booleans())
    dim = groups * bits
    kwargs = dict(dim=dim, groups=groups, num_quantizers=depth, codebook_size=2**bits, accept_image_fmap=image)
    b, n = draw(sizes), draw(sizes)
    x, axis, tokens = (randn(b, dim, n, 2), 1, (b, n, 2)) if image else (randn(b, n, dim), -1, (b, n))
    info = dict(tokens=tokens, depth=depth, groups=groups, num_codes=2**bits)
    return Trial(kwargs, x, axis, x.ndim, None if image else 3, info=info)


@st.composite
def rfsq_trials(draw):
    levels = draw(st.lists(st.integers(2, 5), min_size=1, max_size=3))
    depth = draw(st.integers(1, 3))
    dim = draw(st.sampled_from([None, 4]))
    channel_first = draw(st.booleans())
    feature_dim = dim or len(levels)
    b, n = draw(sizes), draw(sizes)
    if channel_first:
        x, axis, tokens = randn(b, feature_dim, n, *draw(st.sampled_from([(), (2,)]))), 1, None
        tokens = (b, *x.shape[2:])
    else:
        x, axis, tokens = randn(b, n, feature_dim), -1, (b, n)
    kwargs = dict(
        levels=levels,
        num_quantizers=depth,
        dim=dim,
        is_channel_first=channel_first,
        quantize_dropout=draw(st.booleans()),
        bound_hard_clamp=draw(st.booleans()),
    )
    info = dict(tokens=tokens, depth=depth, num_codes=math.prod(levels))
    return Trial(kwargs, x, axis, 3, None, info=info)


@st.composite
def grfsq_trials(draw):
    groups, depth = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    levels = draw(st.lists(st.integers(2, 4), min_size=1, max_size=2))
    image = draw(st.booleans())
    dim = groups * draw(st.integers(1, 3))
    kwargs = dict(levels=levels, dim=dim, groups=groups, num_quantizers=depth, accept_image_fmap=image)
    b, n = draw(sizes), draw(sizes)
    x, axis, tokens = (randn(b, dim, n, 2), 1, (b, n, 2)) if image else (randn(b, n, dim), -1, (b, n))
    info = dict(tokens=tokens, depth=depth, groups=groups, num_codes=math.prod(levels))
    return Trial(kwargs, x, axis, 3, None, info=info)


@st.composite
def rsim_trials(draw):
    dim, depth = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    channel_first = draw(st.booleans())
    b, n = draw(sizes), draw(sizes)
    if channel_first:
        x, axis, tokens = randn(b, dim, n, 2), 1, (b, n, 2)
    else:
        x, axis, tokens = randn(b, n, dim), -1, (b, n)
    kwargs = dict(
        dim=dim,
        num_quantizers=depth,
        codebook_size=draw(st.integers(1, 8)),
        channel_first=channel_first,
        quantize_dropout=draw(st.booleans()),
        rotation_trick=draw(st.booleans()),
    )
    info = dict(tokens=tokens, depth=depth, num_codes=kwargs["codebook_size"])
    return Trial(kwargs, x, axis, 3, None, info=info)


# ----------------------------------------------------------------------------------------------------------
# LatentQuantize, SimVQ, BinaryMapper, HierarchicalVQ


@st.composite
def lq_trials(draw):
    levels = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    codebooks = draw(st.integers(1, 2))
    dim = draw(st.sampled_from([len(levels) * codebooks, 3]))
    layout, x, axis, tokens = layout_input(draw, dim, ["seq", "single", "image"])
    kwargs = dict(
        levels=levels,
        dim=dim,
        num_codebooks=codebooks,
        optimize_values=draw(st.booleans()),
        commitment_loss_weight=draw(st.sampled_from([None, 0.1])),
    )
    info = dict(tokens=tokens + ((codebooks,) if codebooks > 1 else ()), num_codes=math.prod(levels))
    return Trial(kwargs, x, axis, 2, None, info=info)


def check_lq(module, trial, out, training):
    quantized, indices, loss = out
    assert_shape(quantized, trial.x.shape, "quantized")
    assert_shape(indices, token_shape(trial), "indices")
    assert indices.dtype == torch.int32
    assert_indices_valid(indices, trial.info["num_codes"])
    assert_shape(loss, (), "loss")
    assert torch.isfinite(loss)
    assert_decodes(module.indices_to_codes(indices), quantized, trial)


LQ_BAD = [
    ("levels", [[], [3, 0], "35"]),
    ("dim", [0, 2.5]),
    ("num_codebooks", [0]),
    ("codebook_dim", [7, 1.5]),
    ("optimize_values", ["yes"]),
    ("quantization_loss_weight", [-1.0, math.nan]),
]


@st.composite
def simvq_trials(draw):
    dim = draw(st.integers(1, 5))
    channel_first = draw(st.booleans())
    layouts = ["single", "channel_first", "image"] if channel_first else ["seq", "single"]
    layout, x, axis, tokens = layout_input(draw, dim, layouts)
    kwargs = dict(
        dim=dim,
        codebook_size=draw(st.integers(1, 9)),
        frozen_codebook_dim=draw(st.sampled_from([None, 2])),
        channel_first=channel_first,
        rotation_trick=draw(st.booleans()),
        commitment_weight=draw(st.floats(0.0, 2.0)),
    )
    return Trial(kwargs, x, axis, 2, None, info=dict(tokens=tokens, num_codes=kwargs["codebook_size"]))


def check_simvq(module, trial, out, training):
    quantized, indices, loss = out
    assert_shape(quantized, trial.x.shape, "quantized")
    assert_shape(indices, token_shape(trial), "indices")
    assert_indices_valid(indices, trial.info["num_codes"])
    assert_shape(loss, (), "loss")
    assert_decodes(module.indices_to_codes(indices), quantized, trial)


SIMVQ_BAD = [
    ("dim", [0]),
    ("codebook_size", [0, "8"]),
    ("frozen_codebook_dim", [0]),
    ("codebook_transform", ["linear"]),
    ("init_fn", [None]),
    ("input_to_quantize_commit_loss_weight", [-0.5]),
]


@st.composite
def binary_mapper_trials(draw):
    bits = draw(st.integers(1, 6))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    kwargs = dict(bits=bits, deterministic_on_eval=draw(st.booleans()))
    forward_kwargs = dict(
        return_indices=draw(st.booleans()),
        reduce_aux_kl_loss=draw(st.booleans()),
        temperature=draw(st.floats(0.1, 2.0)),
    )
    info = dict(tokens=lead, bits=bits)
    return Trial(kwargs, randn(*lead, bits), -1, 1, None, forward_kwargs=forward_kwargs, info=info)


def check_binary_mapper(module, trial, out, training):
    bits, lead = trial.info["bits"], token_shape(trial)
    if trial.forward_kwargs["return_indices"]:
        one_hot, indices, aux = out
        assert_shape(indices, lead, "indices")
        assert_indices_valid(indices, 2**bits)
        assert torch.equal(one_hot.detach().argmax(-1), indices)
    else:
        one_hot, aux = out
    assert_shape(one_hot, (*lead, 2**bits), "one_hot")
    assert torch.equal(one_hot.detach().sum(-1), torch.ones(lead))
    reduced = trial.forward_kwargs["reduce_aux_kl_loss"] or not training
    assert_shape(aux, () if reduced else lead, "aux loss")


BINARY_MAPPER_BAD = [
    ("bits", [0, -1, 1.5, 100]),
    ("kl_loss_threshold", ["ln2", math.nan]),
    ("deterministic_on_eval", [1]),
]


@st.composite
def hvq_trials(draw):
    dim = draw(st.integers(1, 4))
    spatial_dims = draw(st.sampled_from([1, 2]))
    scales = sorted(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    shared = draw(st.booleans())
    codebook_size = (
        draw(st.integers(1, 6)) if shared or draw(st.booleans()) else tuple(draw(st.integers(1, 6)) for _ in scales)
    )
    channel_first = draw(st.booleans())
    kwargs = dict(
        dim=dim,
        codebook_size=codebook_size,
        scales=tuple(scales),
        shared_codebook=shared,
        channel_first=channel_first,
        accept_image_fmap=spatial_dims == 2,
        kmeans_init=draw(st.booleans()),
        share_quant_resi=draw(st.sampled_from([1, 0, 2])),
        quant_resi=draw(st.sampled_from([0.0, 0.5])),
        nested_dropout=draw(st.sampled_from([0.0, 0.5])),
    )
    b = draw(sizes)
    full = tuple(draw(st.integers(1, 5)) for _ in range(spatial_dims))
    x = randn(b, dim, *full) if channel_first else randn(b, *full, dim)
    level_shapes = [(s,) * spatial_dims for s in scales]
    num_codes = max(codebook_size) if isinstance(codebook_size, tuple) else codebook_size
    info = dict(levels=[(b, *shape) for shape in level_shapes], full=full, num_codes=num_codes)
    return Trial(kwargs, x, 1 if channel_first else -1, x.ndim, x.ndim, info=info)


def check_hvq(module, trial, out, training):
    reconstruction, indices, loss = out
    assert_shape(reconstruction, trial.x.shape, "reconstruction")
    assert isinstance(indices, tuple) and len(indices) == len(trial.info["levels"])
    for level_indices, shape in zip(indices, trial.info["levels"]):
        assert_shape(level_indices, shape, "level indices")
        assert_indices_valid(level_indices, trial.info["num_codes"])
    assert_shape(loss, (), "loss")
    if trial.info["decode"]:
        decoded = module.get_output_from_indices(indices, full_shape=trial.info["full"])
        torch.testing.assert_close(decoded, reconstruction)


HVQ_BAD = [
    ("scales", [(), (2, 1), (0, 1), "12", 3]),
    ("codebook_size", [0, (4, 4, 4, 4, 4)]),
    ("dim", [0]),
    ("nested_dropout", [1.5]),
    ("share_quant_resi", [1.5]),
    ("channel_first", ["yes"]),
]


# ----------------------------------------------------------------------------------------------------------
# the tests


SPECS = {
    "VectorQuantize": Spec(vqp.VectorQuantize, vq_trials(), VQ_BAD, check_vq),
    "ResidualVQ": Spec(vqp.ResidualVQ, rvq_trials(), RVQ_BAD, check_rvq),
    "GroupedResidualVQ": Spec(vqp.GroupedResidualVQ, grvq_trials(), GROUPED_BAD + RVQ_BAD[:2], check_grouped),
    "RandomProjectionQuantizer": Spec(vqp.RandomProjectionQuantizer, rpq_trials(), RPQ_BAD, check_rpq),
    "FSQ": Spec(vqp.FSQ, fsq_trials(), FSQ_BAD, check_fsq),
    "FSP": Spec(vqp.FSP, fsp_trials(), FSP_BAD, check_fsp),
    "LFQ": Spec(vqp.LFQ, lfq_trials(), LFQ_BAD, check_lfq),
    "EvoLFQ": Spec(vqp.EvoLFQ, evo_trials(), EVO_BAD, check_evo),
    "ResidualLFQ": Spec(vqp.ResidualLFQ, rlfq_trials(), RESIDUAL_BAD + LFQ_BAD[:1], check_residual),
    "GroupedResidualLFQ": Spec(
        vqp.GroupedResidualLFQ, grlfq_trials(), GROUPED_BAD + RESIDUAL_BAD[:1], check_grouped
    ),
    "ResidualFSQ": Spec(
        vqp.ResidualFSQ, rfsq_trials(), RESIDUAL_BAD + [("levels", [[], [3, 1]])],
        lambda *a: check_residual(*a, has_losses=False),
    ),
    "GroupedResidualFSQ": Spec(
        vqp.GroupedResidualFSQ, grfsq_trials(), GROUPED_BAD + [("levels", [[4, 0]])],
        lambda *a: check_grouped(*a, has_losses=False),
    ),
    "LatentQuantize": Spec(vqp.LatentQuantize, lq_trials(), LQ_BAD, check_lq),
    "SimVQ": Spec(vqp.SimVQ, simvq_trials(), SIMVQ_BAD, check_simvq),
    "ResidualSimVQ": Spec(vqp.ResidualSimVQ, rsim_trials(), RESIDUAL_BAD + [("heads", [2])], check_residual),
    "BinaryMapper": Spec(vqp.BinaryMapper, binary_mapper_trials(), BINARY_MAPPER_BAD, check_binary_mapper),
    "HierarchicalVQ": Spec(vqp.HierarchicalVQ, hvq_trials(), HVQ_BAD, check_hvq),
}  # fmt: skip


def test_every_public_quantizer_has_a_property_test():
    assert {getattr(cls, "__name__", cls) for cls in vqp.QUANTIZERS} <= set(SPECS)


@pytest.mark.parametrize("name", list(SPECS))
@SETTINGS
@given(data=st.data())
def test_a_valid_call_works_with_the_documented_shapes_and_decodes(name, data):
    run(SPECS[name], data)


CORRUPTION_CASES = [(name, kind) for name in SPECS for kind in corruption_kinds(name)]


@pytest.mark.parametrize("name,kind", CORRUPTION_CASES, ids=[f"{n}-{k}" for n, k in CORRUPTION_CASES])
@CORRUPT_SETTINGS
@given(data=st.data())
def test_a_corrupted_call_raises_value_or_type_error_naming_it(name, kind, data):
    run_corrupted(SPECS[name], kind, name, data)
