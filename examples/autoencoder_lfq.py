"""MNIST autoencoder with LFQ, lookup-free quantization (Yu et al. 2023, MAGVIT-v2, arXiv 2310.05737).

The latent is projected to 10 numbers and each is replaced by its sign: a codebook of 2^10 = 1024 binary codes.
The entropy loss (low entropy per sample, high entropy over the batch) spreads the batch over the codes.

    python examples/autoencoder_lfq.py

Writes out/autoencoder_lfq/{reconstructions.png, training_curves.png, metrics.json}; ``--help`` lists the options.
"""

from _common import Example, main

from vector_quantize_pytorch import LFQ

CODEBOOK_SIZE = 2**10


def make_quantizer(dim):
    return LFQ(
        dim=dim,
        codebook_size=CODEBOOK_SIZE,
        entropy_loss_weight=0.1,
        diversity_gamma=1.0,
        # The per-sample entropy term rewards ever larger inputs; unbounded, they grow until every token lands on
        # one code (about step 600 here). A tanh soft clamp at 4 keeps them bounded.
        soft_clamp_input_value=4.0,
    )


def quantize(lfq, z):
    quantized, indices, entropy_aux_loss = lfq(z)
    return quantized, indices, entropy_aux_loss


if __name__ == "__main__":
    main(Example("autoencoder_lfq", make_quantizer, quantize, codebook_size=CODEBOOK_SIZE))
