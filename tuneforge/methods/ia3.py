"""(IA)^3 through peft: learned per-feature scaling vectors on chosen layers.

The adapted layers' outputs (attention keys/values) or inputs (feed-forward down
projection) are multiplied element-wise by a trained vector initialised to ones, so the
tuned model starts exactly at the base model and trains ~0.01-0.1% of the parameters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneforge.config import Strict
from tuneforge.methods.base import PeftMethod, check_target_modules, register_method


class Ia3Options(Strict):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="default: peft's choice for the architecture (Llama: k_proj, v_proj, down_proj)")
    feedforward_modules: list[str] | None = Field(
        None, description="targets whose input (not output) is scaled; must be a subset of target_modules")

    @field_validator("target_modules")
    @classmethod
    def _some_target(cls, v):
        if v == []:
            raise ValueError("IA3 needs at least one target module; leave it unset (peft's choice), use "
                             "all-linear or name them")
        return v


@register_method
class IA3(PeftMethod):
    name = "ia3"
    options = Ia3Options

    def check(self, opts, module_names):
        problems = check_target_modules(opts.target_modules, module_names)
        problems += check_target_modules(opts.feedforward_modules, module_names, "method.feedforward_modules")
        if opts.feedforward_modules and opts.target_modules is None:
            problems.append("method.feedforward_modules needs method.target_modules too (a superset of it)")
        return problems

    def apply(self, model, opts):
        # deferred: peft imports transformers; config validation and --help stay quick
        from peft import IA3Config, TaskType, get_peft_model

        return get_peft_model(model, IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=opts.target_modules,
                                               feedforward_modules=opts.feedforward_modules))
