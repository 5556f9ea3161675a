"""The objective plug point: the base class every objective implements, what the one-task
recipes refuse, and the registry (``OBJECTIVES``, keyed by name). The objectives register
themselves when ``tuneforge.objectives`` imports them."""


from __future__ import annotations

from typing import ClassVar

from tuneforge.config import Strict
from tuneforge.data.render import encode_rows


class Objective:
    name: ClassVar[str]
    options: ClassVar[type[Strict]]
    # The kind of canonical row trained on (``tuneforge.data.formats.Format.kind``).
    data_kind: ClassVar[str] = "sft"
    # The recipe that trains it, by name (tuneforge.train.recipes); None: the token-loss recipe.
    recipe: ClassVar[str | None] = None
    # How the token recipe scores the test split: "generate" (answers scored against the
    # references) or "perplexity" (held-out token loss, for raw text).
    held_out: ClassVar[str] = "generate"
    # Run settings (keys of tuneforge.plugins.SETTINGS) this objective's recipe cannot honour,
    # each with the reason it gives when a config asks for it.
    refuses: ClassVar[dict[str, str]] = {}

    def loss(self, model, batch: dict, opts, *, hidden_path: bool):
        raise NotImplementedError

    def check(self, opts) -> list[str]:
        """Problems with the options that only the file system shows (a run folder they name),
        found by preflight before any weights load; the option types are checked earlier."""
        return []

    def encode(self, tok, rows: list[dict], data_cfg):
        """Rows -> token ids and labels for the token-loss loop (chat rendering by default)."""
        return encode_rows(tok, rows, data_cfg.max_length, data_cfg.overlength, data_cfg.system_prompt)


# What the recipes with a loop over one task of pairs, texts or prompts cannot do; each
# objective adds what is particular to it.
ONE_TASK_RECIPE_REFUSES = {
    "continual": "replay, EWC and earlier-task validation are built on token-loss rows; this recipe trains "
                 "one task (run the earlier tasks with a token objective, or drop continual)",
    "tasks": "this recipe trains one task: give its files in data.train",
    "packing": "each example is scored as a whole sequence; packing would join several into one",
    "fsdp": "this recipe trains on one process, which does not shard; use train.distributed=ddp",
}


OBJECTIVES: dict[str, Objective] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective '{cls.name}' is already registered")
    OBJECTIVES[cls.name] = cls()
    return cls
