import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from tuneforge.methods import METHODS
from tuneforge.methods.lora import LoraOptions


def _loss(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids).logits.float().sum()


def test_bf16_base_skips_adapter_input_casts_with_the_same_result(tiny_model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = METHODS["lora"].apply(base, LoraOptions(r=4, dropout=0.0))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    for m in layers:  # B is zero at init: give the adapters an effect to compare
        for b in m.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.02)
    ids = torch.tensor([[3, 8, 20, 7, 2]])
    fast = _loss(model, ids)
    for m in layers:
        m.cast_input_dtype_enabled = True
    assert torch.allclose(fast, _loss(model, ids), rtol=1e-3)


def test_fp32_base_keeps_peft_defaults(tiny_model_dir):
    model = METHODS["lora"].apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraOptions(r=4))
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules() if isinstance(m, LoraLayer))
