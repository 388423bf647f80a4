"""MNIST autoencoder with ResidualVQ (Zeghidour et al. 2021, SoundStream, arXiv 2107.03312).

Four VectorQuantize layers of 256 codes each: every layer quantizes what the previous ones left over, so each
7x7 position gets 4 codes. Usage and perplexity are computed per layer and averaged over the 4 layers.

    python examples/autoencoder_residual_vq.py

Writes out/autoencoder_residual_vq/{reconstructions.png, training_curves.png, metrics.json}; ``--help`` lists
the options.
"""

from _common import Example, main
from einops import rearrange

from vector_quantize_pytorch import ResidualVQ

NUM_QUANTIZERS = 4
CODEBOOK_SIZE = 256


def make_quantizer(dim):
    return ResidualVQ(
        dim=dim,
        num_quantizers=NUM_QUANTIZERS,
        codebook_size=CODEBOOK_SIZE,
        kmeans_init=True,
        threshold_ema_dead_code=2,
    )


def quantize(residual_vq, z):
    height, width = z.shape[-2:]
    tokens = rearrange(z, "b d h w -> b (h w) d")
    quantized, indices, commit_losses = residual_vq(tokens)  # (b, h*w, d), (b, h*w, q), (q,)
    quantized = rearrange(quantized, "b (h w) d -> b d h w", h=height, w=width)
    indices = rearrange(indices, "b (h w) q -> b h w q", h=height, w=width)
    return quantized, indices, commit_losses.sum()


if __name__ == "__main__":
    example = Example(
        "autoencoder_residual_vq", make_quantizer, quantize, codebook_size=CODEBOOK_SIZE, num_codebooks=NUM_QUANTIZERS
    )
    main(example)
