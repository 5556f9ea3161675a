"""--resume for the recipes beside the token one: the pair and head recipes (THE loop,
train/loop.py) end an interrupted run with the same weights as an uninterrupted one; the policy recipe
continues trl's run from its checkpoint step; a reward_run that is not a finished reward
model is a config problem found before any weights load."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import ConfigError, to_yaml

from tuneforge.plugins import validate_config
from tuneforge.train import loop
from tuneforge.train.recipes import online_rl
from tuneforge.train.run import train
from tuneforge.train.run_folder import preflight
from tuneforge.runs import load_run_config

PAIRS = {"train": ["builtin:orders_preference?n=100&seed=3"], "max_length": 200, "val_size": 0.1, "test_size": 0.2}


def _fail_in_step(monkeypatch, step: int, error: BaseException) -> None:
    """Raise ``error`` when the loop moves the micro-batch of ``step`` to the device (grad_accum 1)."""
    real, calls = loop.to_device, {"n": 0}

    def to_device(batch, device):
        calls["n"] += 1
        if calls["n"] == step:
            raise error
        return real(batch, device)

    monkeypatch.setattr(loop, "to_device", to_device)


def _resume(run_dir: Path) -> Path:
    return train(load_run_config(run_dir), resume=run_dir)


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter/adapter_model.safetensors"))


def _steps(run_dir: Path, kind: str = "train") -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def _assert_same_weights(ref: dict, resumed: dict) -> None:
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k


def test_killed_dpo_run_resumes_to_the_same_weights(tiny_raw_cfg, monkeypatch):
    # 6 steps, checkpoint and validation every 3, LoRA dropout 0.1 (so the RNG matters).
    raw = tiny_raw_cfg | {"objective": {"name": "dpo", "beta": 0.1}, "data": PAIRS, "eval": {"batch_size": 10}}
    ref = _adapter(train(validate_config(raw | {"run_name": "ref"})))

    _fail_in_step(monkeypatch, 5, RuntimeError("killed"))  # step 4 is logged, the checkpoint is step 3's
    with pytest.raises(RuntimeError, match="killed"):
        train(validate_config(raw | {"run_name": "cut"}))
    monkeypatch.undo()
    cut_dir = Path(tiny_raw_cfg["output_dir"]) / "cut"
    assert _steps(cut_dir) == [1, 2, 3, 4]
    _resume(cut_dir)
    assert sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    _assert_same_weights(ref, _adapter(cut_dir))
    assert _steps(cut_dir) == list(range(1, 7)) and _steps(cut_dir, "eval") == [3, 6]  # step 4 not logged twice
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    _resume(cut_dir)  # a finished run: nothing is trained again, the last validation is kept
    assert _steps(cut_dir) == list(range(1, 7)) and _steps(cut_dir, "eval") == [3, 6]
    assert json.loads((cut_dir / "summary.json").read_text())["validation"] == summary["validation"] != {}
    _assert_same_weights(ref, _adapter(cut_dir))


def test_interrupted_reward_run_resumes_to_the_same_weights_and_head(tiny_raw_cfg, monkeypatch):
    raw = tiny_raw_cfg | {"objective": {"name": "reward"}, "data": PAIRS}
    raw["train"] = raw["train"] | {"save_every": 0}  # no periodic checkpoint: Ctrl-C writes the one resumed from
    ref = _adapter(train(validate_config(raw | {"run_name": "ref"})))

    _fail_in_step(monkeypatch, 5, KeyboardInterrupt())
    with pytest.raises(SystemExit) as e:
        train(validate_config(raw | {"run_name": "cut"}))
    assert e.value.code == 130
    monkeypatch.undo()
    cut_dir = Path(tiny_raw_cfg["output_dir"]) / "cut"
    # step 0 (the NaN guard's state to roll back to) and the start of step 5, written on Ctrl-C
    assert sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == ["step-000000", "step-000004"]
    _resume(cut_dir)
    resumed = _adapter(cut_dir)
    assert any("score" in k for k in resumed)  # the reward head is trained, checkpointed and resumed
    _assert_same_weights(ref, resumed)
    assert _steps(cut_dir) == list(range(1, 7))


def _reward_run(raw: dict) -> Path:
    raw = raw | {"objective": {"name": "reward"}, "data": PAIRS, "run_name": "rm"}
    raw["train"] = raw["train"] | {"max_steps": 2, "eval_every": 0, "save_every": 0}
    return train(validate_config(raw))


def _policy_raw(raw: dict, reward_run: Path | str) -> dict:
    raw = raw | {"objective": {"name": "policy", "reward_run": str(reward_run), "num_generations": 2,
                               "max_completion_length": 8},
                 "data": PAIRS | {"train": ["builtin:orders_preference?n=40&seed=2"]}, "run_name": "pol",
                 "eval": {"metric": "none", "limit": 2}}
    raw["method"] = raw["method"] | {"dropout": 0.0}
    raw["train"] = raw["train"] | {"max_steps": 4, "batch_size": 2, "save_every": 2, "eval_every": 0}
    return raw


def test_interrupted_policy_run_continues_from_trls_checkpoint(tiny_raw_cfg, monkeypatch):
    raw = _policy_raw(tiny_raw_cfg, _reward_run(tiny_raw_cfg))
    ref = _adapter(train(validate_config(raw | {"run_name": "ref"})))
    real = online_rl.hacking_alarm

    def killed_in_step_3(row, *args):  # called after step 3's row is logged, before anything else
        if row["step"] == 3:
            raise RuntimeError("killed")
        return real(row, *args)

    monkeypatch.setattr(online_rl, "hacking_alarm", killed_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train(validate_config(raw))
    monkeypatch.undo()
    run_dir = Path(raw["output_dir"]) / "pol"
    assert _steps(run_dir) == [1, 2, 3]
    assert [p.name for p in (run_dir / "trl").glob("checkpoint-*")] == ["checkpoint-2"]
    _resume(run_dir)
    # Continued from step 2: a restart from scratch would log steps 1 and 2 again.
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    _assert_same_weights(ref, _adapter(run_dir))  # trl restores sampling RNG and data order too
    state = json.loads((run_dir / "trl/checkpoint-4/trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (run_dir / "adapter/adapter_model.safetensors").exists() and not (run_dir / "adapter/ref").exists()


def _fake_run(path: Path, raw: dict) -> Path:
    """A run folder's config.yaml, as a finished or interrupted run leaves it (no weights)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(validate_config(raw)))
    return path


