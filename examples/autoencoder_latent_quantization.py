"""MNIST autoencoder with LatentQuantize (Hsu et al. 2023, "Disentanglement via latent quantization",
arXiv 2305.18378).

The encoder gives 3 numbers per position, each snapped to the nearest value of its own grid of 8, 6 and 5 values:
a codebook of 8 * 6 * 5 = 240 codes; the auxiliary loss pulls the latents to their grid values.

    python examples/autoencoder_latent_quantization.py

Writes out/autoencoder_latent_quantization/{reconstructions.png, training_curves.png, metrics.json}; ``--help``
lists the options.
"""

import math

from _common import Example, main

from vector_quantize_pytorch import LatentQuantize

LEVELS = [8, 6, 5]


def make_quantizer(dim):
    # The commitment term (MSE of the straight-through output against the detached input) sends the encoder the
    # exact opposite of the quantization term's gradient, so with both on the latent is pulled nowhere and drifts
    # away from the grid. Only the quantization term is used: it pulls the latent to its grid values.
    return LatentQuantize(levels=LEVELS, dim=dim, commitment_loss_weight=0.0, quantization_loss_weight=0.1)


def quantize(latent_quantize, z):
    quantized, indices, loss = latent_quantize(z)
    return quantized, indices, loss


if __name__ == "__main__":
    # a 3-channel latent, one channel per grid: no projections in the quantizer
    example = Example(
        "autoencoder_latent_quantization", make_quantizer, quantize, codebook_size=math.prod(LEVELS), dim=len(LEVELS)
    )
    main(example)
