"""Objects the train loop consults: early stopping with keep-best, and the NaN/inf guard."""

from __future__ import annotations

import math
from dataclasses import dataclass


class TrainingDiverged(RuntimeError):
    """The loss went non-finite again after the guard's one rollback with a lower LR."""


@dataclass
class EarlyStopping:
    """Stop after ``patience`` validations without improving the best loss by > ``min_delta``.

    ``patience=None`` never stops but still tracks the best step (so keep-best works alone).
    """

    patience: int | None = None
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = 0
    bad: int = 0

    def update(self, step: int, val_loss: float) -> bool:
        """Record a validation; True when it is the new best (the caller keeps those weights)."""
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = val_loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    @classmethod
    def replay(cls, patience: int | None, min_delta: float, history: list[tuple[int, float]]) -> EarlyStopping:
        """The stopper's state after the validations of a resumed run's metrics.jsonl."""
        stopper = cls(patience, min_delta)
        for step, loss in history:
            stopper.update(step, loss)
        return stopper


@dataclass
class NanGuard:
    """One rollback to the last checkpoint with the LR times ``lr_factor``; the next non-finite
    loss raises. A NaN usually means the LR is too high for this data (or fp16 overflow), so a
    lower LR from the last good weights is the one retry that often works."""

    lr_factor: float
    retried: bool = False

    def check(self, loss: float, step: int) -> bool:
        """True when the step must be rolled back; raises when the one retry is spent."""
        if math.isfinite(loss):
            return False
        if self.retried:
            raise TrainingDiverged(
                f"loss is {loss} at step {step} again after rolling back and lowering the LR by "
                f"{self.lr_factor}: lower train.lr further, use train.dtype=fp32, or check the data")
        self.retried = True
        return True


def scale_lr(optimizer, scheduler, factor: float) -> None:
    """Lower the LR for the rest of the run: the current LR and the schedule's base LRs."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
