"""Benchmark workloads: one quantizer configuration plus its input each.

A workload is a function ``build(lib, quick) -> (module, inputs)`` registered with :func:`workload`.
``lib`` gives the quantizer classes of whichever ``vector_quantize_pytorch`` the worker imported (ours or the
reference), so builders use only the public API the two share; ``quick`` asks for tiny sizes (smoke tests).
``inputs`` is one tensor or a tuple of positional arguments for ``module(*inputs)``.

Modes:
    ``"train"``: ``module.train()``, forward, sum the float outputs that require grad into a scalar, backward.
    ``"encode"``: ``module.eval()`` and ``torch.no_grad()``, forward only.

Adding a workload::

    @workload("train")
    def fsq_train_d64(lib, quick):
        n = 16 if quick else 1024
        return lib.FSQ(levels=[8, 5, 5, 5], dim=64), torch.randn(4, n, 64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

MODES = ("train", "encode")


@dataclass(frozen=True)
class Workload:
    """A named benchmark: how to build the module and its inputs, and how to run it."""

    name: str
    mode: str
    build: Callable
    needs_quantizer: bool = True


WORKLOADS: dict[str, Workload] = {}


def workload(mode: str, needs_quantizer: bool = True):
    """Register the decorated builder under its function name."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def register(build: Callable) -> Callable:
        name = build.__name__
        if name in WORKLOADS:
            raise ValueError(f"workload {name!r} is registered twice")
        WORKLOADS[name] = Workload(name, mode, build, needs_quantizer)
        return build

    return register


# The "hardware limit": the distance matmul a nearest-code search over this codebook cannot avoid.
LIMIT_PAIR = ("vq_encode_d128_k8192_n16384", "matmul_f32_16384x128x8192")


class MatMul(nn.Module):
    """``x @ weight``: the bare matrix product behind a tokens x codes distance."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


# ---------------------------------------------------------------------------------------------------------------
# VectorQuantize


@workload("train")
def vq_train_d256_k16384_n4096(lib, quick):
    k, n = (64, 32) if quick else (16384, 1024)
    return lib.VectorQuantize(dim=256, codebook_size=k), torch.randn(4, n, 256)


@workload("train")
def vq_train_d64_k65536_n4096(lib, quick):
    k, n = (128, 32) if quick else (65536, 1024)
    return lib.VectorQuantize(dim=64, codebook_size=k), torch.randn(4, n, 64)


@workload("encode")
def vq_encode_d128_k8192_n16384(lib, quick):
    k, n = (64, 32) if quick else (8192, 1024)
    return lib.VectorQuantize(dim=128, codebook_size=k), torch.randn(16, n, 128)


@workload("encode", needs_quantizer=False)
def matmul_f32_16384x128x8192(lib, quick):
    k, n = (64, 32) if quick else (8192, 1024)
    return MatMul(torch.randn(128, k)), torch.randn(16 * n, 128)


@workload("train")
def vq_train_heads_cosine(lib, quick):
    k, n = (64, 32) if quick else (4096, 1024)
    vq = lib.VectorQuantize(
        dim=256, codebook_size=k, heads=4, separate_codebook_per_head=True, codebook_dim=64, use_cosine_sim=True
    )
    return vq, torch.randn(4, n, 256)


# ---------------------------------------------------------------------------------------------------------------
# Residual and grouped VQ


@workload("train")
def rvq_train_d256_k1024_q8(lib, quick):
    k, n = (32, 32) if quick else (1024, 1024)
    return lib.ResidualVQ(dim=256, codebook_size=k, num_quantizers=8), torch.randn(4, n, 256)


@workload("train")
def grvq_train(lib, quick):
    k, n = (32, 32) if quick else (1024, 1024)
    return lib.GroupedResidualVQ(dim=256, codebook_size=k, num_quantizers=4, groups=2), torch.randn(4, n, 256)


# ---------------------------------------------------------------------------------------------------------------
# SimVQ


@workload("train")
def simvq_train_d256_k4096(lib, quick):
    k, n = (64, 32) if quick else (4096, 1024)
    return lib.SimVQ(dim=256, codebook_size=k), torch.randn(4, n, 256)


@workload("train")
def rsimvq_train(lib, quick):
    k, n = (32, 32) if quick else (1024, 1024)
    return lib.ResidualSimVQ(dim=256, num_quantizers=4, codebook_size=k), torch.randn(4, n, 256)


# ---------------------------------------------------------------------------------------------------------------
# Scalar quantizers: FSQ, LFQ, LatentQuantize


@workload("train")
def fsq_train(lib, quick):
    n = 32 if quick else 1024
    return lib.FSQ(levels=[8, 5, 5, 5], dim=256), torch.randn(4, n, 256)


@workload("train")
def rfsq_train(lib, quick):
    n = 32 if quick else 1024
    return lib.ResidualFSQ(dim=256, levels=[8, 5, 5, 3], num_quantizers=8), torch.randn(4, n, 256)


@workload("train")
def lfq_train_16bit(lib, quick):
    bits, side = (8, 4) if quick else (16, 32)
    return lib.LFQ(codebook_size=2**bits, dim=bits), torch.randn(4, bits, side, side)


@workload("train")
def lfq_train_18bit(lib, quick):
    bits, side = (10, 4) if quick else (18, 16)
    return lib.LFQ(codebook_size=2**bits, dim=bits), torch.randn(2, bits, side, side)


@workload("train")
def rlfq_train(lib, quick):
    n = 32 if quick else 1024
    return lib.ResidualLFQ(dim=256, codebook_size=256, num_quantizers=8), torch.randn(4, n, 256)


@workload("train")
def latentq_train(lib, quick):
    side = 4 if quick else 32
    quantizer = lib.LatentQuantize(levels=[5, 5, 8], dim=16, commitment_loss_weight=0.1, quantization_loss_weight=0.1)
    return quantizer, torch.randn(4, 16, side, side)


# ---------------------------------------------------------------------------------------------------------------
# BEST-RQ random projection quantizer


@workload("encode")
def rpq_encode(lib, quick):
    k, n = (32, 32) if quick else (1024, 1024)
    quantizer = lib.RandomProjectionQuantizer(dim=512, num_codebooks=16, codebook_dim=256, codebook_size=k)
    return quantizer, torch.randn(1, n, 512)
