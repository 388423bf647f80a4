"""MNIST autoencoder with VectorQuantize (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937).

A 256-code EMA codebook, initialised by k-means on the first batch, with dead codes (EMA cluster size below 2)
replaced by encoder outputs, and the rotation trick (Fifty et al. 2024, arXiv 2410.06424) for the gradient.

    python examples/autoencoder.py                              # ~1-2 min on 2 CPU cores
    torchrun --nproc_per_node 2 examples/autoencoder.py         # the same, data-parallel over 2 processes

Writes out/autoencoder/{reconstructions.png, training_curves.png, metrics.json}; ``--help`` lists the options.
"""

from _common import Example, main

from vector_quantize_pytorch import VectorQuantize

CODEBOOK_SIZE = 256


def make_quantizer(dim):
    return VectorQuantize(
        dim=dim,
        codebook_size=CODEBOOK_SIZE,
        accept_image_fmap=True,  # (b, dim, 7, 7) in, indices (b, 7, 7) out
        kmeans_init=True,
        threshold_ema_dead_code=2,
        # rotation_trick is on by default
    )


def quantize(vq, z):
    quantized, indices, commit_loss = vq(z)
    return quantized, indices, commit_loss


if __name__ == "__main__":
    main(Example("autoencoder", make_quantizer, quantize, codebook_size=CODEBOOK_SIZE))