def test_a_reward_run_that_is_not_a_reward_model_is_a_config_problem(tiny_raw_cfg, tmp_path):
    sft = _fake_run(tmp_path / "sft", tiny_raw_cfg)
    classify = _fake_run(tmp_path / "cls", tiny_raw_cfg | {"objective": {"name": "classify"}})
    (classify / "head").mkdir()
    (classify / "head/config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    unfinished = _fake_run(tmp_path / "rm", tiny_raw_cfg | {"objective": {"name": "reward"}})
    (tmp_path / "random").mkdir()
    cases = {tmp_path / "missing": "does not exist",
             tmp_path / "random": "has no config.yaml: not a tuneforge run folder",
             sft: "is a 'sft' run, not a reward model: train one with objective: {name: reward}",
             classify: "is a classify run with 3 labels; a reward model has 1 score",
             unfinished: f"is an unfinished reward run (no head/config.json or summary.json): finish it with "
                         f"tuneforge train --resume {unfinished}"}
    for path, message in cases.items():
        cfg = validate_config(_policy_raw(tiny_raw_cfg, path))
        with pytest.raises(ConfigError) as e:
            preflight(cfg)
        assert len(e.value.problems) == 1
        assert e.value.problems[0].startswith(f"objective.reward_run: {path} {message}")
    with pytest.raises(ConfigError):  # the policy run stops before its run folder or any weights
        train(validate_config(_policy_raw(tiny_raw_cfg, sft)))
    assert not (Path(tiny_raw_cfg["output_dir"]) / "pol").exists()
