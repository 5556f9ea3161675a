"""Prompt-learning methods learn with their defaults: their own learning rate when the config
sets none (never over a user's), prompt tuning started from the task's text, and on the tiny
Llama the loss of a memorisable 4-row task really falls."""

import json

import pytest

from tuneforge.methods import METHODS
from tuneforge.methods.prompt import task_text
from tuneforge.plugins import lr_note, validate_config

ROWS = [{"instruction": "Extract the order as JSON.", "input": text, "output": out} for text, out in [
    ("2 mugs to Oslo please", '{"product": "mug", "quantity": 2, "city": "Oslo"}'),
    ("one candle, Lima", '{"product": "candle", "quantity": 1, "city": "Lima"}'),
    ("send 3 lamps to Rome", '{"product": "lamp", "quantity": 3, "city": "Rome"}'),
    ("a book for Cairo", '{"product": "book", "quantity": 1, "city": "Cairo"}'),
]]


def _cfg(method: dict, train: dict | None = None):
    return validate_config({"data": {"train": ["builtin:orders"]}, "method": method, "train": train or {}})


@pytest.mark.parametrize("name", ["prompt", "ptuning", "prefix"])
def test_a_methods_default_lr_applies_only_when_the_config_sets_none(name):
    cfg = _cfg({"name": name})
    assert cfg.train.lr == METHODS[name].default_lr > 1e-3
    assert "default" in lr_note(cfg)
    assert _cfg({"name": name}, {"lr": 5e-4}).train.lr == 5e-4  # the user's value, even far from the default
    assert "leave train.lr out" in lr_note(_cfg({"name": name}, {"lr": 5e-4}))
    assert _cfg({"name": "lora"}).train.lr == 2e-4 and lr_note(_cfg({"name": "lora"})) is None


def test_prompt_tuning_starts_from_the_tasks_text():
    rows = [{"messages": [{"role": "user", "content": "Extract the order: 2 mugs"},
                          {"role": "assistant", "content": "{}"}]}]
    assert task_text(rows, "You process orders.") == "You process orders.\nExtract the order: 2 mugs"
    method, opts = METHODS["prompt"], _cfg({"name": "prompt"}).method
    assert method.for_task(opts, rows, None).init_text == "Extract the order: 2 mugs"
    given = _cfg({"name": "prompt", "init_text": "orders"}).method
    assert method.for_task(given, rows, None).init_text == "orders"  # the user's text wins
    assert method.for_task(_cfg({"name": "prompt", "init": "random"}).method, rows, None).init_text is None


@pytest.fixture(scope="module")
def steerable_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with weights drawn at std 0.5: at the usual 0.02 its tied 32-wide embeddings
    bound every logit below ~0.7, so no input (soft prompt or other) can move its loss off ln(vocab)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.initializer_range = 0.5
    out = tmp_path_factory.mktemp("tiny-llama-steerable")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def test_prompt_tuning_loss_falls_with_its_defaults(tiny_raw_cfg, steerable_dir, tmp_path):
    """4 rows, 24 steps of all 4: with the defaults (lr 3e-2, started from the task's text) the
    training loss falls by more than 1 nat (measured 9.59 -> 7.96; at LoRA's 2e-4: 9.59 -> 9.49)."""
    from tuneforge.train.run import train

    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    raw = {**tiny_raw_cfg, "model": {"name": steerable_dir}, "method": {"name": "prompt", "num_virtual_tokens": 8},
           "data": {"train": [str(data)], "max_length": 96, "val_size": 0.0, "test_size": 0.0},
           "train": {"max_steps": 24, "batch_size": 4, "eval_every": 0, "save_every": 0, "seed": 0,
                     "dtype": "fp32", "warmup_ratio": 0.0, "scheduler": "constant"},
           "eval": {"metric": "none"}}
    cfg = validate_config(raw)
    assert cfg.train.lr == METHODS["prompt"].default_lr
    run = train(cfg)
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "train"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lr"] == cfg.train.lr and "default" in summary["lr_note"]
    assert summary["init_text"].startswith("Extract the order as JSON.")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses
