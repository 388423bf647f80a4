"""Mixed precision: every quantizer under CPU autocast (bfloat16 and float16).

- training steps give finite losses and leave every codebook, parameter and statistic in float32;
- the output has the input's dtype (a float32 input under autocast gives float32, a half input gives half);
- on inputs exactly representable in half precision, from the same float32 state, the indices equal the
  float32 indices, in training and in eval mode (the search runs in float32 whatever the autocast dtype).
  Configurations without Linear/conv projections are used for that check: a projection under autocast
  runs in half precision and legitimately rounds its outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import vector_quantize_pytorch as vqp

HALF_DTYPES = [torch.bfloat16, torch.float16]


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


def second_output(out):
    return out[1]


def hierarchical_indices(out):
    return torch.cat([i.flatten(1) for i in out[1]], dim=1)


@dataclass
class Case:
    make: Callable[[], nn.Module]
    shape: tuple
    indices: Callable = second_output  # output -> indices
    quantized: Callable = first_output  # output -> the tensor in the input's dtype (None: indices only)
    exact: bool = True  # indices must equal the float32 indices
    kwargs: dict | None = None
    keeps_half_input: bool = True  # a half input gives a half output (else float32: BinaryMapper's codes)


CASES = {
    "VectorQuantize": Case(lambda: vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True,
                                                      threshold_ema_dead_code=1), (2, 6, 4)),
    "VectorQuantize-cosine-heads": Case(lambda: vqp.VectorQuantize(
        dim=4, codebook_size=8, heads=2, codebook_dim=2, separate_codebook_per_head=True, use_cosine_sim=True),
        (2, 6, 4)),
    "VectorQuantize-learnable": Case(lambda: vqp.VectorQuantize(
        dim=4, codebook_size=8, learnable_codebook=True, ema_update=False), (2, 6, 4)),
    "VectorQuantize-projected": Case(lambda: vqp.VectorQuantize(dim=4, codebook_size=8, codebook_dim=3),
                                     (2, 6, 4), exact=False),
    "ResidualVQ": Case(lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, kmeans_init=True),
                       (2, 6, 4)),
    "GroupedResidualVQ": Case(lambda: vqp.GroupedResidualVQ(dim=4, codebook_size=8, num_quantizers=2, groups=2),
                              (2, 6, 4)),
    "RandomProjectionQuantizer": Case(lambda: vqp.RandomProjectionQuantizer(
        dim=4, codebook_size=8, codebook_dim=3, num_codebooks=2), (2, 6, 4), indices=lambda out: out,
        quantized=None),
    "FSQ": Case(lambda: vqp.FSQ(levels=[3, 4]), (2, 6, 2)),
    "FSQ-projected": Case(lambda: vqp.FSQ(levels=[3, 4], dim=4), (2, 6, 4), exact=False),
    "FSP": Case(lambda: vqp.FSP(levels=[3, 4], dim=2, quantize_rate=0.5), (2, 6, 2)),
    "ResidualFSQ": Case(lambda: vqp.ResidualFSQ(levels=[3, 4], num_quantizers=2), (2, 6, 2)),
    "GroupedResidualFSQ": Case(lambda: vqp.GroupedResidualFSQ(levels=[3, 4], num_quantizers=2, dim=4, groups=2),
                               (2, 6, 4)),
    "LFQ": Case(lambda: vqp.LFQ(dim=4, codebook_size=16, commitment_loss_weight=0.25), (2, 6, 4)),
    "LFQ-projected-spherical": Case(lambda: vqp.LFQ(dim=6, codebook_size=16, spherical=True), (2, 6, 6),
                                    exact=False),
    "ResidualLFQ": Case(lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2), (2, 6, 4)),
    "GroupedResidualLFQ": Case(lambda: vqp.GroupedResidualLFQ(dim=8, codebook_size=16, num_quantizers=2,
                                                              groups=2), (2, 6, 8)),
    "EvoLFQ": Case(lambda: vqp.EvoLFQ(nn.Identity(), nn.Identity(), dim=4, codebook_size=16), (2, 6, 4)),
    "LatentQuantize": Case(lambda: vqp.LatentQuantize(levels=[3, 4], dim=2), (2, 6, 2)),
    "SimVQ": Case(lambda: vqp.SimVQ(dim=4, codebook_size=8), (2, 6, 4)),
    "ResidualSimVQ": Case(lambda: vqp.ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=2), (2, 6, 4)),
    "BinaryMapper": Case(lambda: vqp.BinaryMapper(bits=3), (2, 6, 3), indices=lambda out: out[2],
                         kwargs=dict(return_indices=True, deterministic=True), keeps_half_input=False),
    "HierarchicalVQ": Case(lambda: vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4),
                                                      accept_image_fmap=True), (2, 4, 4, 4),
                           indices=hierarchical_indices, exact=False),
}  # fmt: skip


def test_every_public_quantizer_is_covered():
    covered = {name.split("-")[0] for name in CASES}
    assert {getattr(cls, "__name__", cls) for cls in vqp.QUANTIZERS} <= covered


def representable(shape, seed=0) -> torch.Tensor:
    """Multiples of 1/8 in [-4, 4]: at most 6 significant bits, exact in bfloat16 and float16."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (x * 8).round().clamp(-32, 32) / 8


