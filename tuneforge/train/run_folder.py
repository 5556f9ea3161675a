"""Writing a run folder, for every recipe: the checks before it is made (preflight), its name,
its first files (config.yaml, environment.json, data_report.json) and its last (loss.png,
summary.json). Reading one back is tuneforge.runs's job.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console

from tuneforge.config import ConfigError, RunConfig, to_yaml
from tuneforge.data.lengths import length_histogram
from tuneforge.data.prepare import Splits, build_splits
from tuneforge.evaluate.plots import plot_losses
from tuneforge.hardware import environment, peak_memory, pick_device, pick_dtype
from tuneforge.io import OutputRefused, atomic_write_text, check_output, disk_full, is_disk_full, write_json
from tuneforge.models.load import meta_module_names
from tuneforge.plugins import method_of, objective_of
from tuneforge.train.moe_stats import moe_preflight
from tuneforge.train.multitask import Task, task_configs
from tuneforge.train.tracking import missing_trackers


def preflight(cfg: RunConfig) -> None:
    """Checks that need the model's config (not its weights): all problems at once."""
    problems = []
    try:
        names = meta_module_names(cfg.model.name, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - reported as a config problem, with the loader's message
        raise ConfigError([f"model.name: {e}"]) from None
    problems += method_of(cfg).check(cfg.method, names)
    if getattr(cfg.method, "moe", None) is not None or any(n.endswith(".experts") for n in names):
        problems += moe_preflight(cfg)
    problems += objective_of(cfg).check(cfg.objective)
    tasks = [t for t, _ in task_configs(cfg)]
    for spec in [s for t in tasks for s in (*t.train, *t.validation, *t.test)]:
        if not spec.startswith("builtin:") and not Path(spec).exists():
            problems.append(f"data: '{spec}' does not exist (working directory: {Path.cwd()})")
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        problems.append(f"train.init_from: {cfg.train.init_from} does not exist")
    problems += missing_trackers(cfg)
    if cfg.privacy is not None:
        if cfg.continual.ewc_lambda:
            problems.append("privacy with continual.ewc_lambda: DP-SGD replaces the gradient with its noisy "
                            "clipped per-example sum, so the EWC gradient would be dropped; use replay instead")
        if cfg.data.packing:
            problems.append("privacy with data.packing: DP bounds each sequence's gradient, and a packed "
                            "sequence holds several examples; set data.packing=false")
    if problems:
        raise ConfigError(problems)


CLAIM = ".tuneforge-run"  # a folder made for a run before its first file (improve puts its data there)


def claim_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` (new or empty) and mark it as tuneforge's: ``new_run_dir`` then trains
    in it although it already holds files (the caller's own, written before the run starts)."""
    check_output(run_dir, claimed, what="run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CLAIM).write_text("made by tuneforge for a run\n")


def claimed(run_dir: Path) -> bool:
    return (run_dir / CLAIM).is_file()


def new_run_dir(cfg: RunConfig, create: bool = True) -> Path:
    name = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.name}"
    run_dir = Path(cfg.output_dir) / name
    if create:
        if (run_dir / "config.yaml").exists():
            raise FileExistsError(f"{run_dir} already holds a run; pick another run_name or resume it with --resume")
        if run_dir.is_dir() and any(run_dir.iterdir()) and not claimed(run_dir):
            raise OutputRefused(f"{run_dir} holds files tuneforge did not write (it is no run folder: no "
                                f"config.yaml); pick another run_name or output_dir. Nothing was changed")
        writable(run_dir)
    return run_dir


def writable(run_dir: Path) -> None:
    """Make ``run_dir`` and prove a file can be written there, or say what to change (before
    minutes of loading and training, not at the first checkpoint)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(run_dir, 1) from None
        fix = "set output_dir to a writable folder (e.g. add output_dir=$HOME/runs to the command)"
        raise ConfigError([f"output_dir: cannot write the run folder {run_dir} ({e.strerror or e}); {fix}"]) from None


# --- one-task recipes (pairs, heads, online RL) ---------------------------------------------


@dataclass
class RunStart:
    cfg: RunConfig
    run_dir: Path
    device: str
    dtype: torch.dtype
    splits: Splits
    resume: bool = False  # continue run_dir from its latest checkpoint
    t_start: float = field(default_factory=time.perf_counter)


def start_run(cfg: RunConfig, resume: Path | None, console: Console) -> RunStart:
    """Validate, make the run folder (or reuse ``resume``'s), record config and environment,
    load and split the data (one task: plugins.py refuses data.tasks for these recipes)."""
    preflight(cfg)
    run_dir = resume or new_run_dir(cfg)
    if resume:
        writable(run_dir)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    write_json(run_dir / "environment.json", environment(device, dtype))
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    console.print(f"[bold]run[/] {run_dir}  objective={cfg.objective.name} device={device} "
                  f"dtype={str(dtype).replace('torch.', '')}")
    splits = build_splits(cfg.data, cfg.train.seed, objective_of(cfg).data_kind)
    write_json(run_dir / "data_report.json", {
        "manifest_sha256": splits.manifest_hash(),
        "rows": {k: len(getattr(splits, k)) for k in ("train", "validation", "test")},
        "load": {k: v.as_dict() for k, v in splits.reports.items()}})
    for k, r in splits.reports.items():
        console.print(f"data {k}: {r.read} rows read, {r.kept} kept; format {r.format} ({r.format_reason})")
        for reason, n in r.dropped.items():
            console.print(f"  [yellow]dropped {n}[/] ({reason}), e.g. {r.examples[reason][0]}")
    console.print(f"splits: train {len(splits.train)}, validation {len(splits.validation)}, test {len(splits.test)}")
    return RunStart(cfg, run_dir, device, dtype, splits, resume=resume is not None)


def finish(run: RunStart, summary: dict, console: Console) -> Path:
    plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
    summary = {"objective": run.cfg.objective.name, **summary, **peak_memory(run.device),
               "data_manifest_sha256": run.splits.manifest_hash(),
               "total_seconds": round(time.perf_counter() - run.t_start, 1)}
    if run.cfg.parent_run:
        summary["parent_run"] = run.cfg.parent_run
    write_json(run.run_dir / "summary.json", summary)
    console.print(f"[bold green]done[/] in {summary['total_seconds']:.0f}s: {run.run_dir}")
    return run.run_dir


# --- the token recipe's tasks (one or several, earlier ones of a continual run) -------------


def data_report(splits, enc: dict) -> dict:
    return {"manifest_sha256": splits.manifest_hash(), "prepared": splits.prepared,
            "rows": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
            "load": {k: v.as_dict() for k, v in splits.reports.items()},
            # data.pii on raw files (a prepared folder's own PII stage is in its manifest)
            "pii": splits.pii if splits.prepared is None else {"prepared": "see the folder's manifest.json"},
            "render": {k: {"kept": len(e.rows), "dropped": dict(e.dropped), "truncated": e.truncated,
                           "examples": e.examples,
                           # token lengths as trained (truncated rows at max_length): the dashboard's histogram
                           "lengths": length_histogram([len(r["input_ids"]) for r in e.rows])}
                       for k, e in enc.items()}}


def report_tasks(run_dir: Path, tasks: list[Task], mixture: dict, console: Console) -> None:
    """data_report.json: one task's report as before; several tasks' under "tasks", with the mixture."""
    if len(tasks) == 1:
        report = data_report(tasks[0].splits, tasks[0].enc)
    else:
        report = {"tasks": {t.name: data_report(t.splits, t.enc) | {"earlier": t.earlier} for t in tasks},
                  "mixture": mixture}
    write_json(run_dir / "data_report.json", report)
    for task in tasks:
        name = f"[{task.name}] " if len(tasks) > 1 else ""
        for k, r in task.splits.reports.items():
            console.print(f"{name}data {k}: {r.read} rows read, {r.kept} kept; format {r.format} ({r.format_reason})")
            stage = task.splits.pii.get(k)
            if stage and stage["info"].get("found"):
                found = ", ".join(f"{n} {t}" for t, n in stage["info"]["found"].items())
                did = (f"{sum(stage['dropped'].values())} rows dropped" if stage["dropped"]
                       else f"{stage['changed'].get('rows redacted', 0)} rows redacted")
                console.print(f"{name}data {k}: personal data found ({found}): {did} (data.pii={stage['info']['action']})")
            for reason, n in r.dropped.items():
                console.print(f"  [yellow]dropped {n}[/] ({reason}), e.g. {r.examples[reason][0]}")
        for k, e in task.enc.items():
            for reason, n in e.dropped.items():
                console.print(f"  [yellow]{k}: dropped {n}[/] ({reason}), e.g. {e.examples[0]}")
            if e.truncated:
                console.print(f"  [yellow]{k}: truncated {e.truncated}[/] rows to max_length, e.g. {e.examples[0]}")
        console.print(f"{name}splits: train {len(task.enc['train'].rows)}, validation "
                      f"{len(task.enc['validation'].rows)}, test {len(task.splits.test)}"
                      + (" (earlier task)" if task.earlier else ""))
    if len(tasks) > 1:
        console.print("mixture: " + ", ".join(f"{n} {v['rows']} rows ({100 * v['share']:.0f}%)"
                                              for n, v in mixture["tasks"].items()))


def manifest_hash(tasks: list[Task]) -> str:
    if len(tasks) == 1:
        return tasks[0].splits.manifest_hash()
    return hashlib.sha256("".join(f"{t.name}:{t.splits.manifest_hash()}" for t in tasks).encode()).hexdigest()
