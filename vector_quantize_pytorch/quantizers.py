"""Every public quantizer class, in one tuple: what :class:`~vector_quantize_pytorch.Sequential` recognises as
the quantizer among its modules, and what the package exports."""

from __future__ import annotations

from .binary_mapper import BinaryMapper
from .evo_lookup_free_quantization import EvoLFQ
from .finite_scalar_perturbation import FSP
from .finite_scalar_quantization import FSQ
from .hierarchical_vq import HierarchicalVQ
from .latent_quantization import LatentQuantize
from .lookup_free_quantization import LFQ
from .random_projection_quantizer import RandomProjectionQuantizer
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual_sim_vq import ResidualSimVQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .sim_vq import SimVQ
from .vector_quantize_pytorch import VectorQuantize

QUANTIZERS = (
    VectorQuantize,
    ResidualVQ,
    GroupedResidualVQ,
    RandomProjectionQuantizer,
    FSQ,
    FSP,
    LFQ,
    EvoLFQ,
    ResidualLFQ,
    GroupedResidualLFQ,
    ResidualFSQ,
    GroupedResidualFSQ,
    LatentQuantize,
    SimVQ,
    ResidualSimVQ,
    BinaryMapper,
    HierarchicalVQ,
)