def float_tensors(out):
    items = out if isinstance(out, tuple) else (out,)
    found = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            found.append(item)
        elif isinstance(item, (tuple, list)):
            found.extend(float_tensors(tuple(item)))
    return found


def training_loss(out) -> torch.Tensor:
    return sum((t.float().square().mean() for t in float_tensors(out)), torch.zeros(()))


def forward(module, x, case, dtype=None, seed=0):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return module(x, **(case.kwargs or {}))


def assert_float32_state(module):
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == torch.float32, f"{name} is {t.dtype}"


def trained_base(case: Case) -> nn.Module:
    """The case's module after one float32 training step (k-means initialisation and the like)."""
    torch.manual_seed(0)
    module = case.make().train()
    forward(module, representable(case.shape, seed=99), case)
    return module


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_trains_under_autocast_with_float32_state_and_the_inputs_dtype(name, dtype):
    case = CASES[name]
    module = trained_base(case)
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.01) if parameters else None
    for step in range(3):
        x = representable(case.shape, seed=step)
        out = forward(module, x, case, dtype, seed=step)
        if case.quantized is not None:
            assert case.quantized(out).dtype == torch.float32
        loss = training_loss(out)
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        if optimizer is not None and loss.requires_grad:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert_float32_state(module)
        for t in module.state_dict().values():
            if t.is_floating_point():
                assert torch.isfinite(t).all()

    if case.quantized is not None:  # a half input comes back in half precision
        expected = dtype if case.keeps_half_input else torch.float32
        out = forward(module, representable(case.shape).to(dtype), case, dtype)
        assert case.quantized(out).dtype == expected
        module.eval()
        with torch.no_grad():
            out = forward(module, representable(case.shape).to(dtype), case, dtype)
        assert case.quantized(out).dtype == expected


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.exact])
def test_indices_under_autocast_equal_the_float32_indices(name, dtype):
    case = CASES[name]
    base = trained_base(case)
    x = representable(case.shape, seed=1)
    for mode in ("train", "eval"):
        full, half = copy.deepcopy(base).train(mode == "train"), copy.deepcopy(base).train(mode == "train")
        expected = case.indices(forward(full, x, case, None, seed=3))
        assert torch.equal(case.indices(forward(half, x, case, dtype, seed=3)), expected), f"{mode}, float32 input"
        assert torch.equal(case.indices(forward(copy.deepcopy(base).train(mode == "train"), x.to(dtype), case,
                                                dtype, seed=3)), expected), f"{mode}, {dtype} input"  # fmt: skip
