"""THE training loop. Every objective tuneforge trains itself (token losses, preference pairs,
sequence heads) runs through ``Loop``, in phases: setup -> (train step -> evaluate ->
checkpoint) until done -> finish. Online RL (recipes/online_rl.py) is trl's loop, not this one.

The recipe hands the loop a ``Steps``: how to get one epoch's micro-batches, how to take the
loss of one optimizer step's micro-batches (and run backward), and how to validate. Everything
else is the loop's and so applies to every objective alike: the optimizer and schedule, the
NaN/inf guard (one rollback to the last checkpoint with a lower LR), early stopping with
keep-best, checkpoints that resume exactly (also on Ctrl-C), DP-SGD's optimizer, an extra
penalty (EWC), method hooks, metrics.jsonl and the progress bar.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from tuneforge.allocator import free_memory_releaser
from tuneforge.config import RunConfig
from tuneforge.hardware import autocast, compute_path, speed_hints, to_device
from tuneforge.io import disk_full, is_disk_full
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import distributed
from tuneforge.train.callbacks import EarlyStopping, NanGuard, TrainingDiverged, scale_lr
from tuneforge.train.privacy import make_private


@dataclass
class Window:
    """What one optimizer step's micro-batches gave."""

    loss: float  # the step's loss, as logged and as the NaN guard checks it
    metrics: dict[str, float] = field(default_factory=dict)  # logged after the loss, rounded
    extra: dict = field(default_factory=dict)  # logged as they are, last (token counts)
    tokens: int | None = None  # tokens processed, for tokens_per_s; None: not measured


class Steps(Protocol):
    """What a recipe tells the loop about its objective."""

    n_rows: int  # training rows (DP-SGD's sample rate)

    def batches(self, epoch: int) -> list[dict]:
        """The epoch's micro-batches, in an order fixed by (seed, epoch): a resumed run sees
        exactly the batches the uninterrupted one would have seen."""

    def backward(self, window: list[dict]) -> Window:
        """Loss of one optimizer step's micro-batches, gradients accumulated by backward."""

    def validate(self) -> dict[str, float] | None:
        """``{"val_loss": ..., other metrics}`` on the validation rows; None without any."""


class MeanSteps:
    """Steps for losses that are means over examples (pairs, classified texts, reward pairs):
    the micro-batches of a window weigh the same, so their mean losses are averaged."""

    def __init__(self, batches: Callable[[int], list[dict]], step_loss: Callable[[dict], tuple[torch.Tensor, dict]],
                 validate: Callable[[], dict] | None, n_rows: int, device: str, dtype: torch.dtype):
        self.batches, self.step_loss, self._validate = batches, step_loss, validate
        self.n_rows, self.device, self.dtype = n_rows, device, dtype

    def backward(self, window: list[dict]) -> Window:
        sums: dict[str, float] = {}
        for b in window:
            with autocast(self.device, self.dtype):
                loss, metrics = self.step_loss(to_device(b, self.device))
            (loss / len(window)).backward()
            for k, v in {"loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v / len(window)
        return Window(sums.pop("loss"), sums)

    def validate(self) -> dict[str, float] | None:
        return self._validate() if self._validate else None


@dataclass
class Outcome:
    steps: int  # optimizer steps done
    train_seconds: float
    tokens_per_s: float
    last_eval: dict  # the last validation (also one logged before a resume)
    best: dict  # best_step, best_val_loss, stopped_early: with train.early_stopping_patience
    privacy: dict | None  # DP-SGD's epsilon report


def total_steps(n_micro_per_epoch: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * math.ceil(n_micro_per_epoch / grad_accum)))


def eval_history(path: Path) -> list[tuple[int, float]]:
    """(step, val_loss) of every validation in metrics.jsonl (the early stopper's replay)."""
    return [(r["step"], r["val_loss"]) for r in _rows(path) if r["kind"] == "eval"]


