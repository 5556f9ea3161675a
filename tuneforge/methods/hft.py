"""Half fine-tuning (HFT, Hui et al. 2024): in each round half of every block's weight
matrices train and the other half stay frozen, so part of the pre-trained knowledge is
always held fixed while every weight still gets trained over time.

Schedule (``round_steps`` optimizer steps per round, seeded by ``seed``):
- the parameter groups of a block are its weight matrices, split by the block's
  sub-module (Llama: attention q/k/v/o; MLP gate/up/down); norms and embeddings stay frozen;
- in round 2j, each group trains a random half of its matrices (for an odd count, the
  larger half alternates between blocks); in round 2j+1 the other half trains. So the
  halves change every round and every matrix trains in every pair of rounds.

How frozen halves stay bit-identical: every candidate keeps ``requires_grad`` (the
optimizer and checkpoints see one fixed set), and a post-accumulate-grad hook drops the
gradient of a frozen matrix (``grad = None``). torch's AdamW skips parameters without a
gradient entirely: no weight decay, no moment update, no step count. A half that comes
back resumes from the moments its last active round left. The cost: backward still
computes the frozen half's weight gradients before dropping them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.methods.base import Method, register_method
from tuneforge.methods.full import block_names, load_trained, save_trained


class HftOptions(Strict):
    name: Literal["hft"] = "hft"
    round_steps: int = Field(10, gt=0, description="optimizer steps per round; the trained half changes each round")
    seed: int = 0


def block_groups(model) -> list[dict[str, list[str]]]:
    """Per block: {sub-module name: [parameter names of its linear layers]}."""
    names = [n for n, _ in model.named_modules() if n]
    groups = []
    for block in block_names(names):
        by_child: dict[str, list[str]] = {}
        for n, m in model.get_submodule(block).named_modules():
            if isinstance(m, torch.nn.Linear):
                by_child.setdefault(n.split(".")[0], []).extend(f"{block}.{n}.{p}" for p, _ in m.named_parameters())
        groups.append(by_child)
    return groups


def active_half(groups: list[dict[str, list[str]]], round_: int, seed: int) -> set[str]:
    """The parameter names that train in ``round_`` (pure: a function of the schedule only)."""
    active = set()
    for b, by_child in enumerate(groups):
        for c, (child, members) in enumerate(sorted(by_child.items())):
            g = torch.Generator().manual_seed(seed * 1_000_003 + (round_ // 2) * 10_007 + b * 101 + c)
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            cut = (len(order) + (b % 2)) // 2
            active.update(order[:cut] if round_ % 2 == 0 else order[cut:])
    return active


class HftState:
    def __init__(self, groups, opts: HftOptions):
        self.groups, self.opts, self.round, self.active = groups, opts, None, set()

    def set_step(self, step: int) -> None:
        r = step // self.opts.round_steps
        if r != self.round:
            self.round, self.active = r, active_half(self.groups, r, self.opts.seed)


@register_method
class HFT(Method):
    name = "hft"
    options = HftOptions
    # Its gradient hooks sit on the whole parameters that FSDP replaces with shards.
    shardable = False

    def check(self, opts, module_names):
        return [] if block_names(module_names) else ["method hft: found no transformer blocks in this model"]

    def base_dtype(self, opts, compute_dtype):
        return torch.float32  # every block matrix trains at some point: fp32 master weights

    def apply(self, model, opts):
        model.requires_grad_(False)
        state = HftState(block_groups(model), opts)
        params = dict(model.named_parameters())
        for by_child in state.groups:
            for members in by_child.values():
                for n in members:
                    params[n].requires_grad_(True)
                    params[n].register_post_accumulate_grad_hook(_drop_grad_unless_active(state, n))
        state.set_step(0)
        model.hft_state = state
        return model

    def on_step(self, model, step: int) -> None:
        model.hft_state.set_step(step)

    def save(self, model, out_dir: Path) -> None:
        save_trained(model, out_dir, {"method": self.name, "round_steps": model.hft_state.opts.round_steps})

    def load(self, base_model, run_dir: Path):
        return load_trained(base_model, run_dir / "adapter")

    def merge(self, model):
        return model  # the trained tensors are the model's own


def _drop_grad_unless_active(state: HftState, name: str):
    def hook(p: torch.Tensor) -> None:
        if name not in state.active:
            p.grad = None

    return hook
