"""Optuna sweep: every trial a run folder, validation losses reported per eval, best config written."""

import json

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
    assert all(sorted(t.intermediate_values) == [2, 4] for t in study.trials)  # reported per eval (pruning input)


def test_space_errors_are_reported_together(tmp_path):
    (tmp_path / "s.yaml").write_text("train.lr: {low: 1.0, high: 0.1}\nmethod.r: {choices: [4], lo: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_space(tmp_path / "s.yaml")
    assert len(e.value.problems) == 2 and "did you mean 'method.r.low'" in str(e.value)
