"""Fusion: learned composition of trained LoRA adapters (AdapterFusion-style, with a mixing
weight per layer instead of an attention over the adapters' outputs).

N trained LoRA adapters on one base stay frozen; each decoder block l learns one softmax
weight per adapter, shared by the block's adapted linear layers:

    y = W x + Σ_i softmax(g_l)_i · scale_i · B_i A_i x        g: (groups, N), the only trained tensor

``g`` starts at 0 (equal weights 1/N: the exact linear merge of the adapters at equal
weights). With one adapter its weight is 1 and the fusion is that adapter. The data is a mix
of the adapters' tasks: ``tuneforge merge-adapters --how fusion`` writes that run config
(deploy/fusion.py).

Once trained, the weights are constants, so the fusion is exactly one LoRA of rank Σ r_i (the
A_i stacked, each B_i times its weight and scale): ``save`` writes that standard peft adapter,
which generate/eval/serve/export/registry load like any LoRA run; ``adapter/fusion.json``
keeps the learned weights per layer and the source runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_file

from tuneforge.config import ConfigError, Strict
from tuneforge.io import atomic_dir
from tuneforge.methods.base import PeftMethod, _peft_adapter, register_method
from tuneforge.methods.lora import read_lora

FUSION_FILE = "fusion.json"
PEFT_PREFIX = "base_model.model."


class FusionOptions(Strict):
    name: Literal["fusion"] = "fusion"
    runs: list[str] = Field(min_length=1, description="LoRA run folders whose adapters are fused (kept frozen)")


def group_of(module: str) -> str:
    """The layer a module belongs to: its decoder block's number, or 'other' (e.g. lm_head)."""
    m = re.search(r"\.(\d+)\.", module)
    return f"layer.{m.group(1)}" if m else "other"


def _group_order(g: str) -> tuple:
    return (0, int(g.split(".")[1])) if g.startswith("layer.") else (1, 0)


class FusionGates(torch.nn.Module):
    """The learned mixing logits (groups x N); ``fixed`` (N,) replaces the softmax when set (the
    comparison of single adapters and the equal-weight merge in deploy/fusion.py)."""

    def __init__(self, groups: list[str], runs: list[str], ranks: list[int], adapter_config: dict):
        super().__init__()
        self.groups, self.runs, self.ranks, self.adapter_config = groups, runs, ranks, adapter_config
        self.logits = torch.nn.Parameter(torch.zeros(len(groups), len(runs)))
        self.fixed: torch.Tensor | None = None

    def weights(self) -> torch.Tensor:  # (groups, N), rows sum to 1
        if self.fixed is not None:
            return self.fixed.to(self.logits).expand_as(self.logits)
        return torch.softmax(self.logits, dim=-1)


