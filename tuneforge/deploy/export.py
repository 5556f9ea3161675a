"""Export a run as a plain Hugging Face model folder (weights + tokenizer + generation config).

``--merge`` folds what the method trained into the base weights: LoRA/DoRA/IA3 through
peft's ``merge_and_unload``; full/freeze/hft runs already are plain models. A QLoRA
adapter is folded into the de-quantised (full-precision) base, the usual way to ship it:
its outputs then differ from the 4-bit base + adapter by the base's quantisation error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tuneforge.io import atomic_dir, write_json
from tuneforge.train.hardware import DTYPES


def export_run(run_dir: Path, out: Path, merge: bool, dtype: str = "fp32") -> Path:
    from tuneforge.methods import METHODS
    from tuneforge.models.load import load_causal_lm, load_tokenizer
    from tuneforge.models.tokenizer import fix_chat_tokenizer
    from tuneforge.train.run import load_run_config

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir} has no adapter/ folder: not a finished run")
    cfg = load_run_config(run_dir)
    method = METHODS[cfg.method.name]
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
    if not merge:
        with atomic_dir(out) as tmp:
            shutil.copytree(run_dir / "adapter", tmp, dirs_exist_ok=True)
            tok.save_pretrained(tmp)
        return out
    # Fold in fp32 (a bf16 merge would round the small adapter deltas), then cast once.
    base = load_causal_lm(cfg.model.name, torch.float32, "cpu", cfg.model.attn_implementation, cfg.model.revision)
    model = method.merge(method.load(base, run_dir)).to(DTYPES[dtype])
    fix_chat_tokenizer(tok, model)  # eos = end of turn, in config and generation config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "tuneforge_export.json", {"run": str(run_dir.resolve()), "method": cfg.method.name,
                                                   "base": cfg.model.name, "merged": True, "dtype": dtype})
    return out
