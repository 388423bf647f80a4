"""Gloo process groups for the multi-process tests: a deadlock fails, it never hangs.

Every collective of a group made by :func:`init_group` raises after ``COLLECTIVE_TIMEOUT_S``, and
:func:`run_processes` kills the processes and raises when they have not all finished by a deadline.
"""

from __future__ import annotations

import datetime
import gc
import os
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60
SPAWN_DEADLINE_S = 240


def init_group(rank: int, world_size: int, out_dir: str) -> None:
    """Join the gloo group of ``world_size`` processes that meet in ``out_dir``, on one CPU thread."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def close_group() -> None:
    """Free this process's group, after every rank is done with it (call it in a ``finally``).

    Freeing the group also frees what still refers to it (DDP's hooks: if that waited for interpreter shutdown,
    gloo's threads would abort the process). The short sleep lets gloo's worker thread finish freeing the
    last collective first: torch 2.3 deadlocks when ``~ProcessGroupGloo`` joins that thread while holding the
    GIL and the thread needs the GIL to free the collective's tensors (seen with py-spy, one run in a few)."""
    gc.collect()
    time.sleep(0.2)  # releases the GIL
    dist.destroy_process_group()


def run_processes(worker: Callable, args: tuple, nprocs: int, deadline_s: float = SPAWN_DEADLINE_S) -> None:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes; raises if one fails or all are not done in time."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{nprocs} processes did not finish within {deadline_s} s (deadlock?)")
