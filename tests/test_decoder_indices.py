"""Every decoder rejects what it cannot decode (core/validate.py, ``check_code_indices``).

For each family's decoders (``get_codes_from_indices``, ``get_output_from_indices``, ``indices_to_codes``,
``forward(indices=...)``, ``update_indices``, ``log_prob(indices=...)``): indices of any integer dtype (int16,
int32, int64, uint8) decode as int64 ones do; a value at or above the codebook size, a negative value other
than the documented -1, and -1 where it is not documented raise a ``ValueError`` naming the argument, the
offending value and the allowed range; floating point indices raise a ``TypeError`` naming the argument and
the dtype. A rejected call changes no state.

The device branch (no host read: an accelerator, ``torch.compile``, export) is run here on the CPU by replacing
``validate.reads_indices_on_host``: it launches no host-synchronising operator, decodes valid indices bit for
bit as the host branch does, makes the gather fail on an invalid one, and compiles without a graph break.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import vector_quantize_pytorch as vqp
from vector_quantize_pytorch.core import validate

B, N = 2, 5


@dataclass(frozen=True)
class Case:
    """One decoder: ``decode(module, indices)``, valid indices of ``shape`` below ``size``, whether -1 is
    documented (``dropped``), and the argument name the errors use."""

    name: str
    make: Callable[[], nn.Module]
    decode: Callable[[nn.Module, torch.Tensor], object]
    shape: tuple[int, ...]
    size: int
    dropped: bool
    arg: str = "indices"
    uint8: bool = True  # the family accepts uint8 codes (codebooks of at most 256 codes)


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _vq():
    return vqp.VectorQuantize(dim=4, codebook_size=8)


def _updated_codes(module, indices):
    module.update_indices(_x(B, N, 4), indices)
    return module.codebook


def _hvq():
    return vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2), accept_image_fmap=True)


def _hvq_decode(module, indices):
    # level 0 valid, level 1 the probed indices
    return module.get_output_from_indices((torch.zeros(indices.shape[0], 1, 1, dtype=indices.dtype), indices))


CASES = [
    Case("VectorQuantize.get_output_from_indices", _vq, lambda m, i: m.get_output_from_indices(i), (B, N), 8, True),
    Case("VectorQuantize.get_codes_from_indices", _vq, lambda m, i: m.get_codes_from_indices(i), (B, N), 8, True),
    Case(
        "VectorQuantize-heads.get_output_from_indices",
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, heads=2, separate_codebook_per_head=True),
        lambda m, i: m.get_output_from_indices(i),
        (B, N, 2),
        8,
        True,
    ),
    Case("VectorQuantize.forward(indices=)", _vq, lambda m, i: m(_x(B, N, 4), indices=i), (B, N), 8, True),
    Case("VectorQuantize.update_indices", _vq, lambda m, i: _updated_codes(m, i), (B, N), 8, True),
    Case(
        "ResidualVQ.get_output_from_indices",
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2),
        lambda m, i: m.get_output_from_indices(i),
        (B, N, 2),
        8,
        True,
    ),
    Case(
        "ResidualVQ.get_codes_from_indices",
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2),
        lambda m, i: m.get_codes_from_indices(i),
        (B, N, 2),
        8,
        True,
    ),
    Case(
        "ResidualVQ.forward(indices=)",
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2),
        lambda m, i: m(_x(B, N, 4), indices=i),
        (B, N, 2),
        8,
        False,
    ),
    Case(
        "GroupedResidualVQ.get_output_from_indices",
        lambda: vqp.GroupedResidualVQ(dim=4, codebook_size=8, num_quantizers=2, groups=2),
        lambda m, i: m.get_output_from_indices(i),
        (2, B, N, 2),
        8,
        True,
    ),
    Case(
        "ResidualFSQ.get_output_from_indices",
        lambda: vqp.ResidualFSQ(dim=4, levels=[3, 4], num_quantizers=2),
        lambda m, i: m.get_output_from_indices(i),
        (B, N, 2),
        12,
        True,
    ),
    Case(
        "GroupedResidualFSQ.get_codes_from_indices",
        lambda: vqp.GroupedResidualFSQ(dim=4, levels=[3, 4], num_quantizers=2, groups=2),
        lambda m, i: m.get_codes_from_indices(i),
        (2, B, N, 2),
        12,
        True,
    ),
    Case(
        "ResidualLFQ.get_output_from_indices",
        lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2),
        lambda m, i: m.get_output_from_indices(i),
        (B, N, 2),
        16,
        True,
    ),
    Case(
        "GroupedResidualLFQ.get_output_from_indices",
        lambda: vqp.GroupedResidualLFQ(dim=4, codebook_size=16, num_quantizers=2, groups=2),
        lambda m, i: m.get_output_from_indices(i),
        (2, B, N, 2),
        16,
        True,
    ),
    Case(
        "ResidualSimVQ.get_output_from_indices",
        lambda: vqp.ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=2),
        lambda m, i: m.get_output_from_indices(i),
        (B, N, 2),
        8,
        True,
    ),
    Case(
        "FSQ.indices_to_codes",
        lambda: vqp.FSQ(levels=[8, 5, 5]),
        lambda m, i: m.indices_to_codes(i),
        (B, N),
        200,
        False,
    ),
    Case(
        "FSQ-large.indices_to_codes",
        lambda: vqp.FSQ(levels=[8, 8, 8, 6, 5]),
        lambda m, i: m.indices_to_codes(i),
        (B, N),
        15360,
        False,
        uint8=False,
    ),
    Case(
        "LFQ.indices_to_codes",
        lambda: vqp.LFQ(dim=8, codebook_size=256),
        lambda m, i: m.indices_to_codes(i),
        (B, N),
        256,
        False,
    ),
    Case(
        "SimVQ.indices_to_codes",
        lambda: vqp.SimVQ(dim=4, codebook_size=8),
        lambda m, i: m.indices_to_codes(i),
        (B, N),
        8,
        True,
    ),
    Case(
        "LatentQuantize.indices_to_codes",
        lambda: vqp.LatentQuantize(levels=[3, 4], dim=4),
        lambda m, i: m.indices_to_codes(i),
        (B, N),
        12,
        False,
    ),
    Case("FSP.indices_to_codes", lambda: vqp.FSP(levels=[3, 4]), lambda m, i: m.indices_to_codes(i), (B, N), 12, False),
    Case("HierarchicalVQ.get_output_from_indices", _hvq, _hvq_decode, (B, 2, 2), 8, True, arg=r"indices\[1\]"),
    Case(
        "RandomProjectionQuantizer.forward(indices=)",
        lambda: vqp.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3),
        lambda m, i: m(_x(B, N, 4), indices=i),
        (B, N),
        8,
        True,
    ),
    Case(
        "BinaryMapper.log_prob(indices=)",
        lambda: vqp.BinaryMapper(bits=3),
        lambda m, i: m.log_prob(_x(B, N, 3), indices=i),
        (B, N),
        8,
        False,
    ),
]
BY_NAME = {case.name: case for case in CASES}
IDS = [case.name for case in CASES]


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.make().eval()


def valid_indices(case: Case) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, case.size, case.shape, generator=g)
    indices.view(-1)[0], indices.view(-1)[-1] = 0, case.size - 1  # both ends of the range
    return indices


def first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module: nn.Module, before: dict) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def range_error(case: Case, bad: int) -> str:
    allowed = re.escape(f"[0, {case.size})")
    return rf"{case.arg}\S* .*must lie in \[0, codebook_size\) = {allowed}.*got {bad}\b"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_integer_dtype_decodes_as_int64(case):
    module, indices = build(case), valid_indices(case)
    expected = first_tensor(case.decode(module, indices))
    dtypes = [torch.int16, torch.int32] + ([torch.uint8] if case.uint8 and case.size <= 256 else [])
    for dtype in dtypes:
        assert torch.equal(first_tensor(case.decode(build(case), indices.to(dtype))), expected), dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_an_index_at_or_above_the_codebook_size_is_a_value_error(case):
    module = build(case).train() if "forward" in case.name or "update" in case.name else build(case)
    before = state(module)
    for dtype in (torch.int16, torch.int32, torch.int64):
        for bad in (case.size, case.size + 1000):
            indices = valid_indices(case)
            indices.view(-1)[1] = bad
            with pytest.raises(ValueError, match=range_error(case, bad)):
                case.decode(module, indices.to(dtype))
    assert_state_unchanged(module, before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_negative_indices_are_a_value_error_except_a_documented_minus_one(case):
    module = build(case).train() if "forward" in case.name or "update" in case.name else build(case)
    before = state(module)
    for bad in (-2, -100) + (() if case.dropped else (-1,)):
        indices = valid_indices(case)
        indices.view(-1)[1] = bad
        allowed = r" or be -1" if case.dropped else r", got"
        with pytest.raises(ValueError, match=range_error(case, bad)) as error:
            case.decode(module, indices)
        assert re.search(re.escape(f"[0, {case.size})") + allowed, str(error.value))
    assert_state_unchanged(module, before)
    if case.dropped:
        indices = valid_indices(case)
        indices.view(-1)[1] = -1
        case.decode(build(case), indices)  # decodes (a zero code, or ignored)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_floating_point_and_bool_indices_are_a_type_error(case):
    module = build(case)
    for dtype in (torch.float32, torch.float16, torch.bool):
        with pytest.raises(TypeError, match=rf"indices\S* must be an integer torch.Tensor, got .*{dtype}"):
            case.decode(module, valid_indices(case).to(dtype))


def test_the_messages_name_argument_value_and_range():
    vq = vqp.VectorQuantize(dim=16, codebook_size=8)
    message = r"^indices must lie in \[0, codebook_size\) = \[0, 8\) or be -1, got 9 \(values from 3 to 9\)$"
    with pytest.raises(ValueError, match=message):
        vq.get_output_from_indices(torch.tensor([[3, 9]]))
    with pytest.raises(
        ValueError,
        match=r"^indices must lie in \[0, codebook_size\) = \[0, 200\), got -1 and 200 \(values from -1 to 200\)",
    ):
        vqp.FSQ(levels=[8, 5, 5]).indices_to_codes(torch.tensor([[200, -1]]))


def test_residual_vq_checks_each_layer_against_its_own_codebook_size():
    rvq = vqp.ResidualVQ(dim=4, codebook_size=[8, 4], num_quantizers=2).eval()
    assert rvq.get_output_from_indices(torch.tensor([[[7, 3]]])).shape == (1, 1, 4)
    with pytest.raises(
        ValueError,
        match=r"indices\[\.\.\., 1\] \(layer 1\) must lie in \[0, codebook_size\) = \[0, 4\) or be -1, got 4",
    ):
        rvq.get_output_from_indices(torch.tensor([[[7, 4]]]))
    # indices of the first layer only: checked against that layer
    assert rvq.get_output_from_indices(torch.tensor([[[7]]])).shape == (1, 1, 4)
    with pytest.raises(ValueError, match=r"indices have 3 layers, the stack has only 2"):
        rvq.get_output_from_indices(torch.tensor([[[1, 1, 1]]]))
    rvq.train()
    before = state(rvq)
    with pytest.raises(
        ValueError, match=r"indices\[\.\.\., 0\] \(layer 0\) must lie in \[0, codebook_size\) = \[0, 8\), got -1"
    ):
        rvq(_x(1, 1, 4), indices=torch.tensor([[[-1, 0]]]))
    assert_state_unchanged(rvq, before)


# ---------------------------------------------------------------------------------------------------------
# the device branch, run on the CPU


@pytest.fixture
def device_branch(monkeypatch):
    """check_code_indices as on an accelerator: no host read."""
    monkeypatch.setattr(validate, "reads_indices_on_host", lambda indices: False)


SYNC_OPS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero"}


def host_syncs(step) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return [event.name for event in prof.events() if event.name in SYNC_OPS]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_device_branch_decodes_valid_indices_bit_for_bit(case, monkeypatch):
    module, indices = build(case), valid_indices(case)
    if case.dropped:
        indices.view(-1)[1] = -1
    expected = first_tensor(case.decode(module, indices))
    monkeypatch.setattr(validate, "reads_indices_on_host", lambda indices: False)
    assert torch.equal(first_tensor(case.decode(build(case), indices)), expected)


# decoders that read nothing on the host on their own (forward paths run the search and the losses too)
DECODERS = [case for case in CASES if "forward" not in case.name and "update" not in case.name]


@pytest.mark.parametrize("case", DECODERS, ids=[case.name for case in DECODERS])
def test_the_device_branch_reads_nothing_on_the_host(case, device_branch):
    module, indices = build(case), valid_indices(case)
    assert host_syncs(lambda: case.decode(module, indices)) == []


def test_the_host_branch_reads_on_the_cpu_only():
    """Sanity check of the probe above: the CPU branch does read (one min/max)."""
    vq, indices = build(BY_NAME["VectorQuantize.get_output_from_indices"]), valid_indices(CASES[0])
    assert host_syncs(lambda: vq.get_output_from_indices(indices)) != []


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_device_branch_fails_the_gather_on_an_invalid_index(case, device_branch):
    module = build(case)
    for bad in [case.size, -2] + ([] if case.dropped else [-1]):
        indices = valid_indices(case)
        indices.view(-1)[1] = bad
        with pytest.raises((RuntimeError, IndexError), match="out of bounds|out of range"):
            case.decode(module, indices)


def test_the_device_branch_with_per_layer_sizes(device_branch):
    rvq = vqp.ResidualVQ(dim=4, codebook_size=[8, 4], num_quantizers=2).eval()
    assert host_syncs(lambda: rvq.get_output_from_indices(torch.tensor([[[7, 3]]]))) == []
    with pytest.raises(RuntimeError, match="out of bounds"):
        rvq.get_output_from_indices(torch.tensor([[[7, 4]]]))


def test_reads_indices_on_host_only_on_the_cpu_in_eager_mode():
    assert validate.reads_indices_on_host(torch.zeros(2, dtype=torch.long))
    assert not validate.reads_indices_on_host(torch.zeros(2, dtype=torch.long, device="meta"))


def test_a_compiled_decoder_has_no_graph_break_and_keeps_the_check():
    fsq = vqp.FSQ(levels=[8, 5, 5]).eval()
    indices = torch.tensor([[3, 199, 0]])
    compiled = torch.compile(fsq.indices_to_codes, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(indices), fsq.indices_to_codes(indices))
    with pytest.raises(RuntimeError, match="out of bounds"):
        compiled(torch.tensor([[3, 200, 0]]))
