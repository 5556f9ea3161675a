"""Optuna sweep: every trial a run folder, validation losses reported per eval, best config written."""

import json
from pathlib import Path

import optuna
import pytest
import yaml

from tuneforge.config import ConfigError
from tuneforge.train.sweep import load_space, run_sweep


def test_sweep_runs_trials_and_writes_the_best_config(tiny_raw_cfg, tmp_path):
    raw = tiny_raw_cfg | {"run_name": "sweep", "eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 4, "eval_every": 2, "save_every": 0}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "space.yaml").write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
                                         "method.r: {choices: [2, 4]}\n")
    root = run_sweep(str(tmp_path / "cfg.yaml"), [], load_space(tmp_path / "space.yaml"), trials=2)
    result = json.loads((root / "sweep.json").read_text())
    assert [t["state"] for t in result["trials"]] == ["complete", "complete"]
    for t in result["trials"]:
        cfg = yaml.safe_load((root / f"trial-{t['trial']:03d}" / "config.yaml").read_text())
        assert cfg["train"]["lr"] == pytest.approx(t["params"]["train.lr"]) and cfg["method"]["r"] == t["params"]["method.r"]
        evals = [json.loads(x)["val_loss"] for x in (root / f"trial-{t['trial']:03d}/metrics.jsonl").read_text()
                 .splitlines() if '"eval"' in x]
        assert t["val_loss"] == pytest.approx(min(evals))
    best = min(result["trials"], key=lambda t: t["val_loss"])
    assert result["best"]["trial"] == best["trial"]
    assert (root / "best_config.yaml").read_text() == (root / f"trial-{best['trial']:03d}/config.yaml").read_text()
    assert (root / "sweep.png").stat().st_size > 0
    study = optuna.load_study(study_name="tuneforge", storage=f"sqlite:///{root / 'study.db'}")
    assert all(sorted(t.intermediate_values) == [0, 1] for t in study.trials)  # per validation (pruning input)


def test_space_errors_are_reported_together(tmp_path):
    (tmp_path / "s.yaml").write_text("train.lr: {low: 1.0, high: 0.1}\nmethod.r: {choices: [4], lo: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_space(tmp_path / "s.yaml")
    assert len(e.value.problems) == 2 and "did you mean 'method.r.low'" in str(e.value)


def test_grid_sweep_finds_the_known_best_learning_rate(tiny_raw_cfg, tmp_path):
    """Three learning rates with a known order on this task: 1e-6 barely moves the adapter in
    4 steps, 30 diverges, 5e-3 learns. The grid tries each once and names 5e-3 best.
    bf16 on every CPU: in fp32 (CPUs without bf16 units pick it) lr 30 leaves this tiny model's
    validation loss large but finite, so the trial would not fail."""
    raw = tiny_raw_cfg | {"run_name": "known", "eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 4, "eval_every": 2, "save_every": 0, "dtype": "bf16"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "space.yaml").write_text("train.lr: {choices: [1.0e-6, 5.0e-3, 30.0]}\n")
    root = run_sweep(str(tmp_path / "cfg.yaml"), [], load_space(tmp_path / "space.yaml"), trials=10, sampler="grid")
    result = json.loads((root / "sweep.json").read_text())
    by_lr = {t["params"]["train.lr"]: t for t in result["trials"]}
    assert len(result["trials"]) == 3 and set(by_lr) == {1e-6, 5e-3, 30.0}  # the grid, once each, then stop
    assert by_lr[30.0]["state"] == "fail" and by_lr[1e-6]["val_loss"] > by_lr[5e-3]["val_loss"]
    assert result["best"]["params"]["train.lr"] == 5e-3
    assert yaml.safe_load((root / "best_config.yaml").read_text())["train"]["lr"] == 5e-3


def test_repeated_parameters_are_not_retrained(tiny_raw_cfg, tmp_path):
    raw = tiny_raw_cfg | {"run_name": "twice", "eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 2, "eval_every": 2, "save_every": 0}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "space.yaml").write_text("train.lr: {choices: [5.0e-3]}\n")
    root = run_sweep(str(tmp_path / "cfg.yaml"), [], load_space(tmp_path / "space.yaml"), trials=3)
    trials = json.loads((root / "sweep.json").read_text())["trials"]
    assert [t["duplicate_of"] for t in trials] == [None, 0, 0]
    assert len({t["val_loss"] for t in trials}) == 1
    assert sorted(p.name for p in root.glob("trial-*")) == ["trial-000"]


def test_grid_sampler_needs_choices(tiny_raw_cfg, tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_raw_cfg))
    (tmp_path / "space.yaml").write_text("train.lr: {low: 1.0e-4, high: 1.0e-2}\n")
    with pytest.raises(ConfigError, match="train.lr is a range"):
        run_sweep(str(tmp_path / "cfg.yaml"), [], load_space(tmp_path / "space.yaml"), trials=2, sampler="grid")


def test_sweep_never_writes_into_a_folder_it_did_not_make(tiny_raw_cfg, tmp_path):
    from tuneforge.io import OutputRefused

    raw = tiny_raw_cfg | {"run_name": "sweep"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "space.yaml").write_text("train.lr: {choices: [1.0e-3, 1.0e-2]}\n")
    root = tmp_path / "runs" / "sweep"
    root.mkdir(parents=True)
    (root / "sweep.json").write_text("my own notes")
    with pytest.raises(OutputRefused, match="holds files tuneforge did not write"):
        run_sweep(str(tmp_path / "cfg.yaml"), [], load_space(tmp_path / "space.yaml"), trials=1)
    assert [p.name for p in root.iterdir()] == ["sweep.json"] and (root / "sweep.json").read_text() == "my own notes"


def test_a_trial_is_pruned_at_its_second_validation_not_its_first(tiny_raw_cfg, tmp_path, monkeypatch):
    """The docs' promise: no pruning before a trial's second validation, whatever step it falls on.
    Training is replaced by fixed validation curves (eval at steps 2, 4, 6) so the pruner is the subject."""
    import tuneforge.train.sweep as sweep

    curves = {"a": [1.0, 0.9, 0.8], "b": [1.0, 0.9, 0.8], "c": [5.0, 5.0, 5.0]}  # c is worse from the start
    seen = {}

    def fake_train(cfg, console=None, on_eval=None):
        name = "abc"[int(cfg.run_name.split("-")[1])]
        (Path(cfg.output_dir) / cfg.run_name).mkdir(parents=True)
        (Path(cfg.output_dir) / cfg.run_name / "config.yaml").write_text("{}")  # summarize copies the best one
        for i, loss in enumerate(curves[name]):
            seen.setdefault(name, []).append(i)
            on_eval(2 * (i + 1), loss)

    monkeypatch.setattr(sweep, "train", fake_train)
    raw = tiny_raw_cfg | {"run_name": "prune"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "space.yaml").write_text("train.lr: {choices: [1.0e-3, 2.0e-3, 3.0e-3]}\n")
    root = run_sweep(str(tmp_path / "cfg.yaml"), [], load_space(tmp_path / "space.yaml"), trials=3, sampler="grid")
    states = [t["state"] for t in json.loads((root / "sweep.json").read_text())["trials"]]
    assert states == ["complete", "complete", "pruned"]
    assert seen["c"] == [0, 1]  # validated twice: kept after the first validation, pruned at the second
