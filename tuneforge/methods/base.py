"""The method plug point: the base classes every method implements and the registry
(``METHODS``, keyed by name). The families register themselves when ``tuneforge.methods``
imports them."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import ClassVar

import torch

from tuneforge.config import Strict
from tuneforge.io import atomic_dir


class Method:
    name: ClassVar[str]
    options: ClassVar[type[Strict]]
    # train.distributed=fsdp splits every weight across processes (train/distributed.py).
    shardable: ClassVar[bool] = True
    # The learning rate a run of this method gets when the config sets no train.lr (None: train.lr's
    # own default), and why it differs: applied by plugins.validate_config, never over a user's value.
    default_lr: ClassVar[float | None] = None
    default_lr_why: ClassVar[str] = ""

    def check(self, opts, module_names: list[str]) -> list[str]:
        """Problems with ``opts`` for a model with these module names (read from a meta model)."""
        return []

    def base_dtype(self, opts, compute_dtype: torch.dtype) -> torch.dtype:
        """Frozen weights can live in the compute dtype (no fp32 copy); trained ones stay fp32."""
        return compute_dtype

    def quantization_config(self, opts, compute_dtype: torch.dtype):
        """A transformers quantization config for loading the base (None: load it unquantized)."""
        return None

    def for_task(self, opts, rows: list[dict], system_prompt: str | None):
        """``opts`` completed from the task's training rows (canonical ``messages`` rows) before
        ``apply``: methods initialised from the task's text (prompt tuning) fill it in here."""
        return opts

    def apply(self, model, opts):
        raise NotImplementedError

    def on_step(self, model, step: int) -> None:
        """Called before each optimizer step's forward passes (``step`` = steps done so far).
        Methods whose trainable set changes during training (hft) act here; others ignore it."""

    def save(self, model, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, base_model, run_dir: Path):
        """Base model + what this method saved in ``run_dir`` -> a model ready for inference."""
        raise NotImplementedError

    def merge(self, model):
        """The loaded tuned model folded into a plain transformers model (for export)."""
        raise ValueError(f"method '{self.name}' adds computation that cannot be folded into the base weights: "
                         f"serve the run folder (base + adapter) instead of exporting a merged model")


def _peft_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


class PeftMethod(Method):
    """A method that wraps the base with peft: saves/loads a standard peft adapter folder."""

    def save(self, model, out_dir: Path) -> None:
        with atomic_dir(out_dir, _peft_adapter, what="adapter folder") as tmp:
            model.save_pretrained(tmp)

    def load(self, base_model, run_dir: Path):
        from peft import PeftModel  # deferred: peft imports transformers; config validation and --help stay quick

        return PeftModel.from_pretrained(base_model, str(run_dir / "adapter"))

    def merge(self, model):
        return model.merge_and_unload()


def check_target_modules(targets, module_names: list[str], key: str = "method.target_modules") -> list[str]:
    """Each named target must be a module of the model (peft would silently skip a typo)."""
    if targets is None or targets == "all-linear":
        return []
    leaves = {n.rsplit(".", 1)[-1] for n in module_names}
    problems = []
    for target in targets:
        if target in leaves or any(n.endswith("." + target) or n == target for n in module_names):
            continue
        close = difflib.get_close_matches(target, sorted(leaves), n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
        problems.append(f"{key}: '{target}' is not a module of this model. {hint} "
                        f"Modules that exist: {', '.join(sorted(leaves))} (or use all-linear)")
    return problems


METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is already registered")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    return METHODS[name]


def methods_taking(option: str) -> list[str]:
    """Names of the methods whose options include ``option`` (for config error messages)."""
    return sorted(n for n, m in METHODS.items() if option in m.options.model_fields)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