def last_logged_eval(path: Path) -> dict:
    """The last validation in metrics.jsonl (a run resumed at its final step does not redo it)."""
    evals = [r for r in _rows(path) if r["kind"] == "eval"]
    return {k: v for k, v in evals[-1].items() if k not in ("kind", "step")} if evals else {}


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def restore_trainable(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy whole trained weights into the model (cut to this rank's shard under FSDP)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(distributed.like(w, params[n]))


class Loop:
    def __init__(self, cfg: RunConfig, run_dir: Path, model, steps: Steps, method, *, device: str,
                 dtype: torch.dtype, console: Console, resume: bool = False,
                 on_eval: Callable[[int, float], None] | None = None, world: distributed.World = distributed.World(),
                 sharded: bool = False, penalty=None, monitor=None, tracker=None):
        """``penalty() -> tensor`` is added to every step's loss (EWC); its ``key`` names it in the log.
        ``on_eval(step, val_loss)`` is called after every validation (a sweep prunes from it).
        ``monitor`` (MoE: train/moe_stats.py) adds its ``window_metrics()`` to each step's row and
        sees each logged train row (``logged(row, console)``); ``start(step)`` once the position is known.
        ``tracker`` (train/tracking.py) is started with the run folder and gets every logged row."""
        self.cfg, self.t, self.run_dir, self.model, self.steps, self.method = cfg, cfg.train, run_dir, model, steps, method
        self.device, self.dtype, self.console, self.resume, self.on_eval = device, dtype, console, resume, on_eval
        self.world, self.main, self.sharded, self.penalty = world, world.is_main, sharded, penalty
        self.monitor, self.tracker = monitor, tracker
        self.metrics_path = run_dir / "metrics.jsonl"
        self.best_path = run_dir / "checkpoints" / "best.safetensors"

    # --- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Optimizer, schedule, DP-SGD, then the state to start from: the latest checkpoint of a
        resumed run, else a step-0 checkpoint (the NaN guard always has a state to go back to)."""
        # deferred: transformers takes seconds to import; only code that builds a model pays
        from transformers import get_scheduler

        t = self.t
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters instead of ~10 small ops per tensor per step.
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        self.epochs = {0: self.steps.batches(0)}
        self.micro_per_step = t.grad_accum * self.world.size
        self.total = total_steps(len(self.epochs[0]), self.micro_per_step, t.epochs, t.max_steps)
        warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * self.total)
        self.scheduler = get_scheduler(t.scheduler, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total)
        self.private = None
        if self.cfg.privacy is not None:  # objectives that cannot take it are refused by plugins.py
            self.private = make_private(self.model, self.optimizer, self.cfg.privacy, micro_batch_size=t.batch_size,
                                        rows_per_step=t.batch_size * t.grad_accum, n_rows=self.steps.n_rows,
                                        steps=self.total)
            self.console.print(f"DP-SGD: noise multiplier {self.private.noise_multiplier:.3f}, per-example clip "
                               f"{self.cfg.privacy.max_grad_norm}, sample rate {self.private.sample_rate:.4f}")
        self.step_optimizer = self.private.optimizer if self.private else self.optimizer

        self.pos, restored = ckpt.Position(), None
        if self.resume:
            restored = ckpt.restore_latest(self.run_dir, self.model, self.optimizer, self.scheduler,
                                           self.metrics_path if self.main else None)
        if restored is not None:
            self.pos, last = restored
            self.console.print(f"resumed from {last} (step {self.pos.step}, epoch {self.pos.epoch}, "
                               f"batch {self.pos.micro})")
        elif self.main:
            self.metrics_path.unlink(missing_ok=True)
        self.stopper = EarlyStopping.replay(t.early_stopping_patience, t.early_stopping_min_delta,
                                            eval_history(self.metrics_path))
        self.guard = NanGuard(t.nan_lr_factor)
        self.last_eval = last_logged_eval(self.metrics_path)
        self.release = free_memory_releaser() if t.release_memory and self.device == "cpu" else None
        if restored is None:
            self.checkpoint()
        if self.monitor is not None:
            self.monitor.start(self.pos.step)
        if self.tracker is not None and self.main:
            self.tracker.start(self.run_dir, self.console)
        self.model.train()  # loaded models come in eval mode: dropout on from here

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> Outcome:
        self.setup()
        t = self.t
        # The path in the bar's label ("train CPU AVX2, fp32"), and what would make it faster: the
        # first things to check when training is slow.
        path, hints = compute_path(self.device, self.dtype), speed_hints(self.device, self.dtype)
        if hints and not self.resume:
            self.console.print(f"[dim]training on {path}; faster with " + "; ".join(hints))
        progress = Progress(TextColumn(f"[bold]train[/] {path}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=self.console)
        self.tokens_seen, self.tps, self.t_loop = 0, 0.0, time.perf_counter()
        with progress:
            bar = progress.add_task("train", total=self.total, completed=self.pos.step, info="")
            while self.pos.step < self.total:
                window = self.train_step()
                if window is None:  # rolled back by the NaN guard
                    progress.update(bar, completed=self.pos.step)
                    continue
                info = "  ".join(f"{k} {v:.4f}" for k, v in {"loss": window.loss, **window.metrics}.items())
                progress.update(bar, advance=1, info=f"{info}  lr {self.scheduler.get_last_lr()[0]:.2e}"
                                + (f"  {self.tps:,.0f} tok/s" if window.tokens is not None else ""))
                is_last = self.pos.step == self.total
                if (t.eval_every and self.pos.step % t.eval_every == 0) or is_last:
                    if self.evaluate(window.loss, progress.console) and not is_last:
                        progress.console.print(
                            f"[yellow]early stop[/]: no validation improvement in {self.stopper.patience} "
                            f"evaluations; best {self.stopper.best:.4f} at step {self.stopper.best_step}")
                        self.checkpoint()
                        break
                if (t.save_every and self.pos.step % t.save_every == 0) or is_last:
                    self.checkpoint()
        return self.finish()

    def next_batch(self) -> dict:
        pos = self.pos
        if pos.micro >= len(self.epochs.setdefault(pos.epoch, self.steps.batches(pos.epoch))):
            self.epochs.pop(pos.epoch, None)
            pos.epoch, pos.micro = pos.epoch + 1, 0
            self.epochs[pos.epoch] = self.steps.batches(pos.epoch)
        pos.micro += 1
        return self.epochs[pos.epoch][pos.micro - 1]

    # --- train step ------------------------------------------------------------------------

    def train_step(self) -> Window | None:
        """One optimizer step; None when the NaN guard rolled it back."""
        t, pos = self.t, self.pos
        self.method.on_step(self.model, pos.step)
        # Interrupt safety: weights only change at optimizer.step(), so the state at the start
        # of the window (position + RNG) is a consistent point to resume from.
        window_start, rng_before = ckpt.Position(**vars(pos)), ckpt.rng_state()
        try:
            batches = [self.next_batch() for _ in range(self.micro_per_step)]
            window = self.steps.backward(batches)
            if self.monitor is not None:
                window.metrics |= self.monitor.window_metrics()
            if not self.sharded:  # FSDP has reduce-scattered them during backward
                distributed.sum_gradients(self.world, self.params)
            penalty = None
            if self.penalty is not None:
                penalty = self.penalty()
                penalty.backward()
            # DP-SGD clips each example's gradient itself; clipping the noisy sum would distort it.
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
                         if t.max_grad_norm and not self.private else torch.tensor(0.0))
            if self.guard.check(window.loss, pos.step + 1):
                self.roll_back(window.loss)
                return None
            self.step_optimizer.step()
            self.scheduler.step()
            self.step_optimizer.zero_grad(set_to_none=True)
            if self.release:
                self.release()
        except KeyboardInterrupt:
            self.step_optimizer.zero_grad(set_to_none=True)
            ckpt.exit_interrupted(self.checkpoint(rng_before, window_start), self.run_dir, self.console)
        pos.step += 1
        row = {"kind": "train", "step": pos.step, "epoch": pos.epoch, "loss": round(window.loss, 5),
               **{k: round(v, 5) for k, v in window.metrics.items()}, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": round(float(distributed.whole(grad_norm)), 4)}
        if window.tokens is not None:
            self.tokens_seen += window.tokens
            self.tps = self.tokens_seen / (time.perf_counter() - self.t_loop)
            row["tokens_per_s"] = round(self.tps, 1)
        row |= window.extra
        if penalty is not None:
            row[self.penalty.key] = round(penalty.item(), 6)
        self.log(row)
        if self.monitor is not None and self.main:
            self.monitor.logged(row, self.console)
        return window

    def roll_back(self, loss: float) -> None:
        """NaN guard: drop this step, restore the last checkpoint, lower the LR, and put the
        early stopper back as it was at that checkpoint."""
        t = self.t
        self.step_optimizer.zero_grad(set_to_none=True)
        bad_step = self.pos.step + 1
        loaded, good = ckpt.restore_latest(self.run_dir, self.model, self.optimizer, self.scheduler,
                                           self.metrics_path if self.main else None)
        vars(self.pos).update(vars(loaded))
        scale_lr(self.optimizer, self.scheduler, t.nan_lr_factor)
        self.log({"kind": "rollback", "step": self.pos.step, "bad_step": bad_step, "loss": str(loss),
                  "lr_factor": t.nan_lr_factor})
        self.console.print(f"[yellow]loss {loss} at step {bad_step}[/]: rolled back to {good.name}, "
                           f"LR x{t.nan_lr_factor}")
        self.stopper = EarlyStopping.replay(t.early_stopping_patience, t.early_stopping_min_delta,
                                            eval_history(self.metrics_path))

    # --- evaluate --------------------------------------------------------------------------

    def evaluate(self, train_loss: float, console: Console) -> bool:
        """Validate (when there are validation rows), keep the best weights; True: stop early."""
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            scores = self.steps.validate()
        self.model.train()
        if scores is None:
            return False
        step, vl = self.pos.step, scores["val_loss"]
        self.last_eval = {k: round(v, 5) for k, v in scores.items()}
        row = {"kind": "eval", "step": step, **self.last_eval}
        if self.private:
            row["epsilon"] = round(self.private.epsilon(step), 4)
        self.log(row)
        console.print(f"step {step}: train loss {train_loss:.4f}  validation loss {vl:.4f}" + "".join(
            f"  {k.removeprefix('val_loss/')} {v:.4f}" for k, v in scores.items() if k != "val_loss"))
        if not math.isfinite(vl):
            # Weights blown up enough that held-out rows overflow while the training loss
            # still looks finite: the run is lost either way, so say so (a sweep marks the
            # trial failed instead of keeping its earlier score).
            raise TrainingDiverged(f"validation loss is {vl} at step {step}: lower train.lr, use "
                                   "train.dtype=fp32, or check the data")
        if self.stopper.update(step, vl) and self.t.early_stopping_patience and (self.main or self.sharded):
            best = ckpt.trainable_state(self.model, keep=self.main)  # under FSDP every rank gathers
            if self.main:
                save_file(best, str(self.best_path))
        if self.on_eval is not None:
            self.on_eval(step, vl)
        return self.stopper.should_stop

    # --- checkpoint ------------------------------------------------------------------------

    def checkpoint(self, rng: dict | None = None, at: ckpt.Position | None = None) -> Path | None:
        path = None
        if self.main or self.sharded:  # under FSDP every rank takes part in gathering the shards
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", at or self.pos, self.model, self.optimizer,
                                        self.scheduler, rng or ckpt.rng_state(), self.t.keep_checkpoints,
                                        write=self.main)
        distributed.barrier(self.world)
        return path

    def log(self, row: dict) -> None:
        if self.main:
            line = json.dumps(row) + "\n"
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(line)
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full(self.metrics_path, len(line)) from e
                raise
            if self.tracker is not None:
                self.tracker.log(row)

    # --- finish ----------------------------------------------------------------------------

    def finish(self) -> Outcome:
        """Drop DP-SGD's hooks, and keep-best: the weights left in the model are those of the
        lowest validation loss when early stopping is on."""
        train_seconds = time.perf_counter() - self.t_loop
        if self.private:
            self.private.close()
        distributed.barrier(self.world)  # best.safetensors is written before any rank reads it
        best = {}
        if self.t.early_stopping_patience and self.best_path.exists():
            restore_trainable(self.model, load_file(str(self.best_path)))
            best = {"best_step": self.stopper.best_step, "best_val_loss": round(self.stopper.best, 5),
                    "stopped_early": self.pos.step < self.total}
        privacy = self.private.report(self.cfg.privacy.max_grad_norm, self.pos.step) if self.private else None
        return Outcome(self.pos.step, train_seconds, self.tps, self.last_eval, best, privacy)
