"""vector_quantize_pytorch: quantizers to put between an encoder and a decoder."""

__version__ = "2.0.0.dev0"
