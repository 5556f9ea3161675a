"""The parts every objective recipe shares: a run folder, its data, an optimizer, and a
plain loop that logs what the objective reports and checkpoints for an exact resume. The
token-loss recipe (run.py) has its own loop (token-weighted accumulation, NaN rollback);
recipes whose loss is a mean over pairs, examples or prompts use this one.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from tuneforge.config import RunConfig, to_yaml
from tuneforge.data.prepare import Splits, build_splits
from tuneforge.io import atomic_write_text, write_json
from tuneforge.train import checkpoint as ckpt
from tuneforge.hardware import environment, pick_device, pick_dtype
from tuneforge.train.loop import total_steps
from tuneforge.hardware import autocast, to_device


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
    load and split the data."""
    from tuneforge.objectives import OBJECTIVES
    from tuneforge.train.run import new_run_dir, preflight

    preflight(cfg)
    run_dir = resume or new_run_dir(cfg)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    write_json(run_dir / "environment.json", environment(device, dtype))
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    console.print(f"[bold]run[/] {run_dir}  objective={cfg.objective.name} device={device} "
                  f"dtype={str(dtype).replace('torch.', '')}")
    splits = build_splits(cfg.data, cfg.train.seed, OBJECTIVES[cfg.objective.name].data_kind)
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


def fit(model, batches: Callable[[int], list], step_loss: Callable[[dict], tuple[torch.Tensor, dict]],
        evaluate: Callable[[], dict] | None, run: RunStart, console: Console) -> dict:
    """Train ``model`` on ``batches(epoch)`` (micro-batches, fixed order per epoch and seed).

    ``step_loss(batch) -> (mean loss, {metric: float})``; accumulated micro-batches are
    averaged (these losses are means over pairs/examples, not sums over tokens).
    ``evaluate() -> {metric: float}`` runs every train.eval_every steps and at the end.
    A checkpoint is saved every train.save_every steps, at the end and on Ctrl-C; with
    ``run.resume`` training continues from the latest one.
    Returns the last evaluation (empty without one).
    """
    from transformers import get_scheduler

    t, device, dtype = run.cfg.train, run.device, run.dtype
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    cache = batches(0)
    steps = total_steps(len(cache), t.grad_accum, t.epochs, t.max_steps)
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    pos = ckpt.Position()
    metrics_path = run.run_dir / "metrics.jsonl"
    # Called only after model, optimizer and scheduler exist: the recipe's reference copy
    # (preference.py) was taken from the starting weights, before these are restored.
    restored = ckpt.restore_latest(run.run_dir, model, optimizer, scheduler, metrics_path) if run.resume else None
    if restored is not None:
        pos, last = restored
        cache = batches(pos.epoch)
        console.print(f"resumed from {last} (step {pos.step}, epoch {pos.epoch}, batch {pos.micro})")
    else:
        metrics_path.unlink(missing_ok=True)
    last_eval = last_logged_eval(metrics_path)

    def save(at: ckpt.Position, rng: dict) -> Path:
        return ckpt.save_checkpoint(run.run_dir / "checkpoints", at, model, optimizer, scheduler, rng,
                                    t.keep_checkpoints)

    model.train()
    with open(metrics_path, "a") as log:
        while pos.step < steps:
            # Weights change only at optimizer.step(), so the position and RNG at the start
            # of the step are a consistent point to resume from on Ctrl-C.
            step_start, rng_before = ckpt.Position(**vars(pos)), ckpt.rng_state()
            try:
                sums: dict[str, float] = {}
                for _ in range(t.grad_accum):
                    if pos.micro == len(cache):
                        pos.epoch, pos.micro, cache = pos.epoch + 1, 0, batches(pos.epoch + 1)
                    with autocast(device, dtype):
                        loss, metrics = step_loss(to_device(cache[pos.micro], device))
                    pos.micro += 1
                    (loss / t.grad_accum).backward()
                    for k, v in {"loss": loss.item(), **metrics}.items():
                        sums[k] = sums.get(k, 0.0) + v / t.grad_accum
                if not all(map(lambda v: v == v and abs(v) != float("inf"), sums.values())):
                    raise FloatingPointError(f"non-finite metrics at step {pos.step + 1}: {sums}; "
                                             "lower train.lr or use fp32")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except KeyboardInterrupt:
                optimizer.zero_grad(set_to_none=True)
                ckpt.exit_interrupted(save(step_start, rng_before), run.run_dir, console)
            pos.step += 1
            row = {"kind": "train", "step": pos.step, "epoch": pos.epoch,
                   **{k: round(v, 5) for k, v in sums.items()}, "lr": scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                row["grad_norm"] = round(float(grad_norm), 4)
            log.write(json.dumps(row) + "\n")
            shown = "  ".join(f"{k} {v:.4f}" for k, v in sums.items())
            console.print(f"step {pos.step}/{steps}  {shown}")
            is_last = pos.step == steps
            if evaluate and ((t.eval_every and pos.step % t.eval_every == 0) or is_last):
                model.eval()
                with torch.no_grad(), autocast(device, dtype):
                    last_eval = evaluate()
                model.train()
                log.write(json.dumps({"kind": "eval", "step": pos.step, **last_eval}) + "\n")
                console.print(f"step {pos.step} validation: "
                              + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            log.flush()  # before the checkpoint: every row it covers is on disk
            if (t.save_every and pos.step % t.save_every == 0) or is_last:
                save(pos, ckpt.rng_state())
    return last_eval | {"steps": steps}


def last_logged_eval(metrics_path: Path) -> dict:
    """The last evaluation in metrics.jsonl (a run resumed at its final step does not redo it)."""
    if not metrics_path.exists():
        return {}
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r["kind"] == "eval"]
    return {k: v for k, v in evals[-1].items() if k not in ("kind", "step")} if evals else {}


def finish(run: RunStart, summary: dict, console: Console) -> Path:
    from tuneforge.hardware import peak_memory
    from tuneforge.evaluate.plots import plot_losses

    plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
    summary = {"objective": run.cfg.objective.name, **summary, **peak_memory(run.device),
               "data_manifest_sha256": run.splits.manifest_hash(),
               "total_seconds": round(time.perf_counter() - run.t_start, 1)}
    if run.cfg.parent_run:
        summary["parent_run"] = run.cfg.parent_run
    write_json(run.run_dir / "summary.json", summary)
    console.print(f"[bold green]done[/] in {summary['total_seconds']:.0f}s: {run.run_dir}")
    return run.run_dir
