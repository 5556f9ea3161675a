"""Hyper-parameter search with Optuna: TPE sampling, median pruning on the validation loss.

``tuneforge sweep CONFIG --space SPACE.yaml --trials N [--sampler tpe|random|grid]``. The space maps config keys to
ranges or choices::

    train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
    method.r: {choices: [4, 8, 16]}
    train.warmup_ratio: {low: 0.0, high: 0.1}

Every trial is an ordinary run folder (``OUTPUT_DIR/RUN_NAME/trial-NNN``) whose validation
losses are reported to Optuna as they are computed, so a poor trial stops early. The study
lives in ``study.db`` (SQLite) next to them: rerunning the command adds trials to it.
Written at the end: ``sweep.json`` (every trial), ``sweep.png`` and ``best_config.yaml``.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator
from rich.console import Console
from rich.table import Table

from tuneforge.config import ConfigError, Strict, format_errors, read_yaml
from tuneforge.io import check_output, write_json
from tuneforge.plugins import load_config
from tuneforge.train.callbacks import TrainingDiverged
from tuneforge.train.run import train


class Dimension(Strict):
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self):
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high, or choices")
        if self.choices is None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high))


def load_space(path: str | Path) -> dict[str, Dimension]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"search space {path} does not exist"])
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError([f"{path}: map config keys to ranges, e.g. train.lr: {{low: 1.0e-4, high: 1.0e-3, log: true}}"])
    space, problems = {}, []
    for key, spec in raw.items():
        try:
            space[key] = Dimension.model_validate(spec)
        except ValidationError as e:
            problems += format_errors(e, Dimension, prefix=(key,))
    if problems:
        raise ConfigError(problems, str(path))
    return space


def suggest(trial, space: dict[str, Dimension]) -> list[str]:
    """The trial's choices as ``key=value`` overrides."""
    out = []
    for key, d in space.items():
        if d.choices is not None:
            value = trial.suggest_categorical(key, d.choices)
        elif d.is_int:
            value = trial.suggest_int(key, int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
        else:
            value = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
        out.append(f"{key}={json.dumps(value)}")  # JSON is YAML: the override parser reads it back
    return out


def make_sampler(name: str, space: dict[str, Dimension], seed: int):
    import optuna  # deferred: loaded only by sweeps

    if name == "grid":
        ranges = [k for k, d in space.items() if d.choices is None]
        if ranges:
            raise ConfigError([f"--sampler grid needs choices for every key; {', '.join(ranges)} "
                               f"{'is a range' if len(ranges) == 1 else 'are ranges'} (use tpe or random)"])
        return optuna.samplers.GridSampler({k: d.choices for k, d in space.items()}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def earlier_twin(study, params: dict):
    """A finished trial with exactly these parameters. Samplers propose a point again once a
    discrete space is mostly explored; a seeded run would only repeat the same numbers."""
    import optuna  # deferred: loaded only by sweeps

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return next((t for t in study.get_trials(deepcopy=False, states=done) if t.params == params), None)


def run_sweep(config: str, overrides: list[str], space: dict[str, Dimension], trials: int,
              console: Console | None = None, seed: int = 0, sampler: str = "tpe") -> Path:
    import optuna  # deferred: loaded only by sweeps

    console = console or Console()
    base = load_config(config, overrides)  # fail on a bad config before any trial
    if not base.data.validation and base.data.val_size == 0:
        raise ConfigError(["a sweep is scored on the validation loss: set data.val_size > 0 or data.validation"])
    picker = make_sampler(sampler, space, seed)
    root = Path(base.output_dir) / (base.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-sweep")
    # A sweep folder (its study.db) is resumed; a folder holding anything else is never written into.
    check_output(root, lambda p: (p / "study.db").is_file(), what="sweep folder")
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="tuneforge", storage=f"sqlite:///{root / 'study.db'}", load_if_exists=True, direction="minimize",
        sampler=picker,
        # No pruning before 2 trials finished or before a trial's second validation: trials
        # report by validation index (0, 1, ...), so "warm-up 1" is one validation, whatever
        # the training step it fell on (reporting training steps pruned at the first one).
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))

    def objective(trial) -> float:
        choice = suggest(trial, space)
        twin = earlier_twin(study, trial.params)
        if twin is not None:
            trial.set_user_attr("run_dir", twin.user_attrs.get("run_dir"))
            trial.set_user_attr("duplicate_of", twin.number)
            console.print(f"trial {trial.number}: {' '.join(choice)} is trial {twin.number} again: not retrained")
            if twin.value is None:
                raise optuna.TrialPruned(f"same parameters as failed trial {twin.number}")
            return twin.value
        cfg = load_config(config, [*overrides, *choice, f"output_dir={root}", f"run_name=trial-{trial.number:03d}"])
        trial.set_user_attr("run_dir", str(root / cfg.run_name))
        console.rule(f"trial {trial.number}: {' '.join(choice)}")
        best, seen = [float("inf")], [0]

        def on_eval(step: int, val_loss: float) -> None:
            best[0] = min(best[0], val_loss)
            trial.report(val_loss, seen[0])  # the validation's index: the pruner compares like with like
            seen[0] += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {val_loss:.4f} at step {step} "
                                         f"(validation {seen[0]}) is worse than the median of earlier trials")

        train(cfg, console=console, on_eval=on_eval)
        return best[0]

    study.optimize(objective, n_trials=trials, catch=(TrainingDiverged,))
    summarize(study, root, console)
    return root


def summarize(study, root: Path, console: Console) -> None:
    import optuna  # deferred: loaded only by sweeps

    rows = [{"trial": t.number, "state": t.state.name.lower(), "val_loss": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"), "duplicate_of": t.user_attrs.get("duplicate_of")}
            for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    result = {"trials": rows, "best": None}
    if done:
        best = study.best_trial
        result["best"] = {"trial": best.number, "val_loss": best.value, "params": best.params,
                          "run_dir": best.user_attrs["run_dir"]}
        shutil.copyfile(Path(best.user_attrs["run_dir"]) / "config.yaml", root / "best_config.yaml")
    write_json(root / "sweep.json", result)
    plot_sweep(rows, root / "sweep.png")

    table = Table(title=f"sweep {root} ({len(rows)} trials)")
    for col in ("trial", "state", "best val loss", *study.trials[0].params, "run"):
        table.add_column(col, justify="right" if col not in ("state", "run") else "left")
    for r in rows:
        mark = "*" if result["best"] and r["trial"] == result["best"]["trial"] else ""
        table.add_row(f"{r['trial']}{mark}", r["state"], "" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
                      *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r["params"].values()),
                      Path(r["run_dir"] or "").name + ("" if r["duplicate_of"] is None else " (same params)"))
    console.print(table)
    if result["best"]:
        console.print(f"best: trial {result['best']['trial']} -> {root / 'best_config.yaml'}")


def plot_sweep(rows: list[dict], out: Path) -> None:
    import matplotlib  # deferred: the plotting stack loads only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: the plotting stack loads only when a plot is drawn

    scored = [(r["trial"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if scored:
        xs, ys = zip(*scored)
        running = [min(ys[: i + 1]) for i in range(len(ys))]
        ax.scatter(xs, ys, label="trial")
        ax.step(xs, running, where="post", color="C1", label="best so far")
        ax.legend()
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
