"""KTO (Ethayarajh et al., 2024) on unpaired rows: one completion per prompt with a label,
desirable (True) or undesirable (False), as TRL's ``KTOTrainer`` trains it. Never SFT: an
undesirable completion is pushed down, not imitated.

Rows come as the canonical "unpaired" kind (tuneforge.data.formats): LLaMA-Factory's
``kto_tag`` rows, TRL's prompt/completion/label rows, or preference pairs split in two by the
loader (chosen -> desirable, rejected -> undesirable). The unpaired recipe
(tuneforge.train.recipes.unpaired) computes the log-probs; the reference model is the policy
with its adapter disabled.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.objectives.base import ONE_TASK_RECIPE_REFUSES, Objective, register_objective


def kl_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: an estimate of KL(π ‖ π_ref) from *mismatched* pairs of the
    batch (completion i scored after prompt i+1 mod B, as TRL does), policy minus reference
    summed log-probs, averaged, clamped at 0 and detached (no gradient flows through z).
        z = max(0, mean_i [log π(y_i | x_{i+1}) - log π_ref(y_i | x_{i+1})])"""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_unpaired_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
                      kl: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO loss and implicit reward on summed completion log-probs (each [B]).

        r = log π(y|x) - log π_ref(y|x)                 (the row's log-ratio)
        z = max(0, kl), detached                        (the reference point, kl_reference_point)
        desirable   (label True):  w_d (1 - σ(β (r - z)))
        undesirable (label False): w_u (1 - σ(β (z - r)))

    Returns ``(loss [B], reward [B] = β r, detached)``; the batch loss is the mean (TRL's).
    A batch with one label only is fine: the other case simply does not occur in it.
    """
    z = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).clamp(min=0).detach()
    r = policy_logps - ref_logps
    labels = labels.bool()
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    return torch.where(labels, desirable, undesirable), beta * r.detach()


def kto_weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                      undesirable_weight: float) -> str | None:
    """TRL's rule for imbalanced classes: desirable_weight * n_desirable /
    (undesirable_weight * n_undesirable) should lie in [1, 4/3]. Returns what to change
    (a recommendation: the run goes on), or None when the weights follow the rule."""
    if not n_desirable or not n_undesirable:
        which = "desirable" if n_desirable else "undesirable"
        return (f"every training row is {which}: KTO then only pushes those rows "
                f"{'above' if n_desirable else 'below'} the reference point")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    low = undesirable_weight * n_undesirable / n_desirable
    return (f"desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = {desirable_weight:g}*"
            f"{n_desirable} / ({undesirable_weight:g}*{n_undesirable}) = {ratio:.3g}, outside [1, 4/3] "
            f"(TRL's rule for KTO); set objective.desirable_weight in [{low:.3g}, {4 / 3 * low:.3g}]")


class KtoOptions(Strict):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, description="strength of the KL tie to the reference model")
    desirable_weight: float = Field(1.0, gt=0, description="weight of a desirable row's loss; with imbalanced "
                                    "classes keep desirable_weight*n_desirable / (undesirable_weight*"
                                    "n_undesirable) in [1, 4/3] (TRL's rule; the run warns otherwise)")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of an undesirable row's loss")


@register_objective
class KTO(Objective):
    name = "kto"
    options = KtoOptions
    data_kind = "unpaired"
    recipe = "unpaired"
    refuses = ONE_TASK_RECIPE_REFUSES | {
        "privacy": "this recipe has no DP-SGD: its loop does not clip per-row gradients, and each row's loss "
                   "depends on the batch's other rows through the reference point z",
    }
