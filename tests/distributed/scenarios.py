"""Training scenarios run both by ``world_size`` gloo processes and by one process on the concatenated batch.

A scenario builds a model, makes the global batch of each step from its own generator, and runs one training
step, returning a dict of detached results whose key says how to compare them:

- ``rows/...``: batch-first; rank ``r``'s value equals the single process's rows of rank ``r`` (rows
  ``[r * b, (r + 1) * b)``, or the ranks' own slices when a scenario gives ranks different batch sizes);
- ``same/...``: equal on every rank and to the single process's (e.g. the batch entropy, a DDP gradient);
- ``mean/...``: the mean over ranks equals the single process's (a per-rank mean loss, equal batch sizes).

After the last step the model's ``state_dict`` must also be equal everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vector_quantize_pytorch as vqp

DIM = 8
PER_RANK = 2  # samples per rank and step
TOKENS = 12
TRAIN_SEED = 1234  # the global generator's seed for the training steps, on every rank and in the single process


@dataclass
class Scenario:
    name: str
    build: Callable[[], nn.Module]
    step: Callable[..., dict]
    data: Callable[[int, int], dict] = field(default=None)  # (step, world_size) -> global batch-first tensors
    steps: int = 3
    seed_per_rank: bool = False  # ranks build their model from different seeds (rank 0's is the reference)
    ddp: bool = False  # wrap in DistributedDataParallel and train with SGD
    lr: float = 0.1
    rank_sizes: Callable[[int], list[int]] = field(default=None)  # world_size -> samples per rank (default equal)

    def rows(self, t: Tensor, world_size: int, rank: int) -> Tensor:
        """Rank ``rank``'s rows of a global batch-first tensor."""
        sizes = self.rank_sizes(world_size) if self.rank_sizes else None
        return slice_rows(t, world_size, rank, sizes)


def generator(step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * salt + step)


def tokens_data(step: int, world_size: int, masked: bool = False, empty_last_rank_at=(), batch=None) -> dict:
    """Global ``x`` ``(batch, TOKENS, DIM)`` (default ``batch = world * PER_RANK``) and, if asked, a random
    mask; the last rank's samples are fully masked at the steps in ``empty_last_rank_at``."""
    g = generator(step)
    x = torch.randn(world_size * PER_RANK if batch is None else batch, TOKENS, DIM, generator=g) * 2
    data = {"x": x}
    if masked:
        mask = torch.rand(x.shape[:2], generator=g) > 0.3
        if step in empty_last_rank_at:
            mask[-PER_RANK:] = False
        data["mask"] = mask
    return data


def codebook_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- VectorQuantize


def vq_step(model, x, mask=None, record_loss=True):
    quantized, indices, loss = model(x, mask=mask)
    out = {"rows/quantized": quantized.detach(), "rows/indices": indices}
    if record_loss:
        out["mean/loss"] = loss.detach()
    codebook = model._codebook
    if codebook.has_dead_code_replacement:
        out["same/just_replaced"] = (codebook.cluster_size == codebook.reset_cluster_size).sum()
    return out


def vq_masked_step(model, x, mask):
    return vq_step(model, x, mask, record_loss=False)


VQ_EMA_KMEANS_DEAD = Scenario(
    "vq_ema_kmeans_dead",
    lambda: vqp.VectorQuantize(
        dim=DIM, codebook_size=32, kmeans_init=True, kmeans_iters=4, threshold_ema_dead_code=1.5, decay=0.8
    ),
    vq_step,
    lambda step, world: tokens_data(step, world),
    steps=4,
)

VQ_COSINE_SEPARATE_HEADS_MASKED = Scenario(
    "vq_cosine_separate_heads_masked",
    lambda: vqp.VectorQuantize(
        dim=DIM,
        codebook_size=16,
        heads=2,
        codebook_dim=DIM // 2,
        separate_codebook_per_head=True,
        use_cosine_sim=True,
        kmeans_init=True,
        kmeans_iters=3,
        threshold_ema_dead_code=1.0,
    ),
    vq_masked_step,
    lambda step, world: tokens_data(step, world, masked=True, empty_last_rank_at=(0, 2)),
    steps=4,
)

VQ_SHARED_HEADS = Scenario(
    "vq_shared_heads",
    lambda: vqp.VectorQuantize(
        dim=DIM, codebook_size=16, heads=2, codebook_dim=DIM // 2, kmeans_init=True, threshold_ema_dead_code=2.0
    ),
    vq_step,
    lambda step, world: tokens_data(step, world),
)

# built from a different seed on every rank, before the process group exists: the first training step
# broadcasts rank 0's codebook
VQ_SEEDED_PER_RANK = Scenario(
    "vq_seeded_per_rank",
    lambda: vqp.VectorQuantize(dim=DIM, codebook_size=16, decay=0.9),
    vq_step,
    lambda step, world: tokens_data(step, world),
    seed_per_rank=True,
)

