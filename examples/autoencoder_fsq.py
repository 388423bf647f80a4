"""MNIST autoencoder with FSQ, finite scalar quantization (Mentzer et al. 2023, arXiv 2309.15505).

The 32-channel latent is projected to 4 numbers, each bounded and rounded to 8, 5, 5 and 5 levels: an implicit
codebook of 8 * 5 * 5 * 5 = 1000 codes with nothing to learn and no auxiliary loss.

    python examples/autoencoder_fsq.py

Writes out/autoencoder_fsq/{reconstructions.png, training_curves.png, metrics.json}; ``--help`` lists the options.
"""

import math

from _common import Example, main

from vector_quantize_pytorch import FSQ

LEVELS = [8, 5, 5, 5]


def make_quantizer(dim):
    return FSQ(levels=LEVELS, dim=dim)  # a (b, dim, 7, 7) input is taken as channel-first


def quantize(fsq, z):
    quantized, indices = fsq(z)
    return quantized, indices, z.new_zeros(())


if __name__ == "__main__":
    main(Example("autoencoder_fsq", make_quantizer, quantize, codebook_size=math.prod(LEVELS)))
