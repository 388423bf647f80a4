"""One spawn of ``world_size`` gloo processes (CPU) runs every scenario of scenarios.py; tests compare its
results with a single process fed the concatenated batch.

The models are built before ``init_process_group`` (whether to synchronise is decided at call time), the
process group has a short timeout and the whole spawn a deadline, so a deadlock fails instead of hanging.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gloo  # noqa: E402
import scenarios  # noqa: E402


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    models = {name: scenarios.build(s, rank) for name, s in scenarios.SCENARIOS.items()}  # before the group
    gloo.init_group(rank, world_size, out_dir)
    results = {}
    try:
        for name, scenario in scenarios.SCENARIOS.items():
            model = models.pop(name)
            trained = nn.parallel.DistributedDataParallel(model) if scenario.ddp else model
            records = scenarios.train(scenario, trained, world_size, rank)
            results[name] = (records, scenarios.codebook_state(model))
            del model, trained
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        models.clear()
        gloo.close_group()


def spawn(world_size: int, out_dir: Path) -> list[dict]:
    """Run every scenario in ``world_size`` processes; rank r's results, in rank order."""
    gloo.run_processes(_worker, (world_size, str(out_dir)), world_size)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


@pytest.fixture(scope="session")
def distributed_results(tmp_path_factory):
    """``world_size -> [rank 0's results, ...]``, spawned once per world size on first use."""
    cache = {}

    def get(world_size: int) -> list[dict]:
        if world_size not in cache:
            cache[world_size] = spawn(world_size, tmp_path_factory.mktemp(f"world{world_size}"))
        return cache[world_size]

    return get
