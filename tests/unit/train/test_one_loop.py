"""THE loop (train/loop.py) gives every objective it trains the same guarantees: early
stopping keeps the best step's adapter for pair and head runs as for token runs, the NaN guard
rolls a pair run back, a pair run starts from train.init_from; and a setting a recipe cannot
honour is refused when the config is validated, with the reason."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import ConfigError
from tuneforge.plugins import validate_config
from tuneforge.train import loop
from tuneforge.train.recipes import pairs
from tuneforge.train.run import train

PAIRS = {"train": ["builtin:orders_preference?n=100&seed=3"], "max_length": 200, "val_size": 0.1, "test_size": 0.2}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_adapter_is_checkpoint(run_dir: Path, step: int, other: int) -> None:
    kept = load_file(str(run_dir / f"checkpoints/step-{step:06d}/trainable.safetensors"))
    later = load_file(str(run_dir / f"checkpoints/step-{other:06d}/trainable.safetensors"))
    adapter = load_file(str(run_dir / "adapter/adapter_model.safetensors"))
    assert len(adapter) == len(kept)
    for name, w in kept.items():  # peft saves without the adapter name (and a trained head without its wrapper)
        assert torch.equal(adapter[name.replace(".modules_to_save", "").replace(".default", "")], w), name
    assert any(not torch.equal(kept[n], later[n]) for n in kept)  # the later weights really differ


def _stop_early(monkeypatch, raw: dict) -> Path:
    """Validation losses scripted so step 2 is the best; patience 2 stops after step 4."""
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(loop.MeanSteps, "validate", lambda self: {"val_loss": next(scripted)})
    raw["train"] = raw["train"] | {"max_steps": 10, "eval_every": 1, "save_every": 1, "keep_checkpoints": 20,
                                   "early_stopping_patience": 2}
    run_dir = train(validate_config(raw))
    assert [r["step"] for r in _metrics(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_step"], summary["best_val_loss"], summary["stopped_early"]) == (2, 2.0, True)
    _assert_adapter_is_checkpoint(run_dir, 2, 4)
    return run_dir


def test_dpo_run_stops_early_and_keeps_the_best_steps_adapter(tiny_raw_cfg, monkeypatch):
    _stop_early(monkeypatch, tiny_raw_cfg | {"objective": {"name": "dpo"}, "data": PAIRS, "eval": {"batch_size": 10}})


def test_classify_run_stops_early_and_keeps_the_best_steps_adapter_and_head(tiny_raw_cfg, tmp_path, monkeypatch):
    rng, labels = random.Random(0), ["coffee mug", "desk lamp", "teapot"]
    rows = [{"message": f"please send {rng.randint(1, 9)} {label} to Oslo", "topic": label}
            for label in (rng.choice(labels) for _ in range(100))]
    (tmp_path / "cls.jsonl").write_text("\n".join(map(json.dumps, rows)))
    raw = tiny_raw_cfg | {"objective": {"name": "classify"}, "eval": {"batch_size": 8}}
    raw["data"] = {"train": [str(tmp_path / "cls.jsonl")], "columns": {"text": "message", "label": "topic"},
                   "max_length": 64, "val_size": 0.1, "test_size": 0.2}
    raw["train"] = raw["train"] | {"lr": 1e-2, "batch_size": 8}
    run_dir = _stop_early(monkeypatch, raw)
    adapter = load_file(str(run_dir / "adapter/adapter_model.safetensors"))
    assert any("score" in k for k in adapter)  # the head kept is the best step's too


def test_nan_loss_in_a_dpo_run_rolls_back_with_a_lower_lr(tiny_raw_cfg, monkeypatch):
    raw = tiny_raw_cfg | {"objective": {"name": "dpo"}, "data": PAIRS, "eval": {"batch_size": 10}}
    raw["train"] = raw["train"] | {"max_steps": 6, "save_every": 2, "eval_every": 0, "scheduler": "constant"}
    ref = _metrics(train(validate_config(raw | {"run_name": "ref"})))
    real, calls = pairs.pair_step, {"n": 0}

    def pair_step(*args):
        loss, metrics = real(*args)
        if torch.is_grad_enabled():  # a training step (evaluations run without gradients)
            calls["n"] += 1
            if calls["n"] == 5:  # step 5's batch (one micro-batch per step)
                loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(pairs, "pair_step", pair_step)
    m = _metrics(train(validate_config(raw | {"run_name": "nan"})))
    rollback = [r for r in m if r["kind"] == "rollback"]
    assert len(rollback) == 1 and (rollback[0]["step"], rollback[0]["bad_step"]) == (4, 5)
    steps = [r for r in m if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # step 5 redone from the step-4 checkpoint
    assert all(math.isfinite(r["loss"]) for r in steps)
    lr_ref = {r["step"]: r["lr"] for r in ref if r["kind"] == "train"}
    lr = {r["step"]: r["lr"] for r in steps}
    assert lr[4] == lr_ref[4] and lr[5] == pytest.approx(0.5 * lr_ref[5])


def test_dpo_run_starts_from_init_from_with_that_adapter_as_its_reference(tiny_raw_cfg):
    raw = tiny_raw_cfg | {"eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 3, "eval_every": 0, "save_every": 0}
    sft = train(validate_config(raw | {"run_name": "sft"}))
    start = load_file(str(sft / "adapter/adapter_model.safetensors"))
    raw = raw | {"objective": {"name": "dpo"}, "data": PAIRS, "eval": {"batch_size": 10}, "run_name": "dpo"}
    run_dir = train(validate_config(raw | {"train": raw["train"] | {"init_from": str(sft)}}))
    step0 = load_file(str(run_dir / "checkpoints/step-000000/trainable.safetensors"))
    assert step0 and all(torch.equal(w, start[k.replace(".default", "")]) for k, w in step0.items())
    after = load_file(str(run_dir / "adapter/adapter_model.safetensors"))
    assert any(not torch.equal(after[k], start[k]) for k in start)  # and trained on from there
    # Before training the policy is its reference (the SFT adapter, not the bare base model):
    # every implicit reward is 0.
    base = json.loads((run_dir / "eval.json").read_text())["base"]
    assert base["reward_margin"] == 0 and base["reward_chosen"] == 0


@pytest.mark.parametrize("objective, setting, reason", [
    ({"name": "policy", "reward_run": "runs/rm"}, {"train": {"early_stopping_patience": 2}}, "no validation loss"),
    ({"name": "policy", "reward_run": "runs/rm"}, {"train": {"init_from": "runs/sft"}}, "not wired"),
    ({"name": "policy", "reward_run": "runs/rm"}, {"privacy": {"noise_multiplier": 1.0}}, "no DP-SGD"),
    ({"name": "dpo"}, {"privacy": {"noise_multiplier": 1.0}}, "clipping per row bounds no pair"),
    ({"name": "reward"}, {"privacy": {"noise_multiplier": 1.0}}, "no per-example gradients"),
    ({"name": "classify"}, {"data": {"tasks": [{"name": "a", "train": ["a.jsonl"]}]}}, "trains one task"),
    ({"name": "kto"}, {"data": {"packing": True}}, "packing would join"),
    ({"name": "simpo"}, {"train": {"distributed": "fsdp"}}, "does not shard"),
])
def test_a_setting_the_recipe_cannot_honour_is_refused_with_the_reason(tiny_raw_cfg, objective, setting, reason):
    raw = tiny_raw_cfg | {"objective": objective}
    if "tasks" in setting.get("data", {}):
        raw["data"] = {k: v for k, v in raw["data"].items() if k != "train"}  # tasks replace data.train
    for section, values in setting.items():
        raw[section] = (raw.get(section) or {}) | values
    with pytest.raises(ConfigError, match=reason) as e:
        validate_config(raw)
    assert f"objective '{objective['name']}'" in str(e.value)


def test_the_token_recipe_takes_those_settings(tiny_raw_cfg):
    raw = tiny_raw_cfg | {"privacy": {"noise_multiplier": 1.0}}
    raw["train"] = raw["train"] | {"early_stopping_patience": 2, "init_from": "runs/sft"}
    validate_config(raw)  # no problem raised
