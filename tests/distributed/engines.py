"""torch's own training engines around the quantizers: FSDP2 (``fully_shard``), DDP's buffer broadcast and
distributed checkpoints (``torch.distributed.checkpoint``), run by ``world_size`` gloo processes on CPU and
compared with one process fed the concatenated batch (test_engines.py).

The model is a small convolutional autoencoder, ``(b, 1, 8, 8)`` images -> ``(b, DIM, 2, 2)`` latents -> 4
tokens per image -> quantizer -> decoder, trained with SGD on reconstruction plus the quantizer's loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gloo  # tests/distributed/gloo.py, beside this file (on the path of the tests that import this module)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import vector_quantize_pytorch as vqp

DIM = 8
GLOBAL_BATCH = 6  # images per step, split evenly over 1, 2 or 3 ranks
STEPS = 5
LR = 0.1
SPAWN_DEADLINE_S = 420


# ------------------------------------------------------------------------------------------------ families


def _vq_call(q, tokens):
    return q(tokens)


def _residual_call(q, tokens):
    quantized, indices, losses = q(tokens)
    return quantized, indices, losses.sum()


def _grouped_call(q, tokens):
    quantized, indices, losses = q(tokens)
    return quantized, indices.movedim(0, 1), losses.sum()  # (g, b, n, q) -> batch first


def _fsq_call(q, tokens):
    quantized, indices = q(tokens)
    return quantized, indices, quantized.new_zeros((), dtype=torch.float32)


FAMILIES = {
    "vq_ema_kmeans_dead": (
        lambda: vqp.VectorQuantize(
            dim=DIM, codebook_size=16, decay=0.8, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.0
        ),
        _vq_call,
    ),
    "vq_cosine_heads": (
        lambda: vqp.VectorQuantize(
            dim=DIM,
            codebook_size=16,
            heads=2,
            separate_codebook_per_head=True,
            use_cosine_sim=True,
            kmeans_init=True,
            kmeans_iters=2,
            threshold_ema_dead_code=1.0,
        ),
        _vq_call,
    ),
    "residual_vq_dropout": (
        lambda: vqp.ResidualVQ(
            dim=DIM, num_quantizers=3, codebook_size=16, quantize_dropout=True, kmeans_init=True, kmeans_iters=2
        ),
        _residual_call,
    ),
    "grouped_residual_vq": (
        lambda: vqp.GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=16, decay=0.8),
        _grouped_call,
    ),
    "fsq": (lambda: vqp.FSQ(levels=[5, 4], dim=DIM), _fsq_call),
    "lfq": (lambda: vqp.LFQ(dim=DIM, codebook_size=16, entropy_loss_weight=0.1), _vq_call),
    "simvq": (lambda: vqp.SimVQ(dim=DIM, codebook_size=16), _vq_call),
}


class Autoencoder(nn.Module):
    def __init__(self, family: str):
        super().__init__()
        make, self.call = FAMILIES[family]
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, DIM, 4, stride=4))
        self.quantizer = make()
        self.decoder = nn.Sequential(nn.ConvTranspose2d(DIM, 4, 4, stride=4), nn.GELU(), nn.Conv2d(4, 1, 3, padding=1))
        self.checkpointed = False  # activation checkpointing around the quantizer (core/recompute.py)

    def forward(self, images: Tensor):
        z = self.encoder(images)  # (b, DIM, 2, 2)
        tokens = z.flatten(2).transpose(1, 2)  # (b, 4, DIM)
        if self.checkpointed:
            quantized, indices, aux = vqp.checkpoint(self.call, self.quantizer, tokens)
        else:
            quantized, indices, aux = self.call(self.quantizer, tokens)
        reconstruction = self.decoder(quantized.transpose(1, 2).reshape(z.shape))
        return reconstruction, indices, aux


def build(family: str) -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(family).train()


def images(step: int) -> Tensor:
    return torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(500 + step))


def local(t: Tensor, world_size: int, rank: int | None) -> Tensor:
    return t if rank is None else t.chunk(world_size)[rank]


def full(t) -> Tensor:
    """A DTensor's full value, a tensor as it is (detached copies)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().clone()


def quantizer_buffers(model: nn.Module) -> dict:
    """The quantizer's floating buffers (codebooks, EMA statistics), by name."""
    model = getattr(model, "module", model)  # DDP's wrapped module
    return {k: v.detach().clone() for k, v in model.quantizer.named_buffers() if v.is_floating_point()}


def train_step(model: nn.Module, optimizer, step: int, world_size: int, rank: int | None) -> dict:
    x = local(images(step), world_size, rank)
    reconstruction, indices, aux = model(x)
    loss = F.mse_loss(reconstruction.float(), x) + aux.float()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "indices": indices, "buffers": quantizer_buffers(model)}


def train(model: nn.Module, world_size: int, rank: int | None, steps: int = STEPS, first: int = 0) -> list[dict]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(1234)
    return [train_step(model, optimizer, step, world_size, rank) for step in range(first, first + steps)]


