"""LoRA and DoRA through peft: low-rank adapters on chosen linear layers, the base frozen.

DoRA (peft ``use_dora``) splits each adapted weight into a magnitude vector and a
direction, and applies the low-rank update to the direction only; it trains the same
A/B matrices plus one magnitude value per output feature.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file

from tuneforge.config import ConfigError, MoEOptions, Strict
from tuneforge.methods.base import PeftMethod, check_target_modules, register_method
from tuneforge.methods.full import upcast_trained_
from tuneforge.methods.moe import moe_targets, restrict_experts
from tuneforge.models.moe import describe


class LoraOptions(Strict):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")
    load_in_8bit: bool = Field(
        False, description="load the frozen base's linear layers in int8 (bitsandbytes LLM.int8(), outliers "
        "above 6.0 kept in 16-bit; ~1 byte per weight; CPU and CUDA); needs tuneforge[qlora]")
    moe: MoEOptions | None = Field(
        None, description="mixture-of-experts model: LoRA on attention/experts, router frozen or trained, chosen "
        "experts, load-balancing loss (method lora only; see MoEOptions)")

    @model_validator(mode="before")
    @classmethod
    def _moe_dropout(cls, data):
        # peft's LoRA on fused 3-D expert weights cannot apply dropout (x cannot be factored out
        # of B(A(dropout(x)))): when the adapters reach the experts and the user set no dropout,
        # the default becomes 0. A dropout the user did set is refused below, never dropped.
        if isinstance(data, dict) and data.get("moe") is not None and "dropout" not in data:
            moe = data["moe"]
            lora_on = moe.get("lora_on", "both") if isinstance(moe, dict) else getattr(moe, "lora_on", "both")
            if lora_on != "attention":
                data = {**data, "dropout": 0.0}
        return data

    @model_validator(mode="after")
    def _moe_fits(self):
        if self.moe is None:
            return self
        if self.name != "lora":
            raise ValueError(f"method.moe with method {self.name}: only method lora is built for mixture-of-experts "
                             "models (peft's LoRA on fused expert weights has no DoRA; 4-bit experts are untested)")
        if self.load_in_8bit:
            raise ValueError("method.moe with load_in_8bit: bitsandbytes quantises linear layers, not the fused "
                             "3-D expert weights LoRA targets here; train the MoE model without load_in_8bit")
        if self.target_modules != "all-linear":  # the default (a dumped config holds it): moe decides
            raise ValueError("method.moe chooses the LoRA targets (moe.lora_on: attention, experts or both); "
                             "remove method.target_modules")
        if self.moe.lora_on != "attention" and self.dropout:
            raise ValueError(f"method.dropout={self.dropout} with LoRA on the experts: peft's LoRA on fused expert "
                             "weights cannot apply dropout; set method.dropout=0 or moe.lora_on=attention")
        return self

    @field_validator("target_modules")
    @classmethod
    def _some_target(cls, v):
        if v == []:  # peft would wrap nothing, and the run would train no weight at all
            raise ValueError("LoRA needs at least one target module; use all-linear or name them")
        return v


class DoraOptions(LoraOptions):
    name: Literal["dora"] = "dora"


INSTALL_HINT = "pip install 'tuneforge[qlora]' (bitsandbytes==0.50.2)"


def bitsandbytes_problem(what: str) -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}"
    return None


def lora_config(opts, use_dora: bool = False, model=None):
    # deferred: peft imports transformers; config validation and --help stay quick
    from peft import LoraConfig, TaskType

    # A sequence-classification model (classify, reward) needs SEQ_CLS: peft then also
    # trains and saves the new head (modules_to_save), which starts from random weights.
    seq_cls = model is not None and type(model).__name__.endswith("ForSequenceClassification")
    targets = {"target_modules": opts.target_modules}
    if getattr(opts, "moe", None) is not None and model is not None:
        targets = moe_targets(model, opts.moe)  # attention / experts / router, named for this family
    return LoraConfig(task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM, r=opts.r,
                      lora_alpha=opts.alpha, lora_dropout=opts.dropout, use_rslora=opts.rslora, use_dora=use_dora,
                      **targets)


@register_method
class LoRA(PeftMethod):
    name = "lora"
    options = LoraOptions
    use_dora = False
    # Plain LoRA only: DoRA's weight-norm path and 4-bit bases keep peft's casting.
    fast_bf16_inputs = True

    def check(self, opts, module_names):
        problem = bitsandbytes_problem(f"method {opts.name} with load_in_8bit") if opts.load_in_8bit else None
        if getattr(opts, "moe", None) is not None:
            return [problem] if problem else []  # the targets come from the model (methods/moe.py; moe_problems)
        return ([problem] if problem else []) + check_target_modules(opts.target_modules, module_names)

    def quantization_config(self, opts, compute_dtype):
        if not opts.load_in_8bit:
            return None
        # deferred: transformers takes seconds to import; only code that builds a model pays
        from transformers import BitsAndBytesConfig

        # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16: that cast is
        # LLM.int8()'s design (its outlier path is 16-bit), not a problem to report each step.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        # The head stays in the compute dtype, as in QLoRA: it is the layer most hurt by rounding.
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "score"])

    def apply(self, model, opts):
        from peft import get_peft_model  # deferred: peft imports transformers; config validation and --help stay quick

        # deferred: peft imports transformers; config validation and --help stay quick
        from peft.tuners.lora import LoraLayer

        # peft keeps adapter weights in fp32 (autocast_adapter_dtype) even on a bf16 base:
        # the optimizer then updates fp32 values, and only matmuls run in bf16.
        model = get_peft_model(model, lora_config(opts, self.use_dora, model))
        if getattr(opts, "moe", None) is not None:
            if isinstance(opts.moe.experts, list):
                restrict_experts(model, {layer: opts.moe.experts for layer in describe(model).layers})
            if opts.moe.router == "trained":
                upcast_trained_(model)  # the router's trained copy: fp32 master weights, not the bf16 base's
        base = model.get_base_model()
        if self.fast_bf16_inputs and not opts.load_in_8bit and base.dtype == torch.bfloat16 and type(base).__name__.endswith("ForCausalLM"):
            # A bf16 base trains under autocast. peft would cast each layer's bf16 input up
            # to the fp32 adapter dtype, and autocast straight back down for the matmul: two
            # copies of every activation per adapted layer, for the same result.
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.cast_input_dtype_enabled = False
        return model


@register_method
class DoRA(LoRA):
    name = "dora"
    options = DoraOptions
    use_dora = True
    fast_bf16_inputs = False


# --- a saved LoRA adapter as weight updates (adapter merging, fusion) ------------------------

# peft's saved key of a LoRA pair, per layer kind: (A, B)
PAIR_KEYS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


@dataclass
class Lora:
    """One run's peft LoRA adapter: per module, the pair (A: r x in, B: out x r) and its scale."""

    config: dict  # adapter_config.json
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module key (peft's prefix) -> (A, B)
    kinds: dict[str, int]  # module key -> index into PAIR_KEYS
    scale: float

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = scale · B A in float64 (out x in, in the adapted layer's own layout)."""
        a, b = self.pairs[module]
        return self.scale * (b.double() @ a.double())


def read_lora(adapter_dir: Path) -> Lora:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"{adapter_dir}: a {cfg.get('peft_type')} adapter, not LoRA")
    if cfg.get("use_dora"):
        problems.append(f"{adapter_dir}: a DoRA adapter (its magnitude vector is not a low-rank update)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append(f"{adapter_dir}: per-module ranks/alphas (rank_pattern/alpha_pattern) are not supported")
    if cfg.get("modules_to_save"):
        problems.append(f"{adapter_dir}: trains whole modules too (modules_to_save {cfg['modules_to_save']}), "
                        f"which have no low-rank update to merge")
    if problems:
        raise ConfigError(problems)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs, kinds = {}, {}
    for key in tensors:
        for kind, (ka, kb) in enumerate(PAIR_KEYS):
            if key.endswith(ka):
                module = key[: -len(ka)]
                pairs[module] = (tensors[key], tensors[module + kb])
                kinds[module] = kind
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return Lora(cfg, pairs, kinds, scale)
