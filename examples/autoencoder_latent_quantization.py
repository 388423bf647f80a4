"""MNIST autoencoder with LatentQuantize (Hsu et al. 2023, "Disentanglement via latent quantization",
arXiv 2305.18378).

The latent is projected to 3 numbers, each snapped to the nearest of its own learned grid of 8, 6 and 5 values:
a codebook of 8 * 6 * 5 = 240 codes; the auxiliary loss pulls latents and grid values towards each other.

    python examples/autoencoder_latent_quantization.py

Writes out/autoencoder_latent_quantization/{reconstructions.png, training_curves.png, metrics.json}; ``--help``
lists the options.
"""

import math

from _common import Example, main

from vector_quantize_pytorch import LatentQuantize

LEVELS = [8, 6, 5]


def make_quantizer(dim):
    return LatentQuantize(levels=LEVELS, dim=dim)  # channel-first input (b, dim, 7, 7)


def quantize(latent_quantize, z):
    quantized, indices, loss = latent_quantize(z)
    return quantized, indices, loss


if __name__ == "__main__":
    main(Example("autoencoder_latent_quantization", make_quantizer, quantize, codebook_size=math.prod(LEVELS)))
