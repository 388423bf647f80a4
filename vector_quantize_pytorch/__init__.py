"""vector_quantize_pytorch: quantizers to put between an encoder and a decoder."""

from importlib import import_module

__version__ = "2.0.0.dev0"

# public name -> module that defines it
_EXPORTS = {
    "VectorQuantize": "vector_quantize_pytorch",
    "LossBreakdown": "vector_quantize_pytorch",
    "ResidualVQ": "residual_vq",
    "GroupedResidualVQ": "residual_vq",
    "RandomProjectionQuantizer": "random_projection_quantizer",
    "FSQ": "finite_scalar_quantization",
    "FSP": "finite_scalar_perturbation",
    "LFQ": "lookup_free_quantization",
    "EvoLFQ": "evo_lookup_free_quantization",
    "ResidualLFQ": "residual_lfq",
    "GroupedResidualLFQ": "residual_lfq",
    "ResidualFSQ": "residual_fsq",
    "GroupedResidualFSQ": "residual_fsq",
    "LatentQuantize": "latent_quantization",
    "SimVQ": "sim_vq",
    "ResidualSimVQ": "residual_sim_vq",
    "BinaryMapper": "binary_mapper",
    "HierarchicalVQ": "hierarchical_vq",
    "Sequential": "utils",
}

QUANTIZERS = (
    "VectorQuantize",
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
    "SimVQ",
    "ResidualSimVQ",
    "BinaryMapper",
    "HierarchicalVQ",
)

__all__ = []
for _name, _module in _EXPORTS.items():
    try:
        globals()[_name] = getattr(import_module(f".{_module}", __name__), _name)
    except ModuleNotFoundError as error:  # a family that is not built yet
        if error.name != f"{__name__}.{_module}":
            raise
        continue
    __all__.append(_name)

# aliases used in the seed notes
if "VectorQuantize" in globals():
    VectorQuantizer = globals()["VectorQuantize"]
    __all__.append("VectorQuantizer")
if "LatentQuantize" in globals():
    LatentQuantizer = globals()["LatentQuantize"]
    __all__.append("LatentQuantizer")
