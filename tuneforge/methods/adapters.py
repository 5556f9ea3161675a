"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP inserted after the
attention and/or MLP sub-layer of every transformer block, the base frozen.

    h -> h + up(act(down(h)))      down: [D -> size], up: [size -> D], up starts at zero

so the tuned model starts exactly at the base model. Written here (about 60 lines)
because no maintained adapter library supports transformers 5. Adapters are attached as
child modules named ``bottleneck_adapter`` and run from a forward hook on the sub-layer,
so the base model's code and weight names are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.methods.base import Method, register_method
from tuneforge.methods.full import MANIFEST_FILE, block_names, load_trained, save_trained

ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}
SUBLAYERS = {"attention": ("self_attn", "attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}


class AdapterOptions(Strict):
    name: Literal["adapters"] = "adapters"
    size: int = Field(16, gt=0, description="bottleneck width")
    where: list[Literal["attention", "mlp"]] = Field(["attention", "mlp"], min_length=1)
    activation: Literal["relu", "gelu", "silu"] = "relu"


class Bottleneck(torch.nn.Module):
    def __init__(self, dim: int, size: int, activation: str):
        super().__init__()
        self.down = torch.nn.Linear(dim, size)
        self.act = ACTIVATIONS[activation]()
        self.up = torch.nn.Linear(size, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [B, T, D]
        delta = self.up(self.act(self.down(h.to(self.down.weight.dtype))))
        return h + delta.to(h.dtype)


def _run_adapter(module, args, output):
    if isinstance(output, tuple):  # attention returns (hidden, attn_weights)
        return (module.bottleneck_adapter(output[0]), *output[1:])
    return module.bottleneck_adapter(output)


def sublayer_names(module_names: list[str], where: list[str]) -> list[str]:
    """The attention/MLP sub-layers of every block (children named e.g. self_attn, mlp)."""
    children = set(module_names)
    found = []
    for block in block_names(module_names):
        for kind in where:
            found += [f"{block}.{c}" for c in SUBLAYERS[kind] if f"{block}.{c}" in children][:1]
    return found


@register_method
class Adapters(Method):
    name = "adapters"
    options = AdapterOptions

    def check(self, opts, module_names):
        n_blocks = len(block_names(module_names))
        found = sublayer_names(module_names, opts.where)
        if not n_blocks or len(found) != n_blocks * len(opts.where):
            return [f"method adapters: could not find {' and '.join(opts.where)} sub-layers "
                    f"(named one of {[c for w in opts.where for c in SUBLAYERS[w]]}) in every transformer block"]
        return []

    def apply(self, model, opts):
        model.requires_grad_(False)
        dim = model.get_input_embeddings().weight.shape[1]
        device = next(model.parameters()).device
        for name in sublayer_names([n for n, _ in model.named_modules() if n], opts.where):
            sub = model.get_submodule(name)
            sub.bottleneck_adapter = Bottleneck(dim, opts.size, opts.activation).to(device)  # fp32, trained
            sub.register_forward_hook(_run_adapter)
        model.bottleneck_adapter_opts = opts  # saved in the manifest, to rebuild the same adapters on load
        return model

    def save(self, model, out_dir: Path) -> None:
        save_trained(model, out_dir, {"method": self.name, "options": model.bottleneck_adapter_opts.model_dump()})

    def load(self, base_model, run_dir: Path):
        manifest = json.loads((run_dir / "adapter" / MANIFEST_FILE).read_text())
        model = self.apply(base_model, AdapterOptions(**manifest["options"]))
        return load_trained(model, run_dir / "adapter")
