"""`tuneforge rlhf` on the tiny Llama: SFT -> reward model -> GRPO, each a run folder
linked to the one it builds on, with KL, reward and answer length logged per step."""

import json

import pytest
import yaml

from tuneforge.config import ConfigError
from tuneforge.train.rlhf import run_chain, stage_configs


def _chain_cfg(tiny_model_dir, tmp_path):
    return {"model": {"name": tiny_model_dir}, "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"lr": 5e-3, "max_steps": 2, "batch_size": 4, "dtype": "fp32", "eval_every": 0,
                      "save_every": 0},
            "eval": {"metric": "none", "limit": 2},
            "data": {"train": ["builtin:orders_preference?n=40&seed=2"], "max_length": 200},
            "output_dir": str(tmp_path / "runs"), "run_name": "chain",
            "stages": {"sft": {"data": {"train": ["builtin:orders?n=40&seed=2"]}},
                       # bf16 like the embedded model: the base in bf16, LoRA in fp32, and trl
                       # generating outside its own autocast (a dtype clash it once hit).
                       "policy": {"objective": {"max_completion_length": 8, "num_generations": 2},
                                  "train": {"batch_size": 2, "dtype": "bf16", "lr": 5e-2}}}}


def test_stage_configs_link_the_stages_and_report_all_problems(tiny_model_dir, tmp_path):
    cfgs = stage_configs(_chain_cfg(tiny_model_dir, tmp_path))
    root = tmp_path / "runs" / "chain"
    assert cfgs["reward"].model.name == cfgs["policy"].model.name == str(root / "sft" / "merged")
    assert cfgs["policy"].objective.reward_run == str(root / "reward")
    assert cfgs["policy"].parent_run == cfgs["reward"].parent_run == str(root / "sft")
    bad = _chain_cfg(tiny_model_dir, tmp_path)
    bad["stages"]["policy"]["objective"]["algorithm"] = "ppo"
    bad["stages"]["reward"] = {"train": {"lr": -1}}
    with pytest.raises(ConfigError) as e:
        stage_configs(bad)
    assert len(e.value.problems) == 2 and "stage reward" in str(e.value) and "stage policy" in str(e.value)


def test_rlhf_chain_runs_end_to_end(tiny_model_dir, tmp_path):
    path = tmp_path / "rlhf.yaml"
    path.write_text(yaml.safe_dump(_chain_cfg(tiny_model_dir, tmp_path)))
    root = run_chain(path)
    chain = json.loads((root / "chain.json").read_text())
    assert list(chain["stages"]) == ["sft", "reward", "policy"]
    assert (root / "sft/merged/config.json").exists()
    policy = json.loads((root / "policy/summary.json").read_text())
    assert policy["parent_run"] == str(root / "sft") and policy["reward_run"] == str(root / "reward")
    assert policy["steps"] == 2 and {"base", "tuned"} <= set(policy["eval"])
    rows = [json.loads(x) for x in (root / "policy/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"kl", "reward", "completions/mean_length"} <= set(r) for r in rows)
    # Step 1 trains (warm-up counted as round(0.03 x 2) = 0 steps, as in tuneforge's loops) and
    # step 2 samples from the updated bf16 policy: autocast's cached step-1 weight casts once
    # kept the policy equal to the reference, with KL exactly 0 at every step.
    assert rows[0]["learning_rate"] == 5e-2 and rows[1]["kl"] > 0
    assert (root / "policy/adapter/adapter_model.safetensors").exists()
    assert not (root / "policy/adapter/ref").exists()  # trl's frozen reference adapter is not shipped
