"""Reward model: a scalar head on the LM, trained with the Bradley-Terry pairwise loss.

P(chosen > rejected) = σ(r_c - r_r); the loss is its negative log-likelihood. The recipe
is the sequence-head one (tuneforge.train.recipes.heads), shared with classification.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.objectives.base import ONE_TASK_RECIPE_REFUSES, Objective, register_objective


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    """Mean of -log σ(r_c - r_r) over pairs, plus ``center_coef * mean((r_c + r_r)²)``, which
    keeps rewards centred on zero (the loss alone only fixes their differences)."""
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen answer scores strictly higher (ties count as wrong)."""
    return float((r_chosen > r_rejected).float().mean())


class RewardOptions(Strict):
    name: Literal["reward"] = "reward"
    center_coef: float = Field(0.0, ge=0, description="pull rewards towards zero mean (trl's center_rewards_coefficient)")


@register_objective
class Reward(Objective):
    name = "reward"
    options = RewardOptions
    data_kind = "preference"
    recipe = "heads"
    refuses = ONE_TASK_RECIPE_REFUSES | {
        "privacy": "DP-SGD is wired to the token loss (per-example scaling of a token sum); the head recipe "
                   "takes no per-example gradients",
    }
