"""Data-parallel training across processes started by torchrun (``tuneforge train --nproc N``).

Every rank builds the same seeded data, so the window of ``grad_accum x world`` micro-batches
is known everywhere; rank r trains micro-batches r, r+W, ... of it. With the loss normalised
by the whole window's trained tokens, summing the ranks' gradients makes N processes with
``grad_accum=A`` compute the same update as one process with ``grad_accum=A*N``.
``train.distributed`` picks how the ranks hold the model and sum the gradients:

ddp: every rank holds the whole model, and one all-reduce of the flat gradient per optimizer
step sums them. Why not ``torch.nn.parallel.DistributedDataParallel``: the objectives call
the model's body and head directly (logits only where the loss is taken), which bypasses
DDP's ``forward`` and so its gradient hooks. Reducing the flat gradient once per step is the
same arithmetic (DDP's buckets are an overlap optimisation) and works for every objective.

fsdp: PyTorch's FSDP2 (``fully_shard``) keeps 1/N of every weight, gradient and optimizer
state on each rank, all-gathers a decoder layer's weights just before the layer runs and
reduce-scatters its gradients right after its backward. FSDP2 hooks the ``__call__`` of the
modules it is applied to, so the layers, called by the body's forward, are covered. The
embeddings, final norm and head are not in any layer and the objectives call the body and
the head directly, so they are owned by a root module whose forward *is* the objective's
loss (``shard``): its forward gathers them, and its backward hook reduces their gradients
once the whole backward is done.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


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


class _LossRoot(torch.nn.Module):
    """The FSDP root: a module around the model whose forward runs the objective's loss."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss, batch: dict, opts, hidden_path: bool):
        return loss(self.model, batch, opts, hidden_path=hidden_path)


@dataclass(frozen=True)
class ShardedObjective:
    """An objective whose ``loss`` runs as the forward of the FSDP root (same signature; the
    ``model`` passed is the one given to ``shard``, which the root holds)."""

    objective: Any
    root: _LossRoot

    def loss(self, model, batch: dict, opts, *, hidden_path: bool):
        return self.root(self.objective.loss, batch, opts, hidden_path)


def shard(model: torch.nn.Module, objective) -> ShardedObjective:
    """Shard ``model`` in place across the process group (FSDP2): one unit per decoder layer
    (the classes transformers lists in ``_no_split_modules``), the rest in the root unit.

    No ``MixedPrecisionPolicy``: weights are gathered in the dtype they are stored in (LoRA:
    a frozen bf16 base, fp32 adapters) and the loop's autocast computes in bf16 exactly as in
    one process; a bf16 ``param_dtype`` would round the fp32 adapter weights, which one
    process never does. Trainable weights share one dtype, so gradients reduce in it.
    """
    # deferred: the FSDP module loads only for runs sharded across processes
    from torch.distributed.fsdp import FSDPModule, fully_shard

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(hf, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"train.distributed=fsdp: {type(hf).__name__} names no decoder layer class "
                         f"(_no_split_modules) to shard by; use train.distributed=ddp")
    for layer in layers:
        fully_shard(layer)
    root = fully_shard(_LossRoot(model))
    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            # The loss is already normalised by the whole window's tokens: the ranks' gradients
            # must be summed, not averaged (FSDP's default). A divide factor of 1 alone makes
            # FSDP use PREMUL_SUM, which gloo lacks; forcing sum reductions keeps it a plain SUM.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return ShardedObjective(objective, root)


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` with all its elements: an FSDP shard is all-gathered (to the CPU), which is a
    collective every rank must join, in the same order; any other tensor is returned as is."""
    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``t`` cut to this rank's shard of ``ref`` when ``ref`` is an FSDP shard
    (each rank slices its own part: no communication); otherwise ``t`` itself."""
    if not isinstance(ref, DTensor):
        return t
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def launch(argv: list[str], nproc: int, run_name: str) -> int:
    """Re-run ``tuneforge train ARGV`` under torchrun with ``nproc`` processes on this machine.

    The run folder name is fixed here so every rank agrees on it (a default time stamp
    could differ by a second between ranks).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tuneforge", "train", *argv, f"run_name={run_name}"]
    return subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
