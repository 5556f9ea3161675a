"""Load a run dir or a model for inference (generate, chat, eval)."""

from __future__ import annotations

from pathlib import Path


from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.train.hardware import pick_device, pick_dtype


def load_for_inference(target: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, system_prompt, device, dtype) for a run folder or any model spec."""
    from tuneforge.methods import METHODS
    from tuneforge.train.run import load_run_config

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    run_dir = Path(target)
    if (run_dir / "config.yaml").exists() and (run_dir / "adapter").exists():
        cfg = load_run_config(run_dir)
        tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
        method = METHODS[cfg.method.name]
        base = load_causal_lm(cfg.model.name, torch_dtype, device, cfg.model.attn_implementation, cfg.model.revision,
                              quantization_config=method.quantization_config(cfg.method, torch_dtype))
        fix_chat_tokenizer(tok, base)
        model = method.load(base, run_dir)
        return model.eval(), tok, cfg.data.system_prompt, device, torch_dtype
    if (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is a run without a saved adapter (did it finish? try --resume)")
    tok = load_tokenizer(target)
    model = load_causal_lm(target, torch_dtype, device)
    fix_chat_tokenizer(tok, model)
    return model.eval(), tok, None, device, torch_dtype