def full_state(model: nn.Module) -> dict:
    return {k: full(v) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Run:
    """One training run: ``engine`` in fsdp / ddp; for FSDP whether the quantizer is its own unit and the
    parameter dtype, for DDP whether buffers are synced before each forward."""

    family: str
    engine: str
    own_unit: bool = False
    bf16: bool = False
    sync_buffers: bool = True
    checkpointed: bool = False

    @property
    def name(self) -> str:
        if self.checkpointed:
            return f"{self.family}-fsdp-own-unit-activation-checkpointing"
        if self.engine == "ddp":
            return f"{self.family}-ddp-{'sync' if self.sync_buffers else 'nosync'}-buffers"
        return f"{self.family}-fsdp-{'own' if self.own_unit else 'parent'}-unit-{'bf16' if self.bf16 else 'fp32'}"


RUNS = (
    [Run(f, "fsdp", own_unit=own) for f in FAMILIES for own in (False, True)]
    + [Run(f, "fsdp", own_unit=True, bf16=True) for f in FAMILIES]
    + [Run(f, "ddp", sync_buffers=s) for f in ("vq_ema_kmeans_dead", "residual_vq_dropout") for s in (True, False)]
    + [Run(f, "fsdp", own_unit=True, checkpointed=True) for f in ("vq_ema_kmeans_dead", "residual_vq_dropout")]
)
CHECKPOINTED = ("vq_ema_kmeans_dead", "residual_vq_dropout")  # saved with DCP by 2 ranks, loaded into 1 and 3


def wrap(run: Run, model: nn.Module) -> nn.Module:
    if run.engine == "ddp":
        ddp = nn.parallel.DistributedDataParallel
        import inspect

        if "forward_sync_buffers" in inspect.signature(ddp).parameters:  # broadcast_buffers is deprecated there
            return ddp(model, forward_sync_buffers=run.sync_buffers)
        return ddp(model, broadcast_buffers=run.sync_buffers)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.checkpointed = run.checkpointed
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if run.bf16 else MixedPrecisionPolicy()
    if run.own_unit:
        fully_shard(model.quantizer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def fsdp_model(family: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build(family)
    fully_shard(model.quantizer)
    fully_shard(model)
    return model


# ------------------------------------------------------------------------------------ distributed checkpoints


def dcp_save(family: str, directory: Path, world_size: int, rank: int) -> dict:
    """Train 3 steps with FSDP, save with DCP (and a plain full state_dict from rank 0), then one more step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = fsdp_model(family)
    train(model, world_size, rank, steps=3)
    dcp.save(get_model_state_dict(model), checkpoint_id=str(directory / family))
    plain = model.state_dict()
    saved = {k: full(v) for k, v in plain.items()}
    if rank == 0:
        torch.save(saved, directory / f"{family}-plain.pt")
    torch.manual_seed(77)
    after = train(model, world_size, rank, steps=1, first=3)[0]
    return {"saved": saved, "plain_keys": sorted(plain), "next": after}


def dcp_load(family: str, directory: Path, world_size: int, rank: int | None, sharded: bool) -> dict:
    """A fresh model (FSDP when ``sharded``) loads the DCP checkpoint, then trains the next step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    torch.manual_seed(99)  # a different initialisation: everything must come from the checkpoint
    model = Autoencoder(family).train()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.quantizer)
        fully_shard(model)
    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=str(directory / family), no_dist=not sharded)
    set_model_state_dict(model, state)
    loaded = full_state(model)
    torch.manual_seed(77)
    after = train(model, world_size, rank, steps=1, first=3)[0]
    return {"loaded": loaded, "next": after}


# ------------------------------------------------------------------------------------------------ processes


def _worker(rank: int, world_size: int, out_dir: str, checkpoint_dir: str, save: bool) -> None:
    gloo.init_group(rank, world_size, out_dir)
    results, timings = {}, {}
    try:
        for run in RUNS:
            start = time.perf_counter()
            model = build(run.family)
            trained = wrap(run, model)
            records = train(trained, world_size, rank)
            results[run.name] = {"records": records, "state": full_state(model)}
            timings[run.name] = time.perf_counter() - start
            del model, trained
        for family in CHECKPOINTED:
            if save:
                results[f"dcp-save-{family}"] = dcp_save(family, Path(checkpoint_dir), world_size, rank)
            else:
                results[f"dcp-load-{family}"] = dcp_load(family, Path(checkpoint_dir), world_size, rank, True)
        usage = vqp.CodebookUsage(16, codebooks=2)  # the usage meter sums the ranks' histograms at report time
        usage.update(torch.tensor([[rank, 15 - rank]]))
        results["usage"] = usage.report()
        results["timings"] = timings
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        gloo.close_group()


def spawn(world_size: int, out_dir: Path, checkpoint_dir: Path, save: bool) -> list[dict]:
    """Every run in ``world_size`` gloo processes; rank r's results in rank order. ``save``: the ranks write
    the DCP checkpoints into ``checkpoint_dir``; otherwise they load them from there."""
    gloo.run_processes(_worker, (world_size, str(out_dir), str(checkpoint_dir), save), world_size, SPAWN_DEADLINE_S)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def run_single(run: Run, world_size: int) -> dict:
    """The reference: one process, no engine, fed the concatenated batch."""
    model = build(run.family)
    return {"records": train(model, world_size, None), "state": full_state(model)}
