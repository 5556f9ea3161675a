"""Experiment tracking (``train.report_to``): a run's config, its per-step metrics (every row
of metrics.jsonl: loss, lr, tokens/s, validation loss), its held-out eval results and its
adapter, sent to TensorBoard, MLflow and Weights & Biases through each library's own writer.

The loop hands every metrics.jsonl row to ``Tracking.log`` as it writes it; ``train.run``
opens the trackers' runs when the run folder exists and closes them after the recipe saved
and evaluated. Where each one writes (docs/tracking.md):

    tensorboard  RUN/tensorboard/ (torch.utils.tensorboard's SummaryWriter)
    mlflow       MLFLOW_TRACKING_URI when set, else a SQLite store in RUN/mlflow.db with
                 artefacts in RUN/mlflow-artifacts/
    wandb        online with an API key (WANDB_API_KEY or `wandb login`), else offline in
                 RUN/wandb/ (upload later with `wandb sync`); WANDB_MODE decides when set
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from tuneforge.config import RunConfig, to_yaml

# The library each tracker needs, and the pinned install (pyproject.toml's `tracking` extra).
PIP = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "mlflow": ("mlflow", "mlflow-skinny==3.17.2"),
       "wandb": ("wandb", "wandb==0.31.0")}


def missing_trackers(cfg: RunConfig) -> list[str]:
    """Config problems: a tracker asked for whose library is not installed (never skipped)."""
    return [f"train.report_to: {name} is not installed; pip install '{PIP[name][1]}' (or every tracker: "
            f"pip install 'tuneforge[tracking]')" for name in cfg.train.report_to
            if importlib.util.find_spec(PIP[name][0]) is None]


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4} (lists and None kept as they are)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        else:
            out[key] = v
    return out


def numbers(d: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of ``d`` as ``prefix/a/b`` (bools and text are not metrics)."""
    return {f"{prefix}/{k.replace('.', '/')}": float(v) for k, v in flatten(d).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def row_metrics(row: dict) -> dict[str, float]:
    """A metrics.jsonl row as tracker metrics: ``train/loss``, ``train/lr``, ``train/tokens_per_s``,
    ``eval/val_loss``, ...; rows of other kinds (a NaN rollback) are not metrics."""
    if row.get("kind") not in ("train", "eval"):
        return {}
    return numbers({k: v for k, v in row.items() if k not in ("kind", "step", "epoch")}, row["kind"])


def results(run_dir: Path) -> dict[str, float]:
    """What a finished run measured: held-out test scores (eval*.json: ``test/tuned/accuracy``,
    ``test/base/...``; per task with several) and the summary's figures (``run/train_seconds``)."""
    out: dict[str, float] = {}
    for path in sorted(run_dir.glob("eval*.json")):
        tag = path.stem.removeprefix("eval").lstrip("-")
        scores = numbers(json.loads(path.read_text()), "test" + (f"/{tag}" if tag else ""))
        out |= {k.replace("/scores/", "/"): v for k, v in scores.items()}  # test/tuned/accuracy
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        out |= numbers({k: v for k, v in summary.items() if k != "eval"}, "run")
    return out


class TensorBoard:
    """Scalars and the config as text; TensorBoard keeps no files, so the adapter's path is text."""

    def __init__(self, cfg: RunConfig, run_dir: Path, name: str):
        from torch.utils.tensorboard import SummaryWriter  # deferred: only runs that report to it

        self.where = run_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.where))
        self.writer.add_text("config", "```yaml\n" + to_yaml(cfg) + "```")
        self.step = 0

    def metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.step = max(self.step, step)

    def results(self, values: dict[str, float]) -> None:
        self.metrics(values, self.step)  # at the last step: the run's end

    def artifact(self, adapter: Path) -> None:
        self.writer.add_text("adapter", str(adapter.resolve()), self.step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run through MlflowClient (no global active run: a notebook's own MLflow use
    is left alone): params = the flattened config, metrics, the adapter as artefacts."""

    def __init__(self, cfg: RunConfig, run_dir: Path, name: str):
        from mlflow.entities import Param  # deferred: only runs that report to it
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        # MLflow 3 refuses its plain-folder store unless MLFLOW_ALLOW_FILE_STORE is set: its
        # SQLite store is the supported local one (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`).
        self.where = uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.where)
        t = cfg.train.tracking
        exp = self.client.get_experiment_by_name(t.project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            t.project, artifact_location=None if uri else (run_dir / "mlflow-artifacts").resolve().as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=name, tags={tag: "true" for tag in t.tags}
                                             | {"tuneforge.run_dir": str(run_dir.resolve())}).info.run_id
        # MLflow caps a param value at 6000 characters (a long data.train list)
        params = [Param(k, json.dumps(v)[:6000] if not isinstance(v, str) else v[:6000])
                  for k, v in flatten(cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i: i + 100])
        self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")
        self.step = 0

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        self.step = max(self.step, step)

    def results(self, values: dict[str, float]) -> None:
        self.metrics(values, self.step)

    def artifact(self, adapter: Path) -> None:
        self.client.log_artifacts(self.run_id, str(adapter), "adapter")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def wandb_mode() -> str | None:
    """None (WANDB_MODE decides), "online" with an API key, else "offline": a run on a machine
    that never logged in (or has no network) still records everything, to sync later."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:  # `wandb login` stores the key in ~/.netrc
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class Wandb:
    """One W&B run: the config, metrics by step, results in the run summary, the adapter as a
    model Artifact."""

    def __init__(self, cfg: RunConfig, run_dir: Path, name: str):
        import wandb  # deferred: only runs that report to it

        t = cfg.train.tracking
        # create_new: a sweep's trials or a notebook's earlier run do not end (or join) this one;
        # console off: wandb would copy every redraw of the progress bar into output.log.
        self.run = wandb.init(project=t.project, name=name, entity=t.entity, tags=t.tags or None,
                              config=cfg.model_dump(mode="json"), dir=str(run_dir), mode=wandb_mode(),
                              reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        self.where = f"{self.run.settings.mode} run {self.run.id}" + (
            f" in {self.run.dir}" if self.run.settings.mode == "offline" else f": {self.run.url}")
        self.run_name = name

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def results(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def artifact(self, adapter: Path) -> None:
        import wandb

        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"adapter-{self.run_name}"), type="model")
        art.add_dir(str(adapter))
        self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


class Tracking:
    """The trackers of one run. ``start`` when the run folder exists (on the main process
    only), ``log`` every metrics.jsonl row, ``finish`` once the recipe has saved and evaluated."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.backends: list = []

    def start(self, run_dir: Path, console: Console | None = None) -> None:
        if self.backends or not self.cfg.train.report_to:
            return
        console = console or Console()
        name = self.cfg.train.tracking.name or run_dir.name
        for tracker in self.cfg.train.report_to:
            self.backends.append(BACKENDS[tracker](self.cfg, run_dir, name))
            console.print(f"tracking: {tracker} -> {self.backends[-1].where}")

    def log(self, row: dict) -> None:
        values = row_metrics(row)
        if values:
            for b in self.backends:
                b.metrics(values, row["step"])

    def finish(self, run_dir: Path, ok: bool = True) -> None:
        """Eval results and the adapter (a run that finished), then close every tracker's run."""
        try:
            if ok and self.backends:
                values = results(run_dir)
                for b in self.backends:
                    b.results(values)
                    if (run_dir / "adapter").is_dir():
                        b.artifact(run_dir / "adapter")
        except BaseException:
            ok = False
            raise
        finally:
            for b in self.backends:
                b.close(ok)
            self.backends = []
