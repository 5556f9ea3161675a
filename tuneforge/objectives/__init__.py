"""Objectives: what the loss is. A plug point like methods (``objective: {name: ...}``).

An objective turns a batch into ``(loss_sum, n_tokens)``; the training loop divides by
the token count of the whole accumulation window (see ``tuneforge.train.numerics``), so
every trained token weighs the same whatever the batch or accumulation split.
"""

from __future__ import annotations

from typing import ClassVar

from tuneforge.config import Strict


class Objective:
    name: ClassVar[str]
    options: ClassVar[type[Strict]]

    def loss(self, model, batch: dict, opts, *, hidden_path: bool):
        raise NotImplementedError


OBJECTIVES: dict[str, Objective] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective '{cls.name}' is already registered")
    OBJECTIVES[cls.name] = cls()
    return cls


from tuneforge.objectives import sft as _sft  # noqa: E402,F401  (registers the built-in objectives)
