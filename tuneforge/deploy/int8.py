"""Dynamic int8 quantisation of Linear layers for CPU serving, saved without pickles.

Format of an int8 export folder (everything safetensors/JSON, nothing executable):
  config.json, generation_config.json, tokenizer files   the usual HF files
  model.safetensors       every tensor the float model has, except quantised Linear weights,
                          which appear as  NAME.weight_int8 (int8 [out, in]),
                          NAME.weight_scale (fp64 [out]) and NAME.weight_zero_point (int64 [out])
  int8.json               {"scheme": "torch.ao dynamic per-channel qint8", "quantized": [module names]}
Loading rebuilds the model from config.json, quantises its (random) Linear layers to get
the right module types, then sets the stored int8 weights exactly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SCHEME = "torch.ao dynamic per-channel qint8"


def _quantize_dynamic(model):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch marks its quantized-tensor constructors deprecated in favour of torchao; they still work.
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                inplace=False)


def _dynamic_linears(model) -> dict:
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, DynLinear)}


def _float_tensors(model) -> dict:
    """The float parameters and persistent buffers (embeddings, norms) outside the int8 layers."""
    int8 = tuple(f"{n}." for n in _dynamic_linears(model))
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not k.startswith(int8) and isinstance(v, torch.Tensor) and v.dtype.is_floating_point}


def quantize(model):
    """fp32 model -> a copy whose Linear layers (lm_head included) run int8 matmuls."""
    model = model.float().eval()
    if model.config.tie_word_embeddings:
        # The embedding stays float; untie so quantising lm_head does not touch it.
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
    return _quantize_dynamic(model)


def save_int8(qmodel, out: Path) -> None:
    linears = _dynamic_linears(qmodel)
    tensors = {k: t.detach().contiguous() for k, t in _float_tensors(qmodel).items()}
    for name, m in linears.items():
        w, b = m.weight(), m.bias()
        tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
        tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().contiguous()
        tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().contiguous()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    qmodel.config.save_pretrained(out)
    (out / "int8.json").write_text(json.dumps({"scheme": SCHEME, "quantized": sorted(linears)}, indent=2) + "\n")


def load_int8(path: str | Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = json.loads((path / "int8.json").read_text())
    if meta["scheme"] != SCHEME:
        raise ValueError(f"{path}: unknown int8 scheme {meta['scheme']!r}")
    config = AutoConfig.from_pretrained(path)
    model = _quantize_dynamic(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    tensors = load_file(str(path / "model.safetensors"))
    linears = _dynamic_linears(model)
    if sorted(linears) != meta["quantized"]:
        raise ValueError(f"{path}: quantised layers do not match the model built from config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, m in linears.items():
            q = torch._make_per_channel_quantized_tensor(tensors.pop(f"{name}.weight_int8"),
                                                         tensors.pop(f"{name}.weight_scale"),
                                                         tensors.pop(f"{name}.weight_zero_point"), 0)
            m.set_weight_bias(q, tensors.pop(f"{name}.bias", None))
    # Set the float tensors one by one: load_state_dict would also ask the int8 modules for
    # their (unused, unsaved) activation scale and zero point.
    floats = _float_tensors(model)
    if sorted(floats) != sorted(tensors):
        raise ValueError(f"{path}: tensors differ from the model built from config.json: "
                         f"{sorted(set(floats) ^ set(tensors))[:5]}")
    with torch.no_grad():
        for name, t in tensors.items():
            floats[name].copy_(t)
    return model.eval()
