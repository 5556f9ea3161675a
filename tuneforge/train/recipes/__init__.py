"""Recipes: how a run of each kind of objective goes, top to bottom (setup -> data -> model ->
train -> save -> evaluate). An objective names its recipe (``Objective.recipe``); this is the
one place that name is resolved.

tokens: sft, cpt, distill (token-sum loss over rendered rows).  pairs: dpo, simpo, orpo.
unpaired: kto (labelled completions).
heads: classify, reward (a sequence head).  online_rl: policy (trl's GRPO/RLOO).
All but online_rl train in THE loop (tuneforge.train.loop).
"""

from __future__ import annotations

from types import ModuleType

from tuneforge.objectives import Objective
from tuneforge.train.recipes import heads, online_rl, pairs, tokens, unpaired

RECIPES: dict[str, ModuleType] = {"tokens": tokens, "pairs": pairs, "unpaired": unpaired, "heads": heads,
                                  "online_rl": online_rl}


def recipe_for(objective: Objective) -> ModuleType:
    """The recipe module; its ``train(cfg, resume, console, on_eval, force, tracker) -> run folder``."""
    return RECIPES[objective.recipe or "tokens"]
