"""Fine-tuning methods: which parameters train.

A method is a plug point: it declares its options (a pydantic class validated from the
config's ``method:`` section), checks them against the model's module names before any
weights load, prepares the loaded model (wrap with peft, freeze, ...), and saves/loads
what it trained in the format users expect (a standard peft adapter folder for peft
methods). Objectives never need to know which method is in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from tuneforge.config import Strict


class Method:
    name: ClassVar[str]
    options: ClassVar[type[Strict]]

    def check(self, opts, module_names: list[str]) -> list[str]:
        """Problems with ``opts`` for a model with these module names (read from a meta model)."""
        return []

    def base_dtype(self, opts, compute_dtype: torch.dtype) -> torch.dtype:
        """Frozen weights can live in the compute dtype (no fp32 copy); trained ones stay fp32."""
        return compute_dtype

    def apply(self, model, opts):
        raise NotImplementedError

    def save(self, model, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, base_model, run_dir: Path):
        """Base model + what this method saved in ``run_dir`` -> a model ready for inference."""
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"method '{cls.name}' is already registered")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    return METHODS[name]


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


from tuneforge.methods import lora as _lora  # noqa: E402,F401  (registers the built-in methods)
