"""Several tasks in one run: per-task splits, a seeded training mixture, per-task validation.

A run trains on its tasks (``data.train`` is one task named ``main``; ``data.tasks`` are
several) and knows its earlier tasks (``continual.previous``): those are replayed into the
mixture when ``continual.replay_share`` > 0, anchor EWC, and are validated and evaluated
so that forgetting shows up in the run's own metrics.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tuneforge.config import DataConfig, RunConfig, TaskConfig
from tuneforge.data.prepare import Splits, build_splits
from tuneforge.data.render import Encoded

MAIN = "main"


@dataclass
class Task:
    name: str
    splits: Splits
    enc: dict[str, Encoded]  # "train", "validation"
    weight: float | None
    earlier: bool  # a previous task of a continual run (not trained unless replayed)


def task_data(data: DataConfig, task: TaskConfig) -> DataConfig:
    """The data section for one task: its files, everything else (format, lengths...) shared."""
    return data.model_copy(update={
        "train": task.train, "validation": task.validation, "test": task.test, "tasks": [],
        "val_size": data.val_size if task.val_size is None else task.val_size,
        "test_size": data.test_size if task.test_size is None else task.test_size})


def task_configs(cfg: RunConfig) -> list[tuple[TaskConfig, bool]]:
    """(task, earlier?) for every task the run touches, trained tasks first."""
    d = cfg.data
    trained = d.tasks or [TaskConfig(name=MAIN, train=d.train, validation=d.validation, test=d.test)]
    return [(t, False) for t in trained] + [(t, True) for t in cfg.continual.previous]


def load_tasks(cfg: RunConfig, tok, objective) -> list[Task]:
    tasks = []
    for tc, earlier in task_configs(cfg):
        data = task_data(cfg.data, tc)
        # Same seed and sizes as the task's own run, so an earlier task's test rows stay unseen.
        splits = build_splits(data, cfg.train.seed, objective.data_kind)
        enc = {k: objective.encode(tok, getattr(splits, k), data) for k in ("train", "validation")}
        tasks.append(Task(tc.name, splits, enc, tc.weight, earlier))
    return tasks


def mixture_probs(sizes: list[int], weights: list[float | None], temperature: float) -> list[float]:
    """Sampling probability of each task: its weight when given, else size ** (1/T).

    T=1 samples in proportion to size (plain concatenation); larger T moves towards uniform,
    so small tasks are not drowned out (the usual multilingual/multi-task recipe).
    """
    raw = [w if w is not None else n ** (1.0 / temperature) for n, w in zip(sizes, weights)]
    total = sum(raw)
    return [r / total for r in raw]


def sample_mixture(rows_by_task: list[list[dict]], probs: list[float], n: int, seed: int
                   ) -> tuple[list[dict], list[int]]:
    """``n`` rows: each slot picks a task by ``probs`` (seeded), then that task's next row.

    Each task walks through a shuffled copy of its rows and reshuffles when exhausted, so
    a task sampled below its size contributes distinct rows and one above it repeats evenly.
    """
    rng = random.Random(seed)
    orders = [rng.sample(rows, len(rows)) for rows in rows_by_task]
    cursor = [0] * len(rows_by_task)
    counts = [0] * len(rows_by_task)
    out = []
    for i in rng.choices(range(len(rows_by_task)), weights=probs, k=n):
        if cursor[i] == len(orders[i]):
            orders[i], cursor[i] = rng.sample(orders[i], len(orders[i])), 0
        out.append(orders[i][cursor[i]])
        cursor[i] += 1
        counts[i] += 1
    return out, counts


def training_mixture(tasks: list[Task], cfg: RunConfig) -> tuple[list[dict], dict]:
    """The run's training rows and the record of how they were mixed."""
    trained = [t for t in tasks if not t.earlier]
    if len(trained) == 1 and not cfg.continual.replay_share:
        rows = trained[0].enc["train"].rows
        return rows, {"tasks": {trained[0].name: {"rows": len(rows), "share": 1.0}}}
    sizes = [len(t.enc["train"].rows) for t in trained]
    probs = mixture_probs(sizes, [t.weight for t in trained], cfg.data.temperature)
    pools = [t.enc["train"].rows for t in trained]
    names = [t.name for t in trained]
    n = sum(sizes)
    share = cfg.continual.replay_share
    if share:
        # Replay: the new task(s) keep their size; earlier tasks fill `share` of the total.
        earlier = [t for t in tasks if t.earlier]
        pools.append([r for t in earlier for r in t.enc["train"].rows])
        names.append("replay")
        probs = [p * (1 - share) for p in probs] + [share]
        n = math.ceil(n / (1 - share))
    rows, counts = sample_mixture(pools, probs, n, cfg.train.seed)
    return rows, {"rows": n, "temperature": cfg.data.temperature, "replay_share": share,
                  "tasks": {name: {"probability": round(p, 4), "rows": c, "share": round(c / n, 4)}
                            for name, p, c in zip(names, probs, counts)}}
