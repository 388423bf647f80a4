"""torch.export of every quantizer's encode (forward) and decode, with dynamic batch and sequence/spatial axes.

Each case exports the eval-mode forward (``quantized, indices``) and the decoder (``get_output_from_indices`` /
``indices_to_codes``, wrapped in :class:`Decode`) once, on one shape, with ``torch.export.Dim`` on the batch and
sequence (or spatial) axes, then checks that the exported program gives the eager indices and outputs bit for bit
on shapes it was not traced with. ONNX (``torch.onnx.export(..., dynamo=True)`` and ONNX Runtime) is tested in
tests/test_export_onnx.py on the same cases.

Every public quantizer exports: the search chunks only the codes while exporting (a program takes any number
of tokens), RandomProjectionQuantizer folds its scores inside the traced program, and HierarchicalVQ always
interpolates while exporting (its spatial axes stay dynamic).

Tested with torch 2.13; skipped before torch 2.6 (untested there: older exporters trace differently).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

import vector_quantize_pytorch as vqp

pytestmark = pytest.mark.skipif(torch.__version__ < "2.6", reason="the export tests are not run before torch 2.6")

D = 16  # feature size of every case


class Encode(nn.Module):
    """The eval forward as ``(quantized, indices)``; indices given as a tuple (one per level) come out flat."""

    def __init__(self, quantizer: nn.Module, **kwargs):
        super().__init__()
        self.quantizer, self.kwargs = quantizer, kwargs
        self.training = quantizer.training  # the wrapper has no mode of its own

    def forward(self, x: Tensor):
        out = self.quantizer(x, **self.kwargs)
        if isinstance(out, Tensor):  # RandomProjectionQuantizer: indices only
            return out
        quantized, indices = out[0], out[1]
        return (quantized, *indices) if isinstance(indices, tuple) else (quantized, indices)


class Decode(nn.Module):
    """A decoder method (``get_output_from_indices``, ``indices_to_codes``, ...) as a module's forward."""

    def __init__(self, quantizer: nn.Module, method: str, **kwargs):
        super().__init__()
        self.quantizer, self.method, self.kwargs = quantizer, method, kwargs
        self.training = quantizer.training

    def forward(self, indices):
        return getattr(self.quantizer, self.method)(indices, **self.kwargs)


