"""What the dashboard shows of a run, read from its folder (and its job row when the job
queue started it): status, method, data, main metric, curves, figures, log tail.

Two kinds of runs are listed:
  local   a folder under the dashboard's runs directory (`tuneforge ui --runs DIR`): trained
          with `tuneforge train`; id = the folder name
  job     a run the job queue trains (started from the New run form or /v1/fine_tuning/jobs);
          id = the job id (ftjob-...), status from the queue
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tuneforge.production.api.job_queue import metrics_rows
from tuneforge.registry.tables import JobRow

RUNNING_WITHIN_S = 120  # a local run whose metrics.jsonl changed this recently counts as running


@dataclass
class RunRow:
    id: str
    kind: str  # local | job
    run_dir: Path
    status: str  # queued | running | succeeded | failed | cancelled | stopped | finished | new
    created: float
    config: dict = field(default_factory=dict)
    job: JobRow | None = None

    @property
    def method(self) -> str:
        return f"{(self.config.get('method') or {}).get('name', '?')} + " \
               f"{(self.config.get('objective') or {}).get('name', 'sft')}"

    @property
    def data(self) -> str:
        train = (self.config.get("data") or {}).get("train") or []
        names = [Path(str(t)).name if not str(t).startswith("builtin:") else str(t) for t in train]
        return ", ".join(names) or "-"

    @property
    def model(self) -> str:
        return str((self.config.get("model") or {}).get("name", "?"))

    def metric(self) -> tuple[str, float] | None:
        """The main eval score (tuned), else the last validation loss, else the last training loss."""
        scores = read_json(self.run_dir / "eval.json").get("tuned", {}).get("scores", {})
        if scores:
            k = next(iter(scores))
            return k, scores[k]
        rows = metrics_rows(self.run_dir / "metrics.jsonl")
        for kind, key in (("eval", "val_loss"), ("train", "loss")):
            last = [r[key] for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
            if last:
                return key, last[-1]
        return None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def auto_decisions(run_dir: Path) -> list[dict]:
    """What auto decided for the run (its auto.json: setting, value, why); [] without one."""
    return [d for d in read_json(run_dir / "auto.json").get("decisions", []) if isinstance(d, dict)]


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_status(run_dir: Path) -> str:
    if (run_dir / "summary.json").is_file() and (run_dir / "adapter").is_dir():
        return "finished"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and time.time() - metrics.stat().st_mtime < RUNNING_WITHIN_S:
        return "running"
    if (run_dir / "checkpoints").is_dir():
        return "stopped"  # resumable: tuneforge train --resume
    return "new"


def local_runs(runs_dir: Path) -> list[RunRow]:
    if not runs_dir.is_dir():
        return []
    out = []
    for d in runs_dir.iterdir():
        if d.is_dir() and (d / "config.yaml").is_file():
            out.append(RunRow(id=d.name, kind="local", run_dir=d, status=folder_status(d),
                              created=(d / "config.yaml").stat().st_mtime, config=read_yaml(d / "config.yaml")))
    return out


def job_run(j: JobRow) -> RunRow:
    return RunRow(id=j.id, kind="job", run_dir=Path(j.run_dir), status=j.status, created=j.created_at,
                  config=j.run_config or {}, job=j)


def curves(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    rows = metrics_rows(run_dir / "metrics.jsonl")
    return {"train loss": [(r["step"], r["loss"]) for r in rows
                           if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))],
            "validation loss": [(r["step"], r["val_loss"]) for r in rows
                                if r.get("kind") == "eval" and isinstance(r.get("val_loss"), (int, float))]}


def throughput(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    rows = metrics_rows(run_dir / "metrics.jsonl")
    return {"tokens/s": [(r["step"], r["tokens_per_s"]) for r in rows
                         if r.get("kind") == "train" and isinstance(r.get("tokens_per_s"), (int, float))]}


def progress(run: RunRow) -> dict:
    """Step, target steps, throughput and a rough ETA from the metrics rows' file times."""
    rows = [r for r in metrics_rows(run.run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    target = (run.config.get("train") or {}).get("max_steps")
    out = {"step": rows[-1]["step"] if rows else 0, "target": target,
           "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None, "eta_s": None}
    started = run.run_dir / "config.yaml"
    if rows and target and run.status == "running" and started.is_file():
        elapsed = (run.run_dir / "metrics.jsonl").stat().st_mtime - started.stat().st_mtime
        per_step = elapsed / max(out["step"], 1)
        out["eta_s"] = max(0.0, (target - out["step"]) * per_step)
    return out


def log_tail(run: RunRow, n: int = 40) -> str:
    """The trainer's log (job runs: train.log beside the run folder)."""
    for path in (run.run_dir.parent / "train.log", run.run_dir / "train.log"):
        if run.kind == "job" and path.is_file():
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def figures(run_dir: Path) -> dict:
    """summary.json, eval.json (tuned vs base) and data_report.json, as far as they exist."""
    ev = read_json(run_dir / "eval.json")
    tuned = (ev.get("tuned") or {}).get("scores", {})
    base = (ev.get("base") or {}).get("scores", {})
    scores = [{"metric": k, "tuned": v, "base": base.get(k),
               "delta": (v - base[k]) if isinstance(base.get(k), (int, float)) and isinstance(v, (int, float))
               else None} for k, v in tuned.items()]
    return {"summary": read_json(run_dir / "summary.json"), "scores": scores,
            "data": read_json(run_dir / "data_report.json")}
