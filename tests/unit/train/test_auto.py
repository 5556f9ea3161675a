"""``auto``: settings decided from the data, each with its reason (train/auto.py), in the run
folder and in the fine-tuning job object."""

import json

import pytest
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from tuneforge.config import ConfigError, expand_auto
from tuneforge.data.lengths import token_lengths
from tuneforge.plugins import validate_config
from tuneforge.train import auto
from tuneforge.train.recipes import tokens as tokens_recipe
from tuneforge.train.run import train

LABELS = ("positive", "negative", "neutral")


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def label_rows(n):
    return [chat(f"Sentiment of review {i}: the order arrived " + "late " * (i % 7), LABELS[i % 3]) for i in range(n)]


def free_rows(n):
    return [chat(f"Describe order {i}", f"Order {i} holds {i % 5} coffee mugs for Lisbon, shipped today.")
            for i in range(n)]


def write(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_small_file_gets_more_epochs_than_a_large_one():
    small, why_small = auto.choose_epochs(n_rows=40, batch=4, tokens_per_epoch=4_000, classification=False)
    large, why_large = auto.choose_epochs(n_rows=40_000, batch=8, tokens_per_epoch=4_000_000, classification=False)
    usual, _ = auto.choose_epochs(n_rows=1_000, batch=8, tokens_per_epoch=100_000, classification=False)
    assert small > usual > large >= 1
    assert "small file" in why_small and "large file" in why_large
    # a classification-shaped task takes no more passes than free text of the same size...
    assert auto.choose_epochs(1_000, 8, 100_000, classification=True)[0] <= usual
    # a token budget cuts the passes of long rows
    assert auto.choose_epochs(1_000, 8, auto.TOKEN_BUDGET, classification=False)[0] == 1


def test_a_classification_task_is_validated_within_each_pass_so_it_can_stop_early():
    # ...and is validated several times a pass: its labels are often learnt in the first one
    patience, every, why = auto.choose_early_stopping(135, True, steps_per_pass=45, classification=True)
    free_patience, free_every, _ = auto.choose_early_stopping(135, True, steps_per_pass=45, classification=False)
    assert patience == free_patience == auto.PATIENCE
    assert every == 12 and free_every == 17 and "a pass of 45 steps" in why
    assert auto.choose_early_stopping(135, False, 45, True)[0] is None  # no validation rows: never stops


def test_lr_and_lora_rank_follow_the_model_size_and_method():
    small_lr, _ = auto.choose_lr("lora", 135_000_000, None)
    big_lr, _ = auto.choose_lr("lora", 7_000_000_000, None)
    assert small_lr > big_lr and auto.choose_lr("full", 135_000_000, None)[0] < big_lr
    assert auto.choose_lr("prompt", 135_000_000, 3e-2)[0] == 3e-2  # a method's own default stands
    assert auto.choose_lora(135_000_000)[0] < auto.choose_lora(7_000_000_000)[0]


def test_max_length_covers_the_longest_row_or_counts_what_it_leaves_out():
    value, why, over = auto.choose_max_length([30, 41, 97, 60], model_max=512)
    assert value >= 97 and value % 8 == 0 and over == 0 and "97" in why
    value, why, over = auto.choose_max_length([30, 700, 900], model_max=512)
    assert (value, over) == (512, 2) and "dropped and counted" in why


def test_classification_shaped_rows_are_recognised_and_free_text_is_not():
    shape = auto.task_shape(label_rows(60))
    assert shape.classification and shape.labels == {"positive": 20, "negative": 20, "neutral": 20}
    assert "3 distinct answers" in shape.reason
    free = auto.task_shape(free_rows(60))
    assert not free.classification and "free-text" in free.reason
    # short answers that never repeat are no label set either
    assert not auto.task_shape([chat(f"q{i}", f"answer{i}") for i in range(60)]).classification


def test_auto_all_leaves_what_the_user_set_and_single_keys_can_say_auto():
    raw = expand_auto({"data": {"train": ["x"]}, "train": {"lr": 1e-4, "epochs": "auto"}, "auto": "all"})
    assert "lr" not in raw["auto"] and "epochs" in raw["auto"] and "epochs" not in raw["train"]
    assert expand_auto({"data": {"train": ["x"]}, "train": {"batch_size": "auto"}})["auto"] == ["batch_size"]
    with pytest.raises(ConfigError, match="sets it too"):
        expand_auto({"data": {"train": ["x"]}, "train": {"epochs": 3}, "auto": ["epochs"]})
    with pytest.raises(ConfigError, match="unknown"):
        validate_config({"data": {"train": ["x"]}, "auto": ["epoch"]})


def test_an_auto_run_decides_from_the_data_writes_its_reasons_and_early_stopping_keeps_the_best(
        tiny_raw_cfg, tiny_tok, tmp_path, monkeypatch):
    rows = label_rows(80)
    raw = tiny_raw_cfg | {"data": {"train": [write(tmp_path, rows)], "val_size": 0.1, "test_size": 0.1},
                          "method": {"name": "lora"}, "eval": {"metric": "none"}, "auto": "all"}
    raw["train"] = {"max_steps": 8, "dtype": "fp32", "seed": 7, "save_every": 0}
    # a planted validation loss: best at the 2nd evaluation, rising after it
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0])
    monkeypatch.setattr(tokens_recipe, "validation_loss", lambda *a, **k: next(scripted))
    run_dir = train(validate_config(raw))

    decided = {d["key"]: d for d in json.loads((run_dir / "auto.json").read_text())["decisions"]}
    cfg = validate_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert cfg.auto == []  # config.yaml holds the values; a resume decides nothing again
    assert decided["task"]["value"] == "classification"
    longest = int(token_lengths(tiny_tok, rows).max())
    assert cfg.data.max_length >= longest and f"longest row ({longest} tokens" in decided["data.max_length"]["reason"]
    assert cfg.method.r == decided["method.r"]["value"] == 16 and cfg.method.alpha == 32
    assert cfg.train.lr == decided["train.lr"]["value"] and cfg.train.eval_every == 1  # 8 steps: every step
    # the config set eval.metric, so auto: all left the eval's settings (task_shape) alone
    assert "eval.max_new_tokens" not in decided and cfg.eval.metric == "none"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_step"], summary["stopped_early"], summary["steps"]) == (2, True, 4)
    best = load_file(str(run_dir / "checkpoints" / "best.safetensors"))
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all((adapter[n.replace(".default", "")] == w).all() for n, w in best.items())


