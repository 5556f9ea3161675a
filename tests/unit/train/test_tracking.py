"""train.report_to: a tiny run reported to TensorBoard, MLflow and W&B (offline), each read
back with the library's own reader; trackers asked for but not installed are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tuneforge.config import ConfigError
from tuneforge.plugins import validate_config
from tuneforge.train import tracking

@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No W&B key and no ~/.netrc (so offline), MLflow's plain-folder store by URI."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    (tmp_path / "home").mkdir()


def test_a_run_reports_config_steps_results_and_adapter_to_every_tracker(tiny_raw_cfg, tmp_path, offline_env,
                                                                           monkeypatch):
    for library in ("tensorboard", "mlflow", "wandb"):  # pip install 'tuneforge[tracking]' (scripts/setup.sh)
        pytest.importorskip(library)
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tuneforge.train.run import train

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 gates its file store behind this
    raw = tiny_raw_cfg | {"train": tiny_raw_cfg["train"] | {"max_steps": 2, "eval_every": 1, "save_every": 0,
                                                           "report_to": ["tensorboard", "mlflow", "wandb"],
                                                           "tracking": {"project": "tf-test", "tags": ["tiny"]}},
                          "eval": tiny_raw_cfg["eval"] | {"limit": 2, "max_new_tokens": 4}}
    run_dir = train(validate_config(raw))

    # TensorBoard: its own event reader
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert {"train/lr", "train/tokens_per_s", "eval/val_loss", "run/train_seconds"} <= set(scalars)
    assert {"test/tuned/json_exact", "test/base/json_exact"} <= set(scalars), scalars  # the held-out eval
    assert "config/text_summary" in acc.Tags()["tensors"]

    # MLflow: read back from its file store
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tf-test").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny" and run.data.tags["tiny"] == "true"
    assert run.data.params["train.lr"] == "0.005" and run.data.params["method.r"] == "4"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]
    logged = [m.value for m in losses]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    written = [r["loss"] for r in rows if r["kind"] == "train"]
    assert logged == pytest.approx(written)  # the numbers of metrics.jsonl, not others
    assert {"test/tuned/json_exact", "test/base/json_valid"} <= set(run.data.metrics), run.data.metrics
    files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # W&B: an offline run (no key, no network) holding the logged keys and the adapter artefact
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    assert b"train/loss" in data and b"eval/val_loss" in data and b"adapter-tiny" in data


class FakeBackend:
    def __init__(self, cfg, run_dir, name):
        self.where, self.seen = str(run_dir), []
        FakeBackend.last = self

    def metrics(self, values, step):
        self.seen.append(("metrics", step, values))

    def results(self, values):
        self.seen.append(("results", values))

    def artifact(self, adapter):
        self.seen.append(("artifact", adapter.name))

    def close(self, ok):
        self.seen.append(("close", ok))


def fake_recipe(fail: bool):
    def train(cfg, resume, console, on_eval, force, tracker):
        run_dir = Path(cfg.output_dir) / "r"
        (run_dir / "adapter").mkdir(parents=True)
        tracker.start(run_dir, console)
        tracker.log({"kind": "train", "step": 1, "loss": 2.0})
        if fail:
            raise KeyboardInterrupt
        (run_dir / "eval.json").write_text('{"tuned": {"accuracy": 0.5}}')
        return run_dir

    return type("Recipe", (), {"train": staticmethod(train)})


@pytest.mark.parametrize("fail", [False, True])
def test_the_trackers_run_ends_finished_with_results_or_failed_without(tiny_raw_cfg, monkeypatch, fail):
    from tuneforge.train import run

    monkeypatch.setitem(tracking.BACKENDS, "mlflow", FakeBackend)
    monkeypatch.setattr(run, "recipe_for", lambda objective: fake_recipe(fail))
    cfg = validate_config(tiny_raw_cfg | {"train": {"report_to": ["mlflow"]}})
    if fail:
        with pytest.raises(KeyboardInterrupt):
            run.train(cfg)
        assert FakeBackend.last.seen == [("metrics", 1, {"train/loss": 2.0}), ("close", False)]
    else:
        run.train(cfg)
        assert FakeBackend.last.seen == [("metrics", 1, {"train/loss": 2.0}),
                                         ("results", {"test/tuned/accuracy": 0.5}), ("artifact", "adapter"),
                                         ("close", True)]


def test_a_tracker_whose_library_is_missing_is_refused_with_the_pip_command(tiny_raw_cfg, monkeypatch):
    from tuneforge.train.run_folder import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    cfg = validate_config(tiny_raw_cfg | {"train": {"report_to": ["tensorboard", "wandb"]}})
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert "train.report_to: wandb is not installed; pip install 'wandb==" in str(e.value)
    assert "tensorboard" not in str(e.value).split("wandb is not installed")[0]


@pytest.mark.parametrize("train, problem", [
    ({"report_to": ["mlflow", "mlflow"]}, "name each tracker once"),
    ({"report_to": ["neptune"]}, "report_to.0"),
    ({"tracking": {"project": "p"}}, "train.tracking.project is set but no tracker"),
    ({"report_to": ["mlflow"], "tracking": {"entity": "team"}}, "train.tracking.entity is a W&B setting"),
])
def test_tracking_settings_nothing_would_use_are_refused(tiny_raw_cfg, train, problem):
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        validate_config(tiny_raw_cfg | {"train": train})


def test_wandb_goes_offline_without_a_key_and_follows_wandb_mode(tmp_path, offline_env, monkeypatch):
    assert tracking.wandb_mode() == "offline"
    netrc = Path(tmp_path / "home" / ".netrc")
    netrc.write_text("machine api.wandb.ai login user password k3y\n")
    netrc.chmod(0o600)  # what `wandb login` writes (netrc refuses a password file others can read)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() is None  # wandb reads WANDB_MODE itself


def test_rows_become_metrics_by_kind_and_results_by_file(tmp_path):
    assert tracking.row_metrics({"kind": "train", "step": 3, "epoch": 0, "loss": 1.5, "lr": 1e-4,
                                 "tokens_per_s": 900.0}) == {"train/loss": 1.5, "train/lr": 1e-4,
                                                             "train/tokens_per_s": 900.0}
    assert tracking.row_metrics({"kind": "rollback", "step": 3, "loss": "nan"}) == {}
    (tmp_path / "eval.json").write_text('{"tuned": {"scores": {"json_valid": 0.5}, "n": 4}}')
    (tmp_path / "summary.json").write_text('{"train_seconds": 2.0, "eval": {"x": 1}, "stopped_early": false}')
    assert tracking.results(tmp_path) == {"test/tuned/json_valid": 0.5, "test/tuned/n": 4.0,
                                          "run/train_seconds": 2.0}