VQ_AFFINE_SYNCED = Scenario(
    "vq_affine_synced",
    lambda: vqp.VectorQuantize(dim=DIM, codebook_size=16, affine_param=True, sync_affine_param=True),
    vq_step,
    lambda step, world: tokens_data(step, world),
)


class EncoderVQ(nn.Module):
    """A Linear encoder in front of a quantizer with a learned codebook, trained on reconstruction."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.encoder = nn.Linear(DIM, DIM)
        self.quantizer = quantizer

    def forward(self, x):
        quantized, indices, loss = self.quantizer(self.encoder(x))
        return quantized, indices, F.mse_loss(quantized, x) + loss


def learned_step(model, x, optimizer):
    quantized, indices, loss = model(x)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"rows/quantized": quantized.detach(), "rows/indices": indices, "mean/loss": loss.detach()}


VQ_LEARNABLE_DDP = Scenario(
    "vq_learnable_ddp",
    lambda: EncoderVQ(vqp.VectorQuantize(dim=DIM, codebook_size=16, learnable_codebook=True, ema_update=False)),
    learned_step,
    lambda step, world: tokens_data(step, world),
    ddp=True,
)

SIMVQ_DDP = Scenario(
    "simvq_ddp",
    lambda: EncoderVQ(vqp.SimVQ(dim=DIM, codebook_size=16)),
    learned_step,
    lambda step, world: tokens_data(step, world),
    ddp=True,
)


# --------------------------------------------------------------------------------------------- residual


def rvq_step(model, x, mask=None):
    quantized, indices, losses = model(x, mask=mask)
    out = {"rows/quantized": quantized.detach(), "rows/indices": indices}
    if mask is None:
        out["mean/losses"] = losses.detach()
    return out


RVQ_DROPOUT = Scenario(
    "rvq_dropout",
    lambda: vqp.ResidualVQ(
        dim=DIM,
        num_quantizers=3,
        codebook_size=16,
        quantize_dropout=True,
        kmeans_init=True,
        kmeans_iters=3,
        threshold_ema_dead_code=1.0,
    ),
    rvq_step,
    lambda step, world: tokens_data(step, world),
    steps=4,
)

RVQ_EMPTY_RANK = Scenario(
    "rvq_empty_rank",
    lambda: vqp.ResidualVQ(
        dim=DIM, num_quantizers=2, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.0
    ),
    rvq_step,
    lambda step, world: tokens_data(step, world, masked=True, empty_last_rank_at=(0, 1)),
)


# Every layer's inputs feed a last dead-code pass of the shared codebook, which replaces the codes the layers'
# own passes left dead (more dead codes than valid tokens: a large codebook, a sparse mask). The rows of all
# ranks must come in the order of the concatenated batch for its choices to equal one process's.
RVQ_SHARED_CODEBOOK = Scenario(
    "rvq_shared_codebook",
    lambda: vqp.ResidualVQ(
        dim=DIM, num_quantizers=3, codebook_size=64, shared_codebook=True, threshold_ema_dead_code=2.0, decay=0.8
    ),
    rvq_step,
    lambda step, world: tokens_data(step, world, masked=True),
    steps=3,
)


def unequal_sizes(world_size: int) -> list[int]:
    """Rank ``r`` holds ``r + 1`` samples."""
    return [rank + 1 for rank in range(world_size)]


def rvq_per_sample_step(model, x):
    quantized, indices, _ = model(x)
    # every rank must draw as many random numbers as the single process, whatever its batch size
    return {"rows/quantized": quantized.detach(), "rows/indices": indices, "same/rng_state": torch.get_rng_state()}


# per-sample dropout with a different batch size on every rank: each sample's cutoff is the one the single
# process draws for it (no k-means or dead codes: their random rows assume equal batches)
RVQ_PER_SAMPLE_UNEQUAL = Scenario(
    "rvq_per_sample_dropout_unequal_batches",
    lambda: vqp.ResidualVQ(
        dim=DIM,
        num_quantizers=4,
        codebook_size=16,
        decay=0.8,
        quantize_dropout=True,
        quantize_dropout_per_sample=True,
    ),
    rvq_per_sample_step,
    lambda step, world: tokens_data(step, world, batch=sum(unequal_sizes(world))),
    steps=4,
    rank_sizes=unequal_sizes,
)


def grouped_step(model, x):
    quantized, indices, losses = model(x)
    # indices (groups, b, n, q): batch first for the comparison
    return {"rows/quantized": quantized.detach(), "rows/indices": indices.transpose(0, 1), "mean/losses": losses}


GROUPED_RVQ = Scenario(
    "grouped_rvq",
    lambda: vqp.GroupedResidualVQ(
        dim=DIM,
        groups=2,
        num_quantizers=2,
        codebook_size=16,
        quantize_dropout=True,
        kmeans_init=True,
        kmeans_iters=3,
        threshold_ema_dead_code=1.0,
    ),
    grouped_step,
    lambda step, world: tokens_data(step, world),
)


# ------------------------------------------------------------------------------------------------- LFQ


def make_lfq():
    return vqp.LFQ(dim=6, codebook_size=16, num_codebooks=2, entropy_loss_weight=0.1, commitment_loss_weight=0.25)


def lfq_data(step, world, masked=False):
    g = generator(step, salt=1)
    data = {"x": torch.randn(world * PER_RANK, TOKENS, 6, generator=g)}
    if masked:
        mask = torch.rand(data["x"].shape[:2], generator=g) > 0.3
        mask[-PER_RANK:] = False  # the last rank has no token at all
        data["mask"] = mask
    return data


def lfq_train_step(model, x, optimizer):
    (quantized, indices, aux_loss), breakdown = model(x, inv_temperature=2.0, return_loss_breakdown=True)
    optimizer.zero_grad()
    (aux_loss + F.mse_loss(quantized, x)).backward()  # project_out trains too (DDP wants every parameter used)
    inner = model.module if hasattr(model, "module") else model
    grad = inner.project_in.weight.grad.clone()
    optimizer.step()
    return {
        "rows/quantized": quantized.detach(),
        "rows/indices": indices,
        "mean/aux_loss": aux_loss.detach(),
        "mean/per_sample_entropy": breakdown.per_sample_entropy.detach(),
        "same/batch_entropy": breakdown.batch_entropy.detach(),
        "same/grad": grad,  # the DDP-averaged gradient equals the single process's
    }


def lfq_masked_step(model, x, mask):
    (quantized, indices, aux_loss), breakdown = model(x, inv_temperature=2.0, return_loss_breakdown=True, mask=mask)
    return {"rows/indices": indices, "same/batch_entropy": breakdown.batch_entropy.detach()}


LFQ_DDP = Scenario("lfq_ddp", make_lfq, lfq_train_step, lfq_data, ddp=True)

LFQ_EMPTY_RANK = Scenario(
    "lfq_masked_empty_rank", make_lfq, lfq_masked_step, lambda step, world: lfq_data(step, world, masked=True)
)


# ---------------------------------------------------------------------------------- random projections


def rpq_step(model, x):
    return {"rows/indices": model(x)}


RANDOM_PROJECTION = Scenario(
    "random_projection",
    lambda: vqp.RandomProjectionQuantizer(dim=DIM, codebook_size=16, codebook_dim=4, num_codebooks=2),
    rpq_step,
    lambda step, world: tokens_data(step, world),
    steps=2,
    seed_per_rank=True,
)


SCENARIOS = {
    s.name: s
    for s in (
        VQ_EMA_KMEANS_DEAD,
        VQ_COSINE_SEPARATE_HEADS_MASKED,
        VQ_SHARED_HEADS,
        VQ_SEEDED_PER_RANK,
        VQ_AFFINE_SYNCED,
        VQ_LEARNABLE_DDP,
        SIMVQ_DDP,
        RVQ_DROPOUT,
        RVQ_EMPTY_RANK,
        RVQ_SHARED_CODEBOOK,
        RVQ_PER_SAMPLE_UNEQUAL,
        GROUPED_RVQ,
        LFQ_DDP,
        LFQ_EMPTY_RANK,
        RANDOM_PROJECTION,
    )
}


def build(scenario: Scenario, rank: int) -> nn.Module:
    torch.manual_seed(100 + (rank if scenario.seed_per_rank else 0))
    return scenario.build().train()


def slice_rows(t: Tensor, world_size: int, rank: int, sizes: list[int] | None = None) -> Tensor:
    """Rank ``rank``'s rows of ``t``: equal slices, or ``sizes[r]`` rows for rank ``r`` in rank order."""
    if sizes is None:
        sizes = [t.shape[0] // world_size] * world_size
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def train(scenario: Scenario, model: nn.Module, world_size: int, rank: int | None) -> list[dict]:
    """Run the scenario's steps; ``rank=None`` feeds the whole global batch (the single process)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=scenario.lr) if scenario.ddp else None
    torch.manual_seed(TRAIN_SEED)
    records = []
    for step in range(scenario.steps):
        data = scenario.data(step, world_size)
        if rank is not None:
            data = {k: scenario.rows(v, world_size, rank) for k, v in data.items()}
        if optimizer is not None:
            data["optimizer"] = optimizer
        records.append(scenario.step(model, **data))
    return records


def run_single(scenario: Scenario, world_size: int) -> tuple[list[dict], dict]:
    """The reference: one process, rank 0's model, fed the concatenated batch."""
    model = build(scenario, rank=0)
    records = train(scenario, model, world_size, rank=None)
    return records, codebook_state(model)
