"""torchrun's plumbing beside train.py (a paper reader can skip this file): joining the process
group, one process building the data's caches while the others wait, leaving together.

torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; without it, the run is
one process (rank 0 of 1) and nothing here talks to anyone.
"""
import contextlib
import datetime
import os
import sys

import torch

# How long the other processes wait for rank 0 to build the caches on a first start (Wiki-500K:
# 24 minutes on 2 cores, longer under torchrun's one thread a process). They wait on a gloo group
# of their own: NCCL's watchdog (10 minutes by default) never sees the wait.
CACHE_WAIT = datetime.timedelta(hours=12)


@contextlib.contextmanager
def joined(device):
    """(rank, world, device) of this process, inside the process group under torchrun: NCCL between
    GPUs (one per process), gloo between CPU processes. `device`: auto, cpu or cuda. Only rank 0
    prints; all leave together."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0's (errors still reach stderr)
    try:
        yield rank, world, device
        if world > 1:  # leave together: a process that tears gloo down while another still talks to it can abort
            torch.distributed.barrier()
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def rank_zero_first(rank, world):
    """Rank 0 runs the block first (on a first start it builds the caches), then the others (which
    find them built); all leave it together, so that training starts on every rank at once."""
    if world == 1:
        yield
        return
    waiting = torch.distributed.new_group(backend="gloo", timeout=CACHE_WAIT)
    if rank > 0:
        torch.distributed.barrier(group=waiting)
    yield
    if rank == 0:
        torch.distributed.barrier(group=waiting)  # the caches are built
    torch.distributed.barrier(group=waiting)  # every rank has read them
    torch.distributed.destroy_process_group(waiting)
