"""Policy optimisation against a trained reward model (the last RLHF stage), through trl's
GRPOTrainer or RLOOTrainer, with a KL penalty to the reference (the policy's starting
point: its adapter disabled). trl 1.16 has no PPOTrainer; GRPO and RLOO need no value
model, which also halves the memory on small machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge.config import Strict
from tuneforge.objectives import Objective, register_objective


class PolicyOptions(Strict):
    name: Literal["policy"] = "policy"
    algorithm: Literal["grpo", "rloo"] = "grpo"
    reward_run: str = Field(..., description="run folder of a reward-model run (objective: reward)")
    beta: float = Field(0.05, gt=0, description="KL penalty to the reference model")
    num_generations: int = Field(4, ge=2, description="sampled answers per prompt (the group)")
    max_completion_length: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_kl: float = Field(5.0, gt=0, description="stop when the mean KL to the reference exceeds this")
    min_length_ratio: float = Field(
        0.25, gt=0, lt=1,
        description="stop when the mean answer length falls below this share of the first step's (collapse)")


@register_objective
class Policy(Objective):
    name = "policy"
    options = PolicyOptions
    data_kind = "preference"  # prompts come from preference rows (chosen/rejected unused)
    recipe = "tuneforge.train.policy"

    def check(self, opts) -> list[str]:
        # Here, not in PolicyOptions: `tuneforge rlhf` validates the policy config before its
        # reward stage has written the reward run.
        from tuneforge.train.heads import reward_run_problem

        problem = reward_run_problem(Path(opts.reward_run))
        return [f"objective.reward_run: {problem}"] if problem else []
