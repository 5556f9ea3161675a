"""LoRA on a mixture-of-experts model (``method.moe``): which modules get adapters, whether the
router trains, and which experts may change.

- lora_on attention: the attention projections only (experts and router untouched).
- lora_on experts: peft's LoRA on the fused 3-D expert weights (``target_parameters``: one
  rank-r pair per expert, stacked), plus the shared expert's Linear layers when the family
  has one and every expert trains.
- router trained: the router is copied and trained in full (peft ``modules_to_save``; a few
  thousand weights per layer), and saved in the adapter folder with the LoRA weights.
- chosen experts (by index, or the top-k most used on the training data): the LoRA rows of
  the other experts get no gradient (a hook zeroes their slice), and since their B starts at
  zero their weights stay exactly the base's; the shared expert does not train then either.
"""

from __future__ import annotations

import torch

from tuneforge.models.moe import LAYER, MoEInfo, describe


def moe_targets(model, moe) -> dict:
    """peft LoraConfig arguments (target_modules, target_parameters, modules_to_save) for ``moe``."""
    info = describe(model)
    if info is None:
        raise ValueError(f"method.moe: {type(model).__name__} is not a mixture-of-experts model")
    modules, params = [], []
    if moe.lora_on in ("attention", "both"):
        modules += info.attention_linears
    if moe.lora_on in ("experts", "both"):
        params += [f"{info.experts_suffix}.{p}" for p in info.expert_params]
        if moe.experts == "all" and moe.top_k_experts is None and not peft_renames(info.model_type):
            modules += info.shared_expert_linears
    out = {"target_modules": modules, "target_parameters": params or None}
    if moe.router == "trained":
        out["modules_to_save"] = [info.router_suffix]
    return out


def peft_renames(model_type: str) -> bool:
    """peft rewrites LoRA targets of these families for transformers 5 (``gate_proj``/``down_proj``/...
    become the fused expert weights): a shared expert's ``gate_proj`` would be taken for the routed
    experts' ``gate_up_proj``, so shared experts of these families get no adapter."""
    # deferred: peft imports transformers; config validation and --help stay quick
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN

    return model_type in _MODEL_TO_CONVERSION_PATTERN


def expert_lora_layers(model) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer, peft ParamWrapper) for every LoRA on fused expert weights."""
    # deferred: peft imports transformers; config validation and --help stay quick
    from peft.tuners.lora.layer import ParamWrapper

    out = []
    for name, m in model.named_modules():
        if isinstance(m, ParamWrapper) and getattr(m, "num_experts", 1) > 1:
            layer = LAYER.search(name + ".")
            out.append((int(layer.group(1)) if layer else 0, m))
    return out


def expert_masks(layer: torch.nn.Module, adapter: str, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on the LoRA rows of the experts in ``keep``, 0 elsewhere, for lora_A [r*E, in] and
    lora_B [out, r*E]. peft lays them out as A.view(E, r, in) and B.view(out, r, E)."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    n = layer.num_experts
    mask_a = torch.zeros(n, a.shape[0] // n, a.shape[1], dtype=a.dtype, device=a.device)
    mask_b = torch.zeros(b.shape[0], b.shape[1] // n, n, dtype=b.dtype, device=b.device)
    mask_a[keep] = 1
    mask_b[..., keep] = 1
    return mask_a.reshape(a.shape), mask_b.reshape(b.shape)


def restrict_experts(model, chosen: dict[int, list[int]]) -> None:
    """Only the experts in ``chosen[layer]`` train: the other experts' LoRA rows get zero
    gradient (so, with B starting at zero, their weights never move). Layers not in
    ``chosen`` train no expert."""
    for layer_idx, layer in expert_lora_layers(model):
        keep = chosen.get(layer_idx, [])
        for adapter in list(layer.lora_A):
            mask_a, mask_b = expert_masks(layer, adapter, keep)
            for p, mask in ((layer.lora_A[adapter].weight, mask_a), (layer.lora_B[adapter].weight, mask_b)):
                p.register_hook(lambda g, m=mask: g * m.to(g.dtype))
    model.tuneforge_moe_experts = {int(k): sorted(v) for k, v in chosen.items()}


def expert_delta(layer: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """The LoRA update of every expert of one fused parameter, [E, ...] (tests and reports)."""
    return layer.get_delta_weight(adapter)


def moe_problems(moe, info: MoEInfo | None, model_name: str) -> list[str]:
    """What ``method.moe`` asks that this model cannot give (read from its meta model)."""
    if info is None:
        return [f"method.moe: model '{model_name}' is not a mixture-of-experts model that transformers records "
                "router logits for (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...); remove method.moe"]
    problems = [f"method.moe: {p}" for p in info.problems if moe.lora_on != "attention"]
    if isinstance(moe.experts, list) and max(moe.experts) >= info.num_experts:
        problems.append(f"method.moe.experts={moe.experts}: this model has experts 0..{info.num_experts - 1}")
    if moe.top_k_experts is not None and moe.top_k_experts > info.num_experts:
        problems.append(f"method.moe.top_k_experts={moe.top_k_experts}: this model has {info.num_experts} experts")
    if moe.lora_on == "attention" and not info.attention_linears:
        problems.append("method.moe.lora_on=attention: no attention Linear layers found in this model")
    return problems