@dataclass
class Case:
    """A quantizer to export.

    ``shape(b, n)`` is the input shape for batch ``b`` and sequence length (or side) ``n``; ``x_axes`` and
    ``index_axes`` name the dynamic axes of the input and of the indices (``"b"`` batch, ``"n"`` sequence,
    ``"h"``/``"w"`` spatial); ``decode`` is the decoder method (None: the class has none) and ``decode_input``
    turns the forward's outputs into the decoder's input (default: the indices).
    """

    name: str
    make: Callable[[], nn.Module]
    decode: str | None = "get_output_from_indices"
    shape: Callable[[int, int], tuple] = lambda b, n: (b, n, D)
    x_axes: dict = field(default_factory=lambda: {0: "b", 1: "n"})
    index_axes: dict = field(default_factory=lambda: {0: "b", 1: "n"})
    encode_kwargs: dict = field(default_factory=dict)
    decode_kwargs: dict = field(default_factory=dict)
    decode_input: Callable | None = None
    searches: bool = False  # searches a codebook (chunked over codes; the token count stays dynamic)
    slow: bool = False  # a variant of a class tested by default: run with `-m slow`
    forward_marks: tuple = ()
    decode_marks: tuple = ()

    def module(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make().eval()

    def inputs(self, b: int, n: int, seed: int = 0) -> Tensor:
        return torch.randn(self.shape(b, n), generator=torch.Generator().manual_seed(seed))

    def decoder_input(self, outputs):
        if self.decode_input is not None:
            return self.decode_input(outputs)
        return outputs[1] if len(outputs) == 2 else tuple(outputs[1:])


def _image(b: int, n: int) -> tuple:
    return (b, D, n, n + 1)


IMAGE_AXES = {0: "b", 2: "h", 3: "w"}
IMAGE_INDEX_AXES = {0: "b", 1: "h", 2: "w"}
GROUPED_INDEX_AXES = {1: "b", 2: "n"}  # (groups, b, n, q)


def _evo() -> nn.Module:
    return vqp.EvoLFQ(nn.Linear(8, 4), nn.Linear(4, 8), dim=4, codebook_size=16)


def _evo_bits(outputs):
    return (outputs[1].unsqueeze(-1) >> torch.arange(4) & 1).float()  # LFQ index -> bits, lowest bit first


CASES = [
    Case("VectorQuantize", lambda: vqp.VectorQuantize(dim=D, codebook_size=64), searches=True),
    Case(
        "VectorQuantize-cosine",
        lambda: vqp.VectorQuantize(dim=D, codebook_size=64, use_cosine_sim=True),
        searches=True,
        slow=True,
    ),
    Case(
        "VectorQuantize-heads", lambda: vqp.VectorQuantize(dim=D, codebook_size=64, heads=4), searches=True, slow=True
    ),
    Case(
        "VectorQuantize-separate-heads",
        lambda: vqp.VectorQuantize(dim=D, codebook_size=64, heads=2, separate_codebook_per_head=True),
        searches=True,
        slow=True,
    ),
    Case(
        "VectorQuantize-codebook_dim",
        lambda: vqp.VectorQuantize(dim=D, codebook_size=64, codebook_dim=8),
        searches=True,
        slow=True,
    ),
    Case(
        "VectorQuantize-image",
        lambda: vqp.VectorQuantize(dim=D, codebook_size=64, accept_image_fmap=True),
        shape=_image,
        x_axes=IMAGE_AXES,
        index_axes=IMAGE_INDEX_AXES,
        searches=True,
        slow=True,
    ),
    Case("ResidualVQ", lambda: vqp.ResidualVQ(dim=D, codebook_size=64, num_quantizers=3), searches=True),
    Case(
        "GroupedResidualVQ",
        lambda: vqp.GroupedResidualVQ(dim=D, codebook_size=64, num_quantizers=2, groups=2),
        index_axes=GROUPED_INDEX_AXES,
        searches=True,
    ),
    Case("SimVQ", lambda: vqp.SimVQ(dim=D, codebook_size=64), decode="indices_to_codes", searches=True),
    Case("ResidualSimVQ", lambda: vqp.ResidualSimVQ(dim=D, codebook_size=64, num_quantizers=2), searches=True),
    Case(
        "RandomProjectionQuantizer",
        lambda: vqp.RandomProjectionQuantizer(dim=D, codebook_dim=8, codebook_size=64),
        decode=None,
        searches=True,
    ),
    Case(
        "RandomProjectionQuantizer-2-codebooks",
        lambda: vqp.RandomProjectionQuantizer(dim=D, codebook_dim=8, codebook_size=64, num_codebooks=2),
        decode=None,
        searches=True,
    ),
    Case("FSQ", lambda: vqp.FSQ(levels=[8, 5, 5], dim=D), decode="indices_to_codes"),
    Case(
        "FSQ-2-codebooks",
        lambda: vqp.FSQ(levels=[8, 5, 5], dim=D, num_codebooks=2),
        decode="indices_to_codes",
        slow=True,
    ),
    Case(
        "FSQ-image",
        lambda: vqp.FSQ(levels=[8, 5, 5], dim=D, channel_first=True),
        decode="indices_to_codes",
        shape=_image,
        x_axes=IMAGE_AXES,
        index_axes=IMAGE_INDEX_AXES,
        slow=True,
    ),
    Case("ResidualFSQ", lambda: vqp.ResidualFSQ(levels=[8, 5, 5], dim=D, num_quantizers=2)),
    Case(
        "GroupedResidualFSQ",
        lambda: vqp.GroupedResidualFSQ(levels=[8, 5, 5], dim=D, num_quantizers=2, groups=2),
        index_axes=GROUPED_INDEX_AXES,
    ),
    Case("FSP", lambda: vqp.FSP(levels=[8, 5, 5], dim=D), decode="indices_to_codes"),
    Case(
        "FSP-inverse-cdf",
        lambda: vqp.FSP(levels=[8, 5, 5], dim=D, need_inv_act=True, act_name="sigmoid"),
        decode="indices_to_codes",
        slow=True,
    ),
    Case("LFQ", lambda: vqp.LFQ(dim=D, codebook_size=256), decode="indices_to_codes"),
    Case(
        "LFQ-spherical-2-codebooks",
        lambda: vqp.LFQ(dim=D, codebook_size=256, num_codebooks=2, spherical=True),
        decode="indices_to_codes",
        slow=True,
    ),
    Case("ResidualLFQ", lambda: vqp.ResidualLFQ(dim=D, codebook_size=256, num_quantizers=2)),
    Case(
        "GroupedResidualLFQ",
        lambda: vqp.GroupedResidualLFQ(dim=D, codebook_size=256, num_quantizers=2, groups=2),
        index_axes=GROUPED_INDEX_AXES,
    ),
    Case("LatentQuantize", lambda: vqp.LatentQuantize(dim=D, levels=[8, 6, 5]), decode="indices_to_codes"),
    Case(
        "BinaryMapper",
        lambda: vqp.BinaryMapper(bits=6, deterministic_on_eval=True),
        decode=None,  # its codes are the one-hot itself: F.one_hot(indices, 2**bits)
        shape=lambda b, n: (b, n, 6),
        encode_kwargs={"return_indices": True},
    ),
    Case(
        "EvoLFQ",
        _evo,
        decode="decode_bits",
        shape=lambda b, n: (b, n, 8),
        decode_input=_evo_bits,
    ),
    Case(
        "HierarchicalVQ",
        lambda: vqp.HierarchicalVQ(dim=D, codebook_size=64, scales=(1, 2, 4), accept_image_fmap=True),
        shape=lambda b, n: (b, D, 4, 4),  # the spatial shape stays that of the last level
        x_axes={0: "b"},
        index_axes={0: "b"},
        decode_kwargs={"full_shape": (4, 4)},
        searches=True,
    ),
]

BY_NAME = {case.name: case for case in CASES}

# (batch, sequence) traced, and shapes the programs were not traced with (sizes 1 included)
TRACED = (3, 5)
UNTRACED = ((1, 1), (2, 17), (6, 40))


def dims(axes: dict) -> dict:
    """``{axis: name}`` -> ``{axis: torch.export.Dim}``; one Dim per name, so equal names are equal sizes."""
    return {axis: Dim(name, min=1) for axis, name in axes.items()}


def index_shapes(case: Case, indices) -> dict | tuple:
    if isinstance(indices, tuple):  # one tensor per level: only the batch is dynamic
        batch = Dim("b", min=1)
        return tuple({0: batch} for _ in indices)
    if case.decode_input is not None:  # EvoLFQ's bits have the input's token axes
        return dims({0: "b", 1: "n"})
    return dims(case.index_axes)


def eager(module: nn.Module, *args):
    with torch.no_grad():
        out = module(*args)
    return out if isinstance(out, tuple) else (out,)


def exported(program, *args):
    with torch.no_grad():
        out = program.module()(*args)
    return out if isinstance(out, tuple) else (out,)


def assert_same(got: tuple, expected: tuple, what: str) -> None:
    assert len(got) == len(expected), what
    for position, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, (
            f"{what}[{position}]: {g.dtype} {g.shape} != {e.dtype} {e.shape}"
        )
        assert torch.equal(g, e), f"{what}[{position}]: max difference {(g.double() - e.double()).abs().max()}"


def export_forward(case: Case, module: nn.Module):
    x = case.inputs(*TRACED)
    return torch.export.export(Encode(module, **case.encode_kwargs), (x,), dynamic_shapes={"x": dims(case.x_axes)})


def export_decoder(case: Case, module: nn.Module):
    indices = case.decoder_input(eager(Encode(module, **case.encode_kwargs), case.inputs(*TRACED)))
    decoder = Decode(module, case.decode, **case.decode_kwargs)
    return torch.export.export(decoder, (indices,), dynamic_shapes={"indices": index_shapes(case, indices)})


def _params(kind: str):
    params = []
    for case in CASES:
        if kind == "decode" and case.decode is None:
            continue
        marks = {"forward": case.forward_marks, "decode": case.decode_marks}[kind]
        params.append(pytest.param(case, id=case.name, marks=(*marks, *([pytest.mark.slow] if case.slow else []))))
    return params


@pytest.mark.parametrize("case", _params("forward"))
def test_exported_forward_equals_eager_on_untraced_shapes(case):
    module = case.module()
    encode = Encode(module, **case.encode_kwargs)
    program = export_forward(case, module)
    for seed, (b, n) in enumerate((TRACED, *UNTRACED)):
        x = case.inputs(b, n, seed=seed)
        assert_same(exported(program, x), eager(encode, x), f"{case.name} forward on {tuple(x.shape)}")


@pytest.mark.parametrize("case", _params("decode"))
def test_exported_decoder_equals_eager_on_untraced_shapes(case):
    module = case.module()
    encode, decoder = Encode(module, **case.encode_kwargs), Decode(module, case.decode, **case.decode_kwargs)
    program = export_decoder(case, module)
    for seed, (b, n) in enumerate((TRACED, *UNTRACED)):
        outputs = eager(encode, case.inputs(b, n, seed=seed))
        indices = case.decoder_input(outputs)
        decoded = eager(decoder, indices)
        assert_same(exported(program, indices), decoded, f"{case.name} decoder on {b}x{n}")
        if case.decode_input is None:  # decode(encode(x)) is the forward's output (EvoLFQ decodes to its input space)
            assert torch.equal(decoded[0], outputs[0])


# more tokens than one search chunk holds (CPU_POLICY: 2**21 scores, 64 codes -> 32768 tokens)
MANY_TOKENS = (128, 300)


def _search_params():
    """The searching sequence cases; all but VectorQuantize are marked slow."""
    params = []
    for case in CASES:
        if not case.searches or case.forward_marks or case.shape(1, 1)[1] != 1:
            continue
        marks = [] if case.name == "VectorQuantize" else [pytest.mark.slow]
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


@pytest.mark.parametrize("case", _search_params())
def test_exported_search_takes_more_tokens_than_one_chunk(case):
    module = case.module()
    program = export_forward(case, module)
    x = case.inputs(*MANY_TOKENS)
    assert_same(exported(program, x), eager(Encode(module, **case.encode_kwargs), x), f"{case.name} on {MANY_TOKENS}")


def _hierarchical_vq() -> nn.Module:
    return BY_NAME["HierarchicalVQ"].module()


@pytest.mark.slow
def test_hierarchical_vq_exports_an_unbounded_dynamic_batch():
    hvq = _hierarchical_vq()
    encode = Encode(hvq)
    program = torch.export.export(encode, (torch.randn(3, D, 4, 4),), dynamic_shapes={"x": {0: Dim.DYNAMIC}})
    for seed, b in enumerate((1, 2, 2000)):
        x = torch.randn((b, D, 4, 4), generator=torch.Generator().manual_seed(seed))
        assert_same(exported(program, x), eager(encode, x), f"HierarchicalVQ forward on {tuple(x.shape)}")


def test_hierarchical_vq_exports_dynamic_spatial_axes():
    hvq = _hierarchical_vq()
    encode = Encode(hvq)
    shapes = {0: Dim("b", min=1), 2: Dim("h", min=1), 3: Dim("w", min=1)}
    program = torch.export.export(encode, (torch.randn(3, D, 8, 8),), dynamic_shapes={"x": shapes})
    for seed, (b, h, w) in enumerate(((3, 8, 8), (2, 5, 7), (2, 2, 2), (1, 4, 4))):
        x = torch.randn((b, D, h, w), generator=torch.Generator().manual_seed(seed))
        assert_same(exported(program, x), eager(encode, x), f"HierarchicalVQ forward on {tuple(x.shape)}")


def test_every_public_quantizer_has_an_export_case():
    covered = {case.make().__class__.__name__ for case in CASES}
    public = {cls.__name__ for cls in vqp.QUANTIZERS}
    assert public <= covered, f"no export case for {sorted(public - covered)}"
