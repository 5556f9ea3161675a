"""Run under torchrun by test_distributed.py: a checkpoint written from a sharded model, read
back into it, restores every rank's shard of the weights and of the optimizer state (what the
NaN guard's rollback does under train.distributed=fsdp)."""

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, get_scheduler

from tuneforge.objectives import OBJECTIVES
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import distributed

model_dir, run_dir = sys.argv[1], Path(sys.argv[2])
world = distributed.setup("cpu")
sft = OBJECTIVES["sft"]
model = AutoModelForCausalLM.from_pretrained(model_dir)  # every weight trains, the tied embedding too
objective = distributed.shard(model, sft)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = get_scheduler("constant", optimizer)
ids = torch.arange(3, 40).view(1, -1)


def step():
    loss, _ = objective.loss(model, {"input_ids": ids, "labels": ids}, sft.options(), hidden_path=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def local_state():
    shards = {n: p.to_local().clone() for n, p in model.named_parameters()}
    moments = {(i, k): v.to_local().clone() if isinstance(v, DTensor) else v.clone()
               for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}
    return shards, moments


step()
ckpt.save_checkpoint(run_dir / "checkpoints", ckpt.Position(step=1), model, optimizer, scheduler, ckpt.rng_state(),
                     keep=2, write=world.is_main)
distributed.barrier(world)
saved = local_state()
assert all(isinstance(p, DTensor) for p in model.parameters())
step()
assert any(not torch.equal(a, b) for a, b in zip(saved[0].values(), local_state()[0].values()))
ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), model, optimizer, scheduler)
restored = local_state()
for before, after in zip(saved, restored):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), (world.rank, k)
step()  # and training goes on from there
distributed.teardown(world)