def test_a_job_leaves_unset_hyperparameters_to_auto_and_shows_what_it_decided(tmp_path, tiny_model_dir):
    from tuneforge.deploy.config import ServeConfig
    from tuneforge.deploy.server import create_app
    from tuneforge.registry.store import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    serve = ServeConfig.model_validate({"jobs": {"home": str(tmp_path / "home"), "base_models": {"tiny": tiny_model_dir}}})

    class NoEngine:
        async def close(self):
            pass

    c = TestClient(create_app(serve, reg, NoEngine()))  # no `with`: the worker does not start
    rows = "".join(json.dumps(r) + "\n" for r in label_rows(40)).encode()
    fid = c.post("/v1/files", files={"file": ("t.jsonl", rows)}, data={"purpose": "fine-tune"}).json()["id"]
    job = c.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": fid,
                                               "hyperparameters": {"batch_size": 2}}).json()
    assert job["hyperparameters"] == {"n_epochs": "auto", "batch_size": 2, "learning_rate_multiplier": "auto"}
    assert job["auto"] is None  # not decided until the run reads its data

    from tuneforge.production.api.job_queue import JobDB
    from tuneforge.registry.tables import JobRow

    row = JobDB(f"sqlite:///{tmp_path / 'reg.db'}").run(lambda s: s.get(JobRow, job["id"]))
    assert "batch_size" not in row.run_config["auto"] and {"epochs", "lr", "max_length"} <= set(row.run_config["auto"])
    cfg = validate_config(row.run_config)  # what the worker's `tuneforge train` decides
    new, decisions, shape = auto.resolve(cfg, cfg.auto)
    assert new.train.batch_size == 2 and shape.classification
    tmp_run = tmp_path / "home" / "jobs" / job["id"] / "run"
    tmp_run.mkdir(parents=True)
    auto.write(tmp_run, decisions, shape)

    shown = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert shown["hyperparameters"]["n_epochs"] == new.train.epochs
    assert shown["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(new.train.lr / cfg.train.lr)
    reasons = {d["key"]: d["reason"] for d in shown["auto"]}
    assert "classification" in reasons["task"] or "distinct answers" in reasons["task"]
    assert "longest row" in reasons["data.max_length"] and "passes" in reasons["train.epochs"]


def test_eval_metric_auto_is_a_metric_not_the_task_shape_knob():
    from tuneforge.config import expand_auto

    raw = expand_auto({"data": {"train": ["x.jsonl"]}, "eval": {"metric": "auto", "max_new_tokens": 4}, "auto": []})
    assert "auto" not in raw and raw["eval"] == {"metric": "auto", "max_new_tokens": 4}