class FusionLinear(torch.nn.Module):
    """A frozen linear layer plus the frozen adapters' updates, mixed by its group's weights.
    The adapters are stacked: A (R x in), B (out x R), R = Σ r_i of the adapters adapting it;
    ``seg`` (R,) says which adapter each rank row belongs to, ``scale`` (R,) its alpha/r."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, seg: torch.Tensor,
                 scale: torch.Tensor, gates: FusionGates, group: int):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", a, persistent=False)
        self.register_buffer("lora_B", b, persistent=False)
        self.register_buffer("seg", seg, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self._gates = [gates]  # a list: the shared gates are the model's, not this module's, submodule
        self.group = group

    def rank_weights(self) -> torch.Tensor:  # (R,) the weight x scale of each rank row
        return self._gates[0].weights()[self.group][self.seg] * self.scale

    def forward(self, x):
        dt = x.dtype
        h = F.linear(x, self.lora_A.to(dt)) * self.rank_weights().to(dt)  # (..., R)
        return self.base(x) + F.linear(h, self.lora_B.to(dt))


def _read(opts):
    """The adapters, or the problems that keep them from fusing."""
    problems, loras = [], []
    for run in opts.runs:
        folder = Path(run) / "adapter"
        if not (folder / "adapter_config.json").is_file():
            problems.append(f"method.runs: {run} has no LoRA adapter (adapter/adapter_config.json)")
            continue
        try:
            lo = read_lora(folder)
        except ConfigError as e:
            problems += e.problems
            continue
        if any(k != 0 for k in lo.kinds.values()) or lo.config.get("fan_in_fan_out"):
            problems.append(f"method.runs: {run} adapts embeddings or Conv1D layers; fusion takes linear layers only")
        loras.append(lo)
    return loras, problems


@register_method
class Fusion(PeftMethod):
    name = "fusion"
    options = FusionOptions
    shardable = False  # the stacked adapters are buffers, and the gates are shared across layers

    def check(self, opts, module_names):
        loras, problems = _read(opts)
        names = set(module_names)
        for run, lo in zip(opts.runs, loras):
            missing = [m for m in (k.removeprefix(PEFT_PREFIX) for k in lo.pairs) if m not in names]
            if missing:
                problems.append(f"method.runs: {run} adapts modules this model lacks ({missing[:3]}): "
                                f"was it trained on another base?")
        return problems

    def apply(self, model, opts):
        loras, problems = _read(opts)
        if problems:
            raise ConfigError(problems)
        for p in model.parameters():
            p.requires_grad_(False)
        modules = sorted({m for lo in loras for m in lo.pairs})
        groups = sorted({group_of(m) for m in modules}, key=_group_order)
        gates = FusionGates(groups, [str(r) for r in opts.runs], [lo.rank for lo in loras], loras[0].config)
        model.add_module("fusion_gates", gates.to(next(model.parameters()).device))
        for key in modules:
            name = key.removeprefix(PEFT_PREFIX)
            present = [(i, lo) for i, lo in enumerate(loras) if key in lo.pairs]
            a = torch.cat([lo.pairs[key][0].float() for _, lo in present])  # (R, in)
            b = torch.cat([lo.pairs[key][1].float() for _, lo in present], dim=1)  # (out, R)
            seg = torch.cat([torch.full((lo.rank,), i) for i, lo in present])
            scale = torch.cat([torch.full((lo.rank,), lo.scale) for _, lo in present])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            device = base.weight.device
            setattr(parent, child, FusionLinear(base, a.to(device), b.to(device), seg.to(device), scale.to(device),
                                                gates, groups.index(group_of(key))))
        return model

    def save(self, model, out_dir: Path) -> None:
        """The trained fusion as one standard peft LoRA of rank Σ r_i (exact) + fusion.json."""
        gates = model.fusion_gates
        layers = {n: m for n, m in model.named_modules() if isinstance(m, FusionLinear)}
        rank = sum(gates.ranks)
        tensors = {}
        with torch.no_grad():
            for name, m in layers.items():
                r = m.lora_A.shape[0]
                a = torch.zeros(rank, m.lora_A.shape[1])
                b = torch.zeros(m.lora_B.shape[0], rank)
                a[:r] = m.lora_A.float().cpu()
                b[:, :r] = (m.lora_B.float() * m.rank_weights().float()).cpu()
                tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
                tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
            weights = gates.weights().detach().cpu()
        config = {**gates.adapter_config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
                  "alpha_pattern": {}, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers})}
        with atomic_dir(out_dir, _peft_adapter, what="adapter folder") as tmp:
            save_file(tensors, str(tmp / "adapter_model.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
            (tmp / FUSION_FILE).write_text(json.dumps({
                "runs": gates.runs, "groups": gates.groups, "logits": gates.logits.detach().cpu().tolist(),
                "weights": {g: [round(float(w), 6) for w in row] for g, row in zip(gates.groups, weights)},
                "rank": rank}, indent=2))

    def load_fusion(self, base_model, run_dir: Path, opts):
        """The trained fusion with its learned gates as FusionLinear layers (not the folded
        peft adapter that ``load`` gives): for comparing weightings on one model."""
        model = self.apply(base_model, opts)
        saved = json.loads((Path(run_dir) / "adapter" / FUSION_FILE).read_text())
        with torch.no_grad():
            model.fusion_gates.logits.copy_(torch.tensor(saved["logits"]))
        return model
