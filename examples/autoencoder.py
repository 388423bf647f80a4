"""MNIST autoencoder with VectorQuantize (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937).

A 256-code EMA codebook, initialised by k-means on the first batch, with dead codes (EMA cluster size below 2)
replaced by encoder outputs, and the rotation trick (Fifty et al. 2024, arXiv 2410.06424) for the gradient.

    python examples/autoencoder.py                              # ~1-2 min on 2 CPU cores
    torchrun --nproc_per_node 2 examples/autoencoder.py         # the same, data-parallel over 2 processes
    torchrun --nproc_per_node 2 examples/autoencoder.py --fsdp  # fully sharded (FSDP2, torch >= 2.6)

Writes out/autoencoder/{reconstructions.png, training_curves.png, metrics.json}; ``--help`` lists the options.
"""

import argparse

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


def fully_sharded(model):
    """FSDP2 (gloo on CPU, nccl on GPU): the quantizer as its own unit, then the whole autoencoder. The codebook
    and its EMA statistics are buffers, kept equal on every rank by the quantizer itself."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.quantizer)
    return fully_shard(model)


if __name__ == "__main__":
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP under torchrun")
    known, argv = flags.parse_known_args()
    distribute = fully_sharded if known.fsdp else None
    main(Example("autoencoder", make_quantizer, quantize, codebook_size=CODEBOOK_SIZE, distribute=distribute), argv)
