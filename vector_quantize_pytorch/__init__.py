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

# aliases used in the seed notes
VectorQuantizer = VectorQuantize
LatentQuantizer = LatentQuantize

# every quantizer class: `Sequential` passes forward keyword arguments to the one it contains
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
    LatentQuantizer,
    SimVQ,
    ResidualSimVQ,
    BinaryMapper,
    HierarchicalVQ,
)

__all__ = [cls.__name__ for cls in QUANTIZERS] + ["LossBreakdown", "Sequential", "VectorQuantizer", "LatentQuantizer"]
__all__ += ["CodebookUsage", "checkpoint", "checkpoint_contexts"]
__all__ += ["ChunkPolicy", "CPU_POLICY", "ACCELERATOR_POLICY", "chunk_policy", "set_chunk_policy", "use_chunk_policy"]
__all__ = list(dict.fromkeys(__all__))
