"""Diagnosis from training curves (metrics.jsonl): over-fitting, under-fitting, too-high LR.

Pure functions over lists of (step, value) so each rule is tested on synthetic curves.
Every finding carries its evidence (numbers from the curve) and a suggested change. The
diagnosis is ONE verdict: rules are tried in order of severity and the first that fires
decides, so a run is never told both "stop earlier" and "train longer". Over-fitting is read
from a smoothed validation curve with enough points (one noisy point proves nothing); with
fewer the verdict says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel


class Finding(BaseModel):
    kind: str  # overfitting | underfitting | lr_too_high | ok | too_few_points
    evidence: str
    suggestion: str


class Thresholds(BaseModel):
    spike_ratio: float = 2.0  # a train loss this many times the recent median is a spike...
    spike_min_rise: float = 0.1  # ...and this many nats above it: 0.002 -> 0.007 near zero loss is noise
    overfit_rise: float = 0.05  # val loss this much (relative) above its minimum, at the end
    flat_drop: float = 0.10  # train loss fell by less than this share: the model barely learned
    high_loss: float = 2.0  # nats per token: still this high at the end is under-fitting
    min_val_points: int = 4  # validation points needed to read a rise (smoothed over 3)


Curve = list[tuple[int, float]]


def read_curves(metrics_path: Path) -> tuple[Curve, Curve]:
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    return train, val


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _window_mean(curve: Curve, frac: float = 0.2) -> tuple[float, float]:
    """Mean loss over the first and the last ``frac`` of the curve (noise-robust ends)."""
    k = max(1, round(len(curve) * frac))
    return sum(v for _, v in curve[:k]) / k, sum(v for _, v in curve[-k:]) / k


def lr_too_high(train: Curve, th: Thresholds) -> Finding | None:
    """Divergence (non-finite or ending above the start) or spikes against the recent median."""
    if not train:
        return None
    bad = [s for s, v in train if not math.isfinite(v)]
    if bad:
        return Finding(kind="lr_too_high", evidence=f"train loss is not finite from step {bad[0]}",
                       suggestion="lower train.lr 10x, and keep train.max_grad_norm set")
    spikes = []
    for i in range(5, len(train)):
        med = _median([v for _, v in train[max(0, i - 10):i]])
        if train[i][1] > th.spike_ratio * med and train[i][1] - med > th.spike_min_rise:
            spikes.append((train[i][0], train[i][1], med))
    start, end = _window_mean(train)
    if len(train) >= 5 and end > start:
        return Finding(kind="lr_too_high",
                       evidence=f"train loss diverged: mean {start:.3f} over the first steps, {end:.3f} at the end",
                       suggestion="lower train.lr 3-10x or add warm-up (train.warmup_ratio=0.1)")
    if spikes:
        s, v, med = spikes[0]
        return Finding(kind="lr_too_high",
                       evidence=f"{len(spikes)} loss spike(s), first at step {s}: {v:.3f} vs recent median {med:.3f}",
                       suggestion="lower train.lr 2-3x, or raise train.warmup_ratio")
    return None


def smooth(curve: Curve) -> Curve:
    """Centred moving average over 3 points (2 at the ends): one noisy validation pass moves
    the smoothed curve by a third, not enough to fake a rise."""
    vals = [v for _, v in curve]
    return [(s, sum(vals[max(0, i - 1):i + 2]) / len(vals[max(0, i - 1):i + 2])) for i, (s, _) in enumerate(curve)]


def overfitting(train: Curve, val: Curve, th: Thresholds) -> Finding | None:
    """The smoothed validation loss rose above its minimum, and stayed there for the last two
    validations, while training loss kept falling."""
    if len(val) < th.min_val_points:
        return None
    smoothed = smooth(val)
    best_step, best = min(smoothed, key=lambda x: x[1])
    last_step, last = smoothed[-1]
    if best_step == last_step or last <= best * (1 + th.overfit_rise):
        return None
    if any(v <= best * (1 + th.overfit_rise) for _, v in val[-2:]):  # the rise must persist, not be one point
        return None
    train_at_best = [v for s, v in train if s <= best_step]
    train_after = [v for s, v in train if s > best_step]
    if not train_at_best or not train_after:
        return None
    k = max(1, len(train_after) // 3)
    if sum(train_after[-k:]) / k >= sum(train_at_best[-k:]) / len(train_at_best[-k:]):
        return None
    return Finding(kind="overfitting",
                   evidence=(f"validation loss (smoothed over 3 validations) was lowest at step {best_step} "
                             f"({best:.3f}) and rose to {last:.3f} by step {last_step} (+{100 * (last / best - 1):.0f}%) "
                             f"while train loss kept falling"),
                   suggestion=(f"stop near step {best_step} (train.max_steps={best_step}), or add data, raise "
                               "method.dropout, lower method.r"))


def underfitting(train: Curve, val: Curve, th: Thresholds) -> Finding | None:
    """Loss barely moved, or is still high at the end and validation agrees (no gap)."""
    if len(train) < 3:
        return None
    start, end = _window_mean(train)
    drop = 1 - end / start if start > 0 else 0.0
    val_end = val[-1][1] if val else end
    if drop < th.flat_drop:
        return Finding(kind="underfitting",
                       evidence=f"train loss fell only {100 * drop:.0f}% ({start:.3f} -> {end:.3f})",
                       suggestion="train longer (train.max_steps or train.epochs), raise train.lr 2-3x, or raise method.r")
    if end > th.high_loss and val_end > th.high_loss:
        return Finding(kind="underfitting",
                       evidence=f"loss is still high at the end: train {end:.3f}, validation {val_end:.3f}",
                       suggestion="train longer or with a higher train.lr; check the data's quality")
    return None


def diagnose(train: Curve, val: Curve, th: Thresholds | None = None) -> list[Finding]:
    """One verdict (a one-element list): the first rule that fires, in order of severity
    (a diverging curve makes the others meaningless; a validation loss that really rose means
    more training would not help); else ``too_few_points`` when the validation curve is too
    short to rule out over-fitting; else ``ok``."""
    th = th or Thresholds()
    for rule in (lr_too_high, lambda t, h: overfitting(t, val, h), lambda t, h: underfitting(t, val, h)):
        found = rule(train, th)
        if found:
            return [found]
    if not train:
        return [Finding(kind="ok", evidence="no training curve", suggestion="-")]
    start, end = _window_mean(train)
    gap = f", validation {val[-1][1]:.3f}" if val else ""
    if len(val) < th.min_val_points:
        return [Finding(kind="too_few_points",
                        evidence=f"train loss {start:.3f} -> {end:.3f}{gap}; {len(val)} validation point(s): not "
                                 f"enough to tell over-fitting (needs {th.min_val_points})",
                        suggestion="validate more often (lower train.eval_every) or train longer to tell")]
    return [Finding(kind="ok", evidence=f"train loss {start:.3f} -> {end:.3f}{gap}; no rule fired",
                    suggestion="none needed")]
