"""Objectives: what the loss is. A plug point like methods (``objective: {name: ...}``).

An objective turns a batch into ``(loss_sum, n_tokens)``; the training loop divides by
the token count of the whole accumulation window (see ``tuneforge.train.numerics``), so
every trained token weighs the same whatever the batch or accumulation split.

Objectives whose training is not "token loss over rendered rows" (preference pairs, a
classification head, online RL through trl) name a ``recipe`` module instead: its
``train(cfg, resume, console)`` runs the whole run and returns the run folder.
"""

from __future__ import annotations

from typing import ClassVar

from tuneforge.config import Strict


class Objective:
    name: ClassVar[str]
    options: ClassVar[type[Strict]]
    # The kind of canonical row trained on (``tuneforge.data.formats.Format.kind``).
    data_kind: ClassVar[str] = "sft"
    # Dotted module path of a recipe with its own loop; None: the token-loss recipe in train/run.py.
    recipe: ClassVar[str | None] = None

    def loss(self, model, batch: dict, opts, *, hidden_path: bool):
        raise NotImplementedError

    def check(self, opts) -> list[str]:
        """Problems with the options that only the file system shows (a run folder they name),
        found by preflight before any weights load; the option types are checked earlier."""
        return []

    def encode(self, tok, rows: list[dict], data_cfg):
        """Rows -> token ids and labels for the token-loss loop (chat rendering by default)."""
        from tuneforge.data.render import encode_rows

        return encode_rows(tok, rows, data_cfg.max_length, data_cfg.overlength, data_cfg.system_prompt)

    # An objective-specific held-out evaluation ``(model, tok, test_rows, cfg, method, device,
    # dtype, run_dir, console) -> dict``; None: generate answers and score them (SFT).
    evaluate = None


OBJECTIVES: dict[str, Objective] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective '{cls.name}' is already registered")
    OBJECTIVES[cls.name] = cls()
    return cls


# Registers the built-in objectives.
from tuneforge.objectives import sft as _sft  # noqa: E402,F401
from tuneforge.objectives import cpt as _cpt  # noqa: E402,F401
from tuneforge.objectives import distill as _distill  # noqa: E402,F401
from tuneforge.objectives import preference as _preference  # noqa: E402,F401
from tuneforge.objectives import reward as _reward  # noqa: E402,F401
from tuneforge.objectives import classify as _classify  # noqa: E402,F401
from tuneforge.objectives import policy as _policy  # noqa: E402,F401
