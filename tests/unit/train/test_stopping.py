"""Early stopping keeps the best adapter; the NaN guard rolls back once with a lower LR, then stops."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.plugins import validate_config
from tuneforge.objectives import OBJECTIVES
from tuneforge.train.recipes import tokens as tokens_recipe
from tuneforge.train.callbacks import EarlyStopping, NanGuard, TrainingDiverged
from tuneforge.train.run import train


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_counts_evaluations_without_improvement():
    s = EarlyStopping(patience=2, min_delta=0.1)
    assert s.update(1, 3.0) and not s.should_stop
    assert not s.update(2, 2.95)  # better, but by less than min_delta
    assert s.update(3, 2.5) and s.bad == 0
    assert not s.update(4, 2.6) and not s.should_stop
    assert not s.update(5, 2.7) and s.should_stop
    assert (s.best, s.best_step) == (2.5, 3)
    again = EarlyStopping.replay(2, 0.1, [(1, 3.0), (2, 2.95), (3, 2.5), (4, 2.6), (5, 2.7)])
    assert (again.best_step, again.bad, again.should_stop) == (3, 2, True)
    assert not EarlyStopping(patience=None).should_stop


def test_run_stops_after_patience_and_the_adapter_is_the_best_step(tiny_raw_cfg, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2])
    monkeypatch.setattr(tokens_recipe, "validation_loss", lambda *a, **k: next(scripted))
    raw = tiny_raw_cfg | {"eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 10, "eval_every": 1, "save_every": 1, "keep_checkpoints": 20,
                                   "early_stopping_patience": 2}
    run_dir = train(validate_config(raw))
    m = _metrics(run_dir)
    assert [r["step"] for r in m if r["kind"] == "train"] == [1, 2, 3, 4]  # stopped 2 evals after the best
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_step"], summary["stopped_early"]) == (2, True)
    best = load_file(str(run_dir / "checkpoints/step-000002/trainable.safetensors"))
    last = load_file(str(run_dir / "checkpoints/step-000004/trainable.safetensors"))
    adapter = load_file(str(run_dir / "adapter/adapter_model.safetensors"))
    assert len(adapter) == len(best)
    for name, w in best.items():
        key = name.replace(".default", "")
        assert torch.equal(adapter[key], w), key
    assert any(not torch.equal(best[n], last[n]) for n in best)  # the last weights really differ


def test_nan_guard_rolls_back_once_then_stops_with_a_clear_message():
    g = NanGuard(lr_factor=0.5)
    assert not g.check(1.0, 1)
    assert g.check(math.nan, 2)
    assert not g.check(0.9, 3)
    with pytest.raises(TrainingDiverged, match="again after rolling back"):
        g.check(math.inf, 4)


def _poison(monkeypatch, bad_calls):
    """Make the SFT loss NaN on the given training micro-batch calls (1-based)."""
    sft = type(OBJECTIVES["sft"])
    real = sft.loss
    calls = {"n": 0}

    def loss(self, model, batch, opts, *, hidden_path):
        out, n = real(self, model, batch, opts, hidden_path=hidden_path)
        if model.training:
            calls["n"] += 1
            if bad_calls(calls["n"]):
                out = out * float("nan")
        return out, n

    monkeypatch.setattr(sft, "loss", loss)


def test_nan_loss_rolls_back_to_the_last_checkpoint_with_a_lower_lr(tiny_raw_cfg, monkeypatch):
    raw = tiny_raw_cfg | {"eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 6, "save_every": 2, "eval_every": 0, "scheduler": "constant"}
    ref = _metrics(train(validate_config(raw | {"run_name": "ref"})))
    _poison(monkeypatch, lambda n: n == 5)  # step 5's batch (one micro-batch per step)
    run_dir = train(validate_config(raw | {"run_name": "nan"}))
    m = _metrics(run_dir)
    rollback = [r for r in m if r["kind"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 4 and rollback[0]["bad_step"] == 5
    steps = [r for r in m if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # step 5 redone from the step-4 checkpoint
    lr_ref = {r["step"]: r["lr"] for r in ref if r["kind"] == "train"}
    lr = {r["step"]: r["lr"] for r in steps}
    assert lr[4] == lr_ref[4] and lr[5] == pytest.approx(0.5 * lr_ref[5]) and lr[6] == pytest.approx(0.5 * lr_ref[6])
    assert all(math.isfinite(r["loss"]) for r in steps)


def test_nan_again_after_the_rollback_stops_the_run(tiny_raw_cfg, monkeypatch):
    raw = tiny_raw_cfg | {"eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 6, "save_every": 2, "eval_every": 0}
    _poison(monkeypatch, lambda n: n >= 3)
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        train(validate_config(raw))
    m = _metrics(tokens_recipe.Path(raw["output_dir"]) / raw["run_name"])
    assert [r["kind"] for r in m] == ["train", "train", "rollback"]
