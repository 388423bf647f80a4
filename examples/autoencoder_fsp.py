"""MNIST autoencoder with FSP, finite scalar perturbation (arXiv 2602.17133).

FSQ's grid of 8 * 5 * 5 * 5 = 1000 codes, trained with values perturbed uniformly inside their bins instead of
rounded, and evaluated with the rounded values; the auxiliary loss keeps the batch statistics of the projected
latent where the tanh is not saturated.

    python examples/autoencoder_fsp.py

Writes out/autoencoder_fsp/{reconstructions.png, training_curves.png, metrics.json}; ``--help`` lists the options.
"""

import math

from _common import Example, main

from vector_quantize_pytorch import FSP

LEVELS = [8, 5, 5, 5]


def make_quantizer(dim):
    return FSP(levels=LEVELS, dim=dim, channel_first=True)


def quantize(fsp, z):
    quantized, indices, norm_loss, _info = fsp(z)
    return quantized, indices, norm_loss


if __name__ == "__main__":
    main(Example("autoencoder_fsp", make_quantizer, quantize, codebook_size=math.prod(LEVELS)))
