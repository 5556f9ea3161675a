"""Policy optimisation against a trained reward model (the last RLHF stage), through trl's
GRPOTrainer or RLOOTrainer, with a KL penalty to the reference (the policy's starting
point: its adapter disabled). trl 1.16 has no PPOTrainer; GRPO and RLOO need no value
model, which also halves the memory on small machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from tuneforge.config import Strict
from tuneforge.objectives.base import ONE_TASK_RECIPE_REFUSES, Objective, register_objective


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
    recipe = "online_rl"
    # trl's GRPO/RLOO loop runs the training, so what tuneforge's own loop adds is not there.
    refuses = ONE_TASK_RECIPE_REFUSES | {
        "privacy": "trl's GRPO/RLOO loop has no DP-SGD",
        "early_stopping": "trl's GRPO/RLOO loop has no validation loss to stop on; it stops on the reward "
                          "hacking alarms instead (objective.max_kl, objective.min_length_ratio)",
        "init_from": "trl builds the policy and its reference from the adapter it is handed; starting from "
                     "an earlier run's adapter is not wired into the online-RL recipe",
    }

    def check(self, opts) -> list[str]:
        # Here, not in PolicyOptions: `tuneforge rlhf` validates the policy config before its
        # reward stage has written the reward run.
        problem = reward_run_problem(Path(opts.reward_run))
        return [f"objective.reward_run: {problem}"] if problem else []


def reward_run_problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a finished reward-model run, or None. Reads its files only
    (config.yaml, head/config.json, summary.json), so it is cheap enough for preflight."""
    train_one = "train one with objective: {name: reward}"
    if not run_dir.is_dir():
        return f"{run_dir} does not exist; give the folder of a reward run ({train_one})"
    if not (run_dir / "config.yaml").is_file():
        return f"{run_dir} has no config.yaml: not a tuneforge run folder ({train_one})"
    try:
        objective = yaml.safe_load((run_dir / "config.yaml").read_text())["objective"]["name"]
    except (yaml.YAMLError, TypeError, KeyError) as e:
        return f"{run_dir}/config.yaml names no objective ({type(e).__name__}: {e}): not a tuneforge run config"
    head = run_dir / "head" / "config.json"
    if objective == "classify":
        n = f" with {len(json.loads(head.read_text())['id2label'])} labels" if head.is_file() else ""
        return f"{run_dir} is a classify run{n}; a reward model has 1 score: {train_one}"
    if objective != "reward":
        return f"{run_dir} is a '{objective}' run, not a reward model: {train_one}"
    if not head.is_file() or not (run_dir / "summary.json").is_file():
        return (f"{run_dir} is an unfinished reward run (no head/config.json or summary.json): "
                f"finish it with tuneforge train --resume {run_dir}")
    return None
