"""Objectives: what the loss is. A plug point like methods (``objective: {name: ...}``).

A token objective turns a batch into ``(loss_sum, n_tokens)``; the token recipe divides by
the token count of the whole accumulation window (see ``tuneforge.train.recipes.tokens``), so
every trained token weighs the same whatever the batch or accumulation split.

Objectives whose training is not "token loss over rendered rows" name their ``recipe`` by a
short name (``pairs``, ``unpaired``, ``heads``, ``online_rl``; tuneforge.train.recipes resolves it). Every
objective declares the run settings its recipe cannot honour (``refuses``), so a config asking
for one is refused when it is validated (tuneforge.plugins), with the reason.
"""

from tuneforge.objectives.base import ONE_TASK_RECIPE_REFUSES, OBJECTIVES, Objective, register_objective

# Registers the built-in objectives.
from tuneforge.objectives import sft as _sft  # noqa: E402,F401
from tuneforge.objectives import cpt as _cpt  # noqa: E402,F401
from tuneforge.objectives import distill as _distill  # noqa: E402,F401
from tuneforge.objectives import preference as _preference  # noqa: E402,F401
from tuneforge.objectives import kto as _kto  # noqa: E402,F401
from tuneforge.objectives import reward as _reward  # noqa: E402,F401
from tuneforge.objectives import classify as _classify  # noqa: E402,F401
from tuneforge.objectives import policy as _policy  # noqa: E402,F401

__all__ = ["ONE_TASK_RECIPE_REFUSES", "OBJECTIVES", "Objective", "register_objective"]
