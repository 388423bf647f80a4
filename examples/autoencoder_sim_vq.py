"""MNIST autoencoder with SimVQ (Zhu et al. 2024, "Addressing representation collapse in vector quantized
models with one linear layer", arXiv 2411.02038).

A frozen random codebook of 1024 codes seen through one learned linear map, so that every code moves with each
gradient step and the whole codebook stays in use; rotation trick for the gradient to the encoder.

    python examples/autoencoder_sim_vq.py

Writes out/autoencoder_sim_vq/{reconstructions.png, training_curves.png, metrics.json}; ``--help`` lists the
options.
"""

from _common import Example, main

from vector_quantize_pytorch import SimVQ

CODEBOOK_SIZE = 1024


def make_quantizer(dim):
    return SimVQ(dim=dim, codebook_size=CODEBOOK_SIZE, channel_first=True)


def quantize(sim_vq, z):
    quantized, indices, commit_loss = sim_vq(z)
    return quantized, indices, commit_loss


if __name__ == "__main__":
    main(Example("autoencoder_sim_vq", make_quantizer, quantize, codebook_size=CODEBOOK_SIZE))
