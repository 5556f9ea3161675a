"""LoRA through peft: low-rank adapters on chosen linear layers, the base frozen."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge.config import Strict
from tuneforge.io import atomic_dir
from tuneforge.methods import Method, register_method


class LoraOptions(Strict):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")


@register_method
class LoRA(Method):
    name = "lora"
    options = LoraOptions

    def check(self, opts, module_names):
        if opts.target_modules == "all-linear":
            return []
        leaves = {n.rsplit(".", 1)[-1] for n in module_names}
        problems = []
        for target in opts.target_modules:
            if target in leaves or any(n.endswith("." + target) or n == target for n in module_names):
                continue
            close = difflib.get_close_matches(target, sorted(leaves), n=1)
            hint = f"did you mean '{close[0]}'?" if close else ""
            problems.append(
                f"method.target_modules: '{target}' is not a module of this model. {hint} "
                f"Modules that exist: {', '.join(sorted(leaves))} (or use all-linear)"
            )
        return problems

    def _peft_config(self, opts, model=None):
        from peft import LoraConfig, TaskType

        # A sequence-classification model (classify, reward) needs SEQ_CLS: peft then also
        # trains and saves the new head (modules_to_save), which starts from random weights.
        seq_cls = model is not None and type(model).__name__.endswith("ForSequenceClassification")
        return LoraConfig(
            task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM,
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules=opts.target_modules,
            use_rslora=opts.rslora,
        )

    def apply(self, model, opts):
        from peft import get_peft_model

        # peft keeps adapter weights in fp32 (autocast_adapter_dtype) even on a bf16 base:
        # the optimizer then updates fp32 values, and only matmuls run in bf16.
        return get_peft_model(model, self._peft_config(opts, model))

    def save(self, model, out_dir: Path) -> None:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)

    def load(self, base_model, run_dir: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(run_dir / "adapter"))
