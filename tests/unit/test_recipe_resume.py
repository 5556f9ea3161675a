"""--resume for the recipes with a loop of their own: the pair and head recipes (common.fit)
end an interrupted run with the same weights as an uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import validate_config
from tuneforge.train import common
from tuneforge.train.run import load_run_config, train

PAIRS = {"train": ["builtin:orders_preference?n=100&seed=3"], "max_length": 200, "val_size": 0.1, "test_size": 0.2}


def _fail_in_step(monkeypatch, step: int, error: BaseException) -> None:
    """Raise ``error`` when fit moves the micro-batch of ``step`` to the device (grad_accum 1)."""
    real, calls = common.to_device, {"n": 0}

    def to_device(batch, device):
        calls["n"] += 1
        if calls["n"] == step:
            raise error
        return real(batch, device)

    monkeypatch.setattr(common, "to_device", to_device)


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
    assert json.loads((cut_dir / "summary.json").read_text())["steps"] == 6


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
    assert [p.name for p in (cut_dir / "checkpoints").iterdir()] == ["step-000004"]  # the start of step 5
    _resume(cut_dir)
    resumed = _adapter(cut_dir)
    assert any("score" in k for k in resumed)  # the reward head is trained, checkpointed and resumed
    _assert_same_weights(ref, resumed)
    assert _steps(cut_dir) == list(range(1, 7))
