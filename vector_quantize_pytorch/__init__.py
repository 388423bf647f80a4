"""vector_quantize_pytorch: quantizers to put between an encoder and a decoder."""

from .binary_mapper import BinaryMapper
from .core.policy import ACCELERATOR_POLICY, CPU_POLICY, ChunkPolicy, chunk_policy, set_chunk_policy, use_chunk_policy
from .core.recompute import checkpoint, checkpoint_contexts
from .evo_lookup_free_quantization import EvoLFQ
from .finite_scalar_perturbation import FSP
from .finite_scalar_quantization import FSQ
from .hierarchical_vq import HierarchicalVQ
from .latent_quantization import LatentQuantize
from .lookup_free_quantization import LFQ
from .quantizers import QUANTIZERS
from .random_projection_quantizer import RandomProjectionQuantizer
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual_sim_vq import ResidualSimVQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .sim_vq import SimVQ
from .usage import CodebookUsage
from .utils import Sequential
from .vector_quantize_pytorch import LossBreakdown, VectorQuantize

__version__ = "2.0.0.dev0"

# other names the same classes go by in papers and user code
VectorQuantizer = VectorQuantize
LatentQuantizer = LatentQuantize

__all__ = [
    "VectorQuantize",
    "VectorQuantizer",
    "ResidualVQ",
    "GroupedResidualVQ",
    "RandomProjectionQuantizer",
    "FSQ",
    "FSP",
    "LFQ",
    "EvoLFQ",
    "ResidualLFQ",
    "GroupedResidualLFQ",
    "ResidualFSQ",
    "GroupedResidualFSQ",
    "LatentQuantize",
    "LatentQuantizer",
    "SimVQ",
    "ResidualSimVQ",
    "BinaryMapper",
    "HierarchicalVQ",
    "QUANTIZERS",
    "LossBreakdown",
    "Sequential",
    "CodebookUsage",
    "checkpoint",
    "checkpoint_contexts",
    "ChunkPolicy",
    "CPU_POLICY",
    "ACCELERATOR_POLICY",
    "chunk_policy",
    "set_chunk_policy",
    "use_chunk_policy",
]
