"""Mixture-of-experts causal LMs: which modules route, which hold the experts, and how many
parameters a token actually uses.

Found from the model itself rather than a per-family table: transformers (5.x) names every
MoE family's router class in ``_can_record_outputs["router_logits"]`` (the module whose
first output is the router logits that ``output_router_logits`` collects), and keeps each
layer's routed experts fused in one sibling module holding 3-D parameters
``[num_experts, out, in]`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: ``mlp.experts.gate_up_proj``
and ``mlp.experts.down_proj``; the router is ``mlp.gate``). A shared expert (Qwen2-MoE's
``mlp.shared_expert``) is an ordinary MLP that every token goes through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class MoEInfo:
    model_type: str
    num_experts: int
    top_k: int  # experts each token is routed to
    layers: list[int]  # decoder layers with routed experts (Qwen2-MoE may keep dense layers)
    router_class: type
    router_suffix: str  # module name of the router below its decoder layer, e.g. "mlp.gate"
    experts_suffix: str  # the fused experts module, e.g. "mlp.experts"
    expert_params: list[str]  # its 3-D parameters, e.g. ["gate_up_proj", "down_proj"]
    shared_expert_linears: list[str]  # suffixes of the shared expert's Linear layers (may be empty)
    attention_linears: list[str]  # suffixes of the attention projections, e.g. "self_attn.q_proj"
    aux_loss_coef: float  # the model config's router_aux_loss_coef
    total_params: int = 0
    active_params: int = 0  # parameters one token passes through (top_k of num_experts routed experts)
    routed_expert_params: int = 0
    problems: list[str] = field(default_factory=list)  # what tuneforge cannot do with this family

    def summary(self) -> str:
        return (f"{self.model_type}: {self.num_experts} experts, top-{self.top_k}, {len(self.layers)} MoE layers; "
                f"{self.total_params:,} parameters in total, {self.active_params:,} active per token "
                f"({100 * self.active_params / max(self.total_params, 1):.1f}%)")


def router_class(model) -> type | None:
    """The class of the model's router modules (None: not a mixture of experts transformers records)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    recorder = getattr(type(hf), "_can_record_outputs", None) or {}
    target = recorder.get("router_logits")
    target = getattr(target, "target_class", target)
    return target if isinstance(target, type) else None


def _suffix(name: str) -> str:
    """``model.layers.3.mlp.gate`` -> ``mlp.gate`` (the part below the decoder layer)."""
    m = LAYER.search(name + ".")
    return name[m.end():] if m else name


def _adapter_name(name: str) -> bool:
    """A module or parameter peft added (LoRA factors, a trained copy, the wrapped layer)."""
    return any(part in name.split(".") for part in ("lora_A", "lora_B", "modules_to_save", "lora_magnitude_vector"))


def describe(model) -> MoEInfo | None:
    """What routes and what holds the experts in ``model`` (real or on the meta device), or
    None when it is not a mixture of experts."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = router_class(hf)
    if cls is None:
        return None
    modules = dict(hf.named_modules())
    # Under peft a trained router has two copies (original_module, modules_to_save): count the base once.
    routers = [n.replace(".original_module", "") for n, m in modules.items()
               if type(m) is cls and ".modules_to_save." not in n + "."]
    if not routers:
        return None
    first = next(m for m in hf.modules() if type(m) is cls)
    n_experts = int(getattr(first, "num_experts", None) or first.weight.shape[0])
    top_k = int(getattr(first, "top_k", None) or getattr(hf.config, "num_experts_per_tok", 1))
    problems = []
    layers, experts_suffix, expert_params, shared, routed = [], "", [], set(), 0
    for name in routers:
        m = LAYER.search(name + ".")
        if m:
            layers.append(int(m.group(1)))
        parent_name = name.rsplit(".", 1)[0]
        block = modules[parent_name]
        fused = [(cn, c) for cn, c in block.named_children() if cn != "original_module"
                 and any(p.dim() == 3 and p.shape[0] == n_experts for p in c.parameters())]
        if not fused:
            problems.append(f"{type(hf).__name__} keeps its experts as separate modules, not fused 3-D weights; "
                            "tuneforge targets fused experts (transformers 5 Mixtral/Qwen-MoE/OLMoE layout)")
            continue
        cname, experts = fused[0]
        experts_suffix = _suffix(f"{parent_name}.{cname}")
        # peft nests the fused module in ParamWrappers (experts.base_layer.base_layer.gate_up_proj).
        expert_params = [pn.rsplit(".", 1)[-1] for pn, p in experts.named_parameters() if p.dim() == 3]
        routed += sum(p.numel() for pn, p in experts.named_parameters() if p.dim() == 3)
        for sub, mod in block.named_modules():
            if (sub.count(".") >= 1 and isinstance(mod, torch.nn.Linear) and not sub.startswith(cname + ".")
                    and not _adapter_name(sub)):
                shared.add(_suffix(f"{parent_name}.{sub}").replace(".base_layer", ""))
    layer0 = LAYER.search(routers[0] + ".")
    prefix = routers[0][: layer0.end()] if layer0 else ""
    attention = sorted({_suffix(n).replace(".base_layer", "") for n, m in modules.items() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)
                        and not _adapter_name(n)
                        and ("attn" in _suffix(n).split(".")[0] or "attention" in _suffix(n).split(".")[0])})
    total = sum(p.numel() for n, p in hf.named_parameters() if not _adapter_name(n))
    active = total - routed * (n_experts - top_k) // n_experts
    return MoEInfo(model_type=getattr(hf.config, "model_type", type(hf).__name__), num_experts=n_experts, top_k=top_k,
                   layers=sorted(layers), router_class=cls, router_suffix=_suffix(routers[0]),
                   experts_suffix=experts_suffix, expert_params=expert_params,
                   shared_expert_linears=sorted(shared), attention_linears=attention,
                   aux_loss_coef=float(getattr(hf.config, "router_aux_loss_coef", 0.0) or 0.0),
                   total_params=total, active_params=active, routed_expert_params=routed,
                   problems=sorted(set(problems)))


def describe_config(model_config) -> MoEInfo | None:
    """``describe`` of the model a transformers config builds, on the meta device (no weights)."""
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return describe(model)


def router_modules(model, info: MoEInfo) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer, router module) for every router that runs in the forward pass; a router
    peft copies to train (modules_to_save) appears once, as the copy that runs."""
    out = []
    for name, m in model.named_modules():
        if type(m) is info.router_class and ".original_module" not in name:
            layer = LAYER.search(name + ".")
            out.append((int(layer.group(1)) if layer else 0, m))
    return out
