"""QLoRA: the frozen base loaded in 4-bit (NF4, optionally double-quantised) through
bitsandbytes, LoRA adapters on top trained in fp32.

bitsandbytes' 4-bit path also runs on CPUs (measured here: bitsandbytes 0.50.2, torch 2.13 CPU).
The base's linear layers inside the transformer blocks are stored as packed 4-bit values
plus one absmax scale per 64 weights; embeddings, norms and the LM head stay in the
compute dtype, as in the QLoRA paper.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneforge.methods.base import check_target_modules, register_method
from tuneforge.methods.lora import LoRA, LoraOptions, bitsandbytes_problem

class QloraOptions(LoraOptions):
    name: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base")
    double_quant: bool = Field(True, description="quantise the absmax scales too (~0.4 bit/param saved)")

    @model_validator(mode="after")
    def _four_bit(self):
        if self.load_in_8bit:
            raise ValueError("qlora loads the base in 4-bit; for an 8-bit base use method lora with load_in_8bit: true")
        return self


@register_method
class QLoRA(LoRA):
    name = "qlora"
    options = QloraOptions
    fast_bf16_inputs = False
    # bitsandbytes' packed 4-bit weights (Params4bit) are not plain tensors that FSDP2 can split.
    shardable = False

    def check(self, opts, module_names):
        problem = bitsandbytes_problem("method qlora")
        return ([problem] if problem else []) + check_target_modules(opts.target_modules, module_names)

    def quantization_config(self, opts, compute_dtype):
        # deferred: transformers takes seconds to import; only code that builds a model pays
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.quant_type,
                                  bnb_4bit_use_double_quant=opts.double_quant, bnb_4bit_compute_dtype=compute_dtype)

    def apply(self, model, opts):
        return _keep_training_layout(super().apply(model, opts))

    def load(self, base_model, run_dir):
        return _keep_training_layout(super().load(base_model, run_dir))


def _keep_training_layout(model):
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, an eval-mode no-grad forward repacks each weight in place
    for a faster kernel that has no autograd support: training after a validation pass
    then gets silently wrong gradients (measured: bitsandbytes 0.50.2, max grad error 0.1
    on a tiny Llama). Keeping one layout also makes eval and training outputs agree.
    """
    import bitsandbytes as bnb  # deferred: optional extra (tuneforge[qlora])

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model
