"""Sequential fine-tuning: stages that each continue from the previous stage's adapter.

A sequence config is a run config plus ``stages:``, a list of overrides (``name`` plus any
sections: ``data``, ``train``, ...). Stage k runs in ``OUTPUT_DIR/RUN_NAME/NN-name`` with
``train.init_from`` = stage k-1's folder, and lists every earlier stage's task in
``continual.previous``: their validation loss is logged during training and their test
set evaluated after it, so the sequence's table shows what each stage forgot. The base
``continual`` section (replay_share, ewc_lambda) applies from the second stage on.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneforge.config import ConfigError, RunConfig, TaskConfig, deep_merge, parse_overrides, read_yaml
from tuneforge.io import write_json
from tuneforge.plugins import validate_config
from tuneforge.train.run import train


def stage_configs(raw: dict, source: str | None = None) -> list[RunConfig]:
    """Validate every stage's config up front (all problems at once) before any training."""
    raw = dict(raw)
    stages = raw.pop("stages", None)
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) and s.get("name") for s in stages):
        raise ConfigError(["'stages' must be a non-empty list of {name: ..., data: {...}, train: {...}}"], source)
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError([f"stage names must be unique (got {names})"], source)
    root = Path(raw.get("output_dir", "runs")) / (raw.get("run_name") or f"{datetime.now():%Y%m%d-%H%M%S}-sequence")
    continual = raw.pop("continual", {}) or {}
    configs, problems, previous = [], [], []
    for k, stage in enumerate(stages):
        overrides = {key: v for key, v in stage.items() if key != "name"}
        merged = deep_merge(raw, overrides)
        data = dict(merged.get("data") or {})
        if data.get("train"):  # one task per stage, named after the stage
            data["tasks"] = [{"name": stage["name"], "train": data.pop("train"),
                              "validation": data.pop("validation", []), "test": data.pop("test", [])}]
        merged |= {"data": data, "output_dir": str(root), "run_name": f"{k:02d}-{stage['name']}"}
        if k:
            merged["train"] = {**(merged.get("train") or {}), "init_from": str(root / configs[-1].run_name)}
            merged["continual"] = deep_merge(continual, {"previous": previous})
        try:
            cfg = validate_config(merged, f"{source or ''} stage {stage['name']}")
        except ConfigError as e:
            problems += e.problems
            continue
        if configs and cfg.train.seed != configs[0].train.seed:
            problems.append(f"stage {stage['name']}: train.seed differs from the first stage's; earlier tasks' "
                            "test rows are re-derived from the seed, so every stage must use the same one")
        previous = previous + [TaskConfig(**t.model_dump() | {"weight": None, "val_size": cfg.data.val_size,
                                                              "test_size": cfg.data.test_size}).model_dump()
                               for t in cfg.data.tasks]
        configs.append(cfg)
    if problems:
        raise ConfigError(problems, source)
    return configs


def load_sequence(path: str | Path, overrides: list[str] = ()) -> list[RunConfig]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    raw = read_yaml(path)
    return stage_configs(deep_merge(raw, parse_overrides(list(overrides))), str(path))


def main_scores(summary: dict, task_names: list[str]) -> dict[str, float]:
    """{task: the tuned model's main metric} from a stage's summary.json (first metric listed)."""
    ev = summary.get("eval") or {}
    per_task = {task_names[0]: ev} if "tuned" in ev else ev
    return {t: next(iter(r["tuned"].values())) for t, r in per_task.items() if r.get("tuned")}


def forgetting_table(stages: list[dict]) -> dict:
    """{task: {"after": [score after each stage or None], "forgetting": best earlier - final}}."""
    tasks = list(dict.fromkeys(t for s in stages for t in s["scores"]))
    table = {}
    for t in tasks:
        after = [s["scores"].get(t) for s in stages]
        seen = [a for a in after if a is not None]
        table[t] = {"after": after, "forgetting": round(max(seen[:-1]) - seen[-1], 4) if len(seen) > 1 else None}
    return table


def run_sequence(configs: list[RunConfig], console: Console | None = None) -> Path:
    console = console or Console()
    root = Path(configs[0].output_dir)
    stages = []
    for cfg in configs:
        run_dir = root / cfg.run_name
        if (run_dir / "summary.json").exists():
            console.print(f"[dim]stage {cfg.run_name} already done: {run_dir}[/]")
        else:
            console.rule(f"stage {cfg.run_name}")
            train(cfg, console=console)
        summary = json.loads((run_dir / "summary.json").read_text())
        stages.append({"name": cfg.run_name, "run_dir": str(run_dir), "init_from": cfg.train.init_from,
                       "scores": main_scores(summary, [t.name for t in cfg.data.tasks])})
    result = {"stages": stages, "forgetting": forgetting_table(stages)}
    write_json(root / "sequence.json", result)
    print_forgetting(result, console)
    return root


def print_forgetting(result: dict, console: Console) -> None:
    table = Table(title="main metric on each task's test set after each stage")
    table.add_column("task")
    for s in result["stages"]:
        table.add_column(f"after {s['name']}", justify="right")
    table.add_column("forgetting", justify="right")
    for task, row in result["forgetting"].items():
        cells = ["" if a is None else f"{100 * a:.1f}%" for a in row["after"]]
        f = row["forgetting"]
        table.add_row(task, *cells, "" if f is None else f"{100 * f:+.1f} pts")
    console.print(table)
