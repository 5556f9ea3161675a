"""Full fine-tuning and selective freezing: the model's own weights train, no new modules.

- full: every weight trains. Weights are loaded in fp32 (master weights; matmuls still
  run in bf16 under autocast) so small AdamW updates are not rounded away; the result is
  saved as a complete Hugging Face model folder.
- freeze: only the chosen weights train (the top-k transformer blocks and/or modules
  matching name patterns, e.g. ``*.self_attn`` or ``lm_head``); everything else stays
  frozen in the compute dtype. Only the trained tensors are saved, with a manifest, and
  loaded back onto the base.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from tuneforge.config import Strict
from tuneforge.io import atomic_dir
from tuneforge.methods.base import Method, register_method

TRAINED_FILE, MANIFEST_FILE = "trained.safetensors", "manifest.json"


def block_names(module_names: list[str]) -> list[str]:
    """The transformer blocks, in order: the children of the longest numbered module list
    (``model.layers.0 ... model.layers.N-1`` for Llama, ``transformer.h.*`` for GPT-2)."""
    numbered = [m for m in (re.fullmatch(r"(.+)\.(\d+)", n) for n in module_names) if m]
    if not numbered:
        return []
    parent, _ = Counter(m.group(1) for m in numbered).most_common(1)[0]
    return sorted((m.group(0) for m in numbered if m.group(1) == parent), key=lambda n: int(n.rsplit(".", 1)[1]))


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches a module name in full or as a dotted suffix (``self_attn`` = ``*.self_attn``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def upcast_trained_(model) -> None:
    """Trained weights become fp32 master weights; frozen ones keep the (bf16) load dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def save_trained(model, out_dir: Path, manifest: dict) -> None:
    """Only the tensors that trained (by parameter name) + a manifest saying what they are."""

    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(out_dir, lambda p: (p / MANIFEST_FILE).is_file(), what="adapter folder") as tmp:
        save_file(state, str(tmp / TRAINED_FILE))
        (tmp / MANIFEST_FILE).write_text(json.dumps({**manifest, "tensors": sorted(state)}, indent=1))


def load_trained(model, adapter_dir: Path):
    """Put saved tensors into ``model`` (in their saved dtype, as during training)."""

    weights = load_file(str(adapter_dir / TRAINED_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise RuntimeError(f"{adapter_dir}: tensors {unknown[:3]} are not parameters of this base model")
    device = next(model.parameters()).device
    for n, t in weights.items():
        params[n].data = t.to(device)
    return model


class FullOptions(Strict):
    name: Literal["full"] = "full"


class FreezeOptions(Strict):
    name: Literal["freeze"] = "freeze"
    top_k: int | None = Field(None, gt=0, description="train the last k transformer blocks")
    modules: list[str] = Field([], description="also train modules matching these patterns, e.g. "
                                               "['*.self_attn'] (attention only) or ['lm_head']")

    @model_validator(mode="after")
    def _something_trains(self):
        if self.top_k is None and not self.modules:
            raise ValueError("set top_k (last k blocks) and/or modules (name patterns) to choose what trains")
        return self


@register_method
class Full(Method):
    name = "full"
    options = FullOptions

    def base_dtype(self, opts, compute_dtype):
        return torch.float32

    def apply(self, model, opts):
        return model.requires_grad_(True)

    def save(self, model, out_dir: Path) -> None:
        with atomic_dir(out_dir, lambda p: (p / "config.json").is_file(), what="model folder") as tmp:
            model.save_pretrained(tmp)

    def load(self, base_model, run_dir: Path):
        # deferred: transformers takes seconds to import; only code that builds a model pays
        from transformers import AutoModelForCausalLM

        p = next(base_model.parameters())
        return AutoModelForCausalLM.from_pretrained(run_dir / "adapter", dtype=p.dtype).to(p.device)

    def merge(self, model):
        return model  # already a plain model


def freeze_selection(opts: FreezeOptions, module_names: list[str]) -> list[str]:
    """Names of the modules whose parameters train."""
    blocks = block_names(module_names)
    chosen = blocks[-opts.top_k:] if opts.top_k else []
    return chosen + [n for n in module_names if any(matches(n, p) for p in opts.modules)]


@register_method
class Freeze(Method):
    name = "freeze"
    options = FreezeOptions

    def check(self, opts, module_names):
        problems = []
        n_blocks = len(block_names(module_names))
        if opts.top_k and opts.top_k > n_blocks:
            problems.append(f"method.top_k={opts.top_k} but the model has {n_blocks} transformer blocks")
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
        for p in opts.modules:
            if not any(matches(n, p) for n in module_names):
                problems.append(f"method.modules: '{p}' matches no module of this model; module names end in: "
                                f"{', '.join(leaves)} (patterns use * wildcards, e.g. '*.self_attn')")
        return problems

    def apply(self, model, opts):
        model.requires_grad_(False)
        for name in freeze_selection(opts, [n for n, _ in model.named_modules() if n]):
            model.get_submodule(name).requires_grad_(True)
        upcast_trained_(model)
        return model

    def save(self, model, out_dir: Path) -> None:
        save_trained(model, out_dir, {"method": self.name})

    def load(self, base_model, run_dir: Path):
        return load_trained(base_model, run_dir / "adapter")

    def merge(self, model):
        return model  # the trained tensors are the model's own
