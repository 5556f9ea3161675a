"""Data-parallel training across processes started by torchrun (``tuneforge train --nproc N``).

Every rank builds the same seeded data, so the window of ``grad_accum x world`` micro-batches
is known everywhere; rank r trains micro-batches r, r+W, ... of it, and one all-reduce of
the gradients per optimizer step sums them. With the loss normalised by the whole window's
trained tokens, N processes with ``grad_accum=A`` compute the same update as one process
with ``grad_accum=A*N``.

Why not ``torch.nn.parallel.DistributedDataParallel``: the objectives call the model's
body and head directly (logits only where the loss is taken), which bypasses DDP's
``forward`` and so its gradient hooks. Reducing the flat gradient once per optimizer step
is the same arithmetic (DDP's buckets are an overlap optimisation) and works for every
objective. On GPUs, FSDP/DeepSpeed shard what this replicates: see docs/regimes.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> World:
    """Join the process group torchrun describes in the environment (or stay single)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def all_sum(world: World, value: float) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def sum_gradients(world: World, params: list[torch.nn.Parameter]) -> None:
    """Sum every rank's gradients in place, through one flat buffer (one collective)."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def launch(argv: list[str], nproc: int, run_name: str) -> int:
    """Re-run ``tuneforge train ARGV`` under torchrun with ``nproc`` processes on this machine.

    The run folder name is fixed here so every rank agrees on it (a default time stamp
    could differ by a second between ranks).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tuneforge", "train", *argv, f"run_name={run_name}"]
    return subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
