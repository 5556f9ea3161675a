"""A run folder's one home: everything that opens a finished (or running) run folder comes
through here — its config, its trained weights (``adapter/``), its system prompt, its eval
scores, and its model with or without what it trained merged into the base.

Used by generate/chat, eval, export, serve and the registry, adapter merging, the RLHF chain
and the policy recipe's reward model.

    config.yaml        the resolved run config (validated again when opened)
    adapter/           what the method trained (peft adapter, full model folder, tensors) + tokenizer
    head/config.json   classify/reward runs: the sequence head's config (labels, pad id)
    eval.json          held-out scores, "tuned" and "base"
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tuneforge.config import RunConfig, deep_merge, parse_overrides
from tuneforge.hardware import pick_device, pick_dtype
from tuneforge.io import sha256_file
from tuneforge.models.load import load_causal_lm, load_tokenizer, resolve
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.plugins import method_of, validate_config


class RunError(ValueError):
    """A folder that is not a (finished) run folder, with what to do about it."""


def load_run_config(run_dir: str | Path, overrides: list[str] | Mapping[str, Any] = ()) -> RunConfig:
    """The run's config.yaml validated again (with overrides on top: ``key=value`` items or a
    mapping of dotted keys, as config.parse_overrides reads them)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{Path(run_dir)} is not a run folder (no config.yaml)")
    raw = yaml.safe_load(path.read_text())
    extra = parse_overrides(overrides if isinstance(overrides, Mapping) else list(overrides))
    return validate_config(deep_merge(raw, extra), str(path))


def load_run(run_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, merge: bool = False):
    """(model, fixed tokenizer, config) of a run: the base with what the run trained on top,
    or folded in with ``merge`` (a plain transformers model, for export and the next stage
    of a chain; a method that cannot fold says so)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if not (run_dir / "adapter").is_dir():
        raise RunError(f"{run_dir} is a run without a saved adapter (did it finish? try --resume)")
    if cfg.model.kind == "vision":
        raise RunError(f"{run_dir} is a vision-language run (model.kind=vision): `tuneforge eval` and `tuneforge "
                       f"serve` take it; text-only commands (generate, chat, export, merge) do not yet")
    method = method_of(cfg)
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    # A quantised base (qlora) cannot take merged weights: merging loads it unquantised.
    quant = None if merge else method.quantization_config(cfg.method, dtype)
    base = load_causal_lm(cfg.model.name, dtype, device, cfg.model.attn_implementation, cfg.model.revision,
                          cfg.model.trust_remote_code, quant)
    fix_chat_tokenizer(tok, base)
    model = method.load(base, run_dir)
    if merge:
        model = method.merge(model)
        fix_chat_tokenizer(tok, model)  # eos = end of turn in the folded model's config and generation config
    return model.eval(), tok, cfg


def load_vision_run(run_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor, config) of a vision-language run: the VLM with its LoRA adapter (and the
    projector / vision tower it trained in full) on top, the processor saved with the adapter."""
    from tuneforge.models.vision import fix_vision_generation, load_processor, load_vision_model

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.model.kind != "vision":
        raise RunError(f"{run_dir} is a text run (model.kind=text)")
    if not (run_dir / "adapter").is_dir():
        raise RunError(f"{run_dir} is a run without a saved adapter (did it finish? try --resume)")
    proc = load_processor(str(run_dir / "adapter"))
    base = load_vision_model(cfg.model.name, dtype, device, cfg.model.attn_implementation, cfg.model.revision,
                             cfg.model.trust_remote_code)
    fix_vision_generation(proc, base)
    return method_of(cfg).load(base, run_dir).eval(), proc, cfg


def load_head(run_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A trained classify/reward run -> (model with the adapter merged, tokenizer), for inference."""
    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve(cfg.model.name).path, config=AutoConfig.from_pretrained(run_dir / "head"), dtype=dtype)
    model = method_of(cfg).load(base, run_dir)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return model.to(device).eval(), AutoTokenizer.from_pretrained(run_dir / "adapter")


def load_for_inference(target: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, system_prompt, device, dtype) for a run folder or any model spec
    (embedded alias, local folder, .gguf file, hub id)."""
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if (Path(target) / "config.yaml").exists():
        model, tok, cfg = load_run(target, device, torch_dtype)
        return model, tok, cfg.data.system_prompt, device, torch_dtype
    tok = load_tokenizer(target)
    model = load_causal_lm(target, torch_dtype, device)
    fix_chat_tokenizer(tok, model)
    return model.eval(), tok, None, device, torch_dtype


# --- what the registry and deploy know of a finished run, read from its files ------------


@dataclass(frozen=True)
class RunInfo:
    run_dir: Path
    base_model: str  # the run's model.name (embedded alias, folder or hub id)
    method: str
    system_prompt: str | None
    adapter_sha256: str
    scores: dict[str, float] = field(default_factory=dict)  # eval.json "tuned" scores
    base_scores: dict[str, float] = field(default_factory=dict)

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def main_metric(self) -> str | None:
        # evaluate.metrics.score puts the main metric first (json_exact, exact_match, token_f1).
        return next(iter(self.scores), None)

    @property
    def main_score(self) -> float | None:
        return self.scores[self.main_metric] if self.scores else None


def read_run(run_dir: str | Path) -> RunInfo:
    """A finished run's index record. Reads config.yaml as plain YAML (no validation, no model
    code): the registry lists runs written by older tuneforge versions too."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    # Every method saves its trained weights under adapter/ (a peft adapter, a full model
    # folder, or the trained tensors of freeze/hft/adapters).
    adapter = run_dir / "adapter"
    if not adapter.is_dir() or not any(p.suffix == ".safetensors" for p in adapter.iterdir()):
        raise RunError(f"{run_dir} has no trained weights in adapter/ (did the run finish? try --resume)")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    scores = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    return RunInfo(run_dir=run_dir, base_model=cfg["model"]["name"], method=cfg["method"]["name"],
                   system_prompt=(cfg.get("data") or {}).get("system_prompt"),
                   adapter_sha256=model_weights_sha256(adapter),
                   scores=(scores.get("tuned") or {}).get("scores", {}),
                   base_scores=(scores.get("base") or {}).get("scores", {}))


def model_weights_sha256(model_dir: str | Path) -> str:
    """One hash over a model folder's weight files (name + content), so a changed base is noticed."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise RunError(f"{model_dir} holds no weight files")
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()
