"""The parts every objective recipe shares: a run folder, its data, an optimizer, and a
plain loop that logs what the objective reports. The token-loss recipe (run.py) has its
own loop (resume, token-weighted accumulation); recipes whose loss is a mean over pairs,
examples or prompts use this one.
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

from tuneforge.config import ConfigError, RunConfig, to_yaml
from tuneforge.data.prepare import Splits, build_splits
from tuneforge.io import atomic_write_text, write_json
from tuneforge.train.hardware import environment, pick_device, pick_dtype
from tuneforge.train.loop import autocast, to_device, total_steps


@dataclass
class RunStart:
    cfg: RunConfig
    run_dir: Path
    device: str
    dtype: torch.dtype
    splits: Splits
    t_start: float = field(default_factory=time.perf_counter)


def start_run(cfg: RunConfig, resume: Path | None, console: Console) -> RunStart:
    """Validate, make the run folder, record config and environment, load and split the data."""
    from tuneforge.objectives import OBJECTIVES
    from tuneforge.train.run import new_run_dir, preflight

    if resume is not None:
        raise ConfigError([f"--resume is supported for token-loss objectives (sft, cpt, distill), not "
                           f"'{cfg.objective.name}': start a new run"])
    preflight(cfg)
    run_dir = new_run_dir(cfg)
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
    return RunStart(cfg, run_dir, device, dtype, splits)


def fit(model, batches: Callable[[int], list], step_loss: Callable[[dict], tuple[torch.Tensor, dict]],
        evaluate: Callable[[], dict] | None, run: RunStart, console: Console) -> dict:
    """Train ``model`` on ``batches(epoch)`` (micro-batches, fixed order per epoch and seed).

    ``step_loss(batch) -> (mean loss, {metric: float})``; accumulated micro-batches are
    averaged (these losses are means over pairs/examples, not sums over tokens).
    ``evaluate() -> {metric: float}`` runs every train.eval_every steps and at the end.
    Returns the last evaluation (empty without one).
    """
    from transformers import get_scheduler

    t, device, dtype = run.cfg.train, run.device, run.dtype
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    epoch, micro, cache = 0, 0, batches(0)
    steps = total_steps(len(cache), t.grad_accum, t.epochs, t.max_steps)
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    last_eval: dict = {}
    model.train()
    with open(run.run_dir / "metrics.jsonl", "w") as log:
        for step in range(1, steps + 1):
            sums: dict[str, float] = {}
            for _ in range(t.grad_accum):
                if micro == len(cache):
                    epoch, micro, cache = epoch + 1, 0, batches(epoch + 1)
                with autocast(device, dtype):
                    loss, metrics = step_loss(to_device(cache[micro], device))
                micro += 1
                (loss / t.grad_accum).backward()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v / t.grad_accum
            if not all(map(lambda v: v == v and abs(v) != float("inf"), sums.values())):
                raise FloatingPointError(f"non-finite metrics at step {step}: {sums}; lower train.lr or use fp32")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"kind": "train", "step": step, "epoch": epoch, **{k: round(v, 5) for k, v in sums.items()},
                   "lr": scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                row["grad_norm"] = round(float(grad_norm), 4)
            log.write(json.dumps(row) + "\n")
            shown = "  ".join(f"{k} {v:.4f}" for k, v in sums.items())
            console.print(f"step {step}/{steps}  {shown}")
            if evaluate and ((t.eval_every and step % t.eval_every == 0) or step == steps):
                model.eval()
                with torch.no_grad(), autocast(device, dtype):
                    last_eval = evaluate()
                model.train()
                log.write(json.dumps({"kind": "eval", "step": step, **last_eval}) + "\n")
                console.print(f"step {step} validation: " + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            log.flush()
    return last_eval | {"steps": steps}


def finish(run: RunStart, summary: dict, console: Console) -> Path:
    from tuneforge.train.hardware import peak_rss_mb
    from tuneforge.train.plots import plot_losses

    plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
    summary = {"objective": run.cfg.objective.name, **summary, "peak_rss_mb": round(peak_rss_mb()),
               "data_manifest_sha256": run.splits.manifest_hash(),
               "total_seconds": round(time.perf_counter() - run.t_start, 1)}
    if run.cfg.parent_run:
        summary["parent_run"] = run.cfg.parent_run
    write_json(run.run_dir / "summary.json", summary)
    console.print(f"[bold green]done[/] in {summary['total_seconds']:.0f}s: {run.run_dir}")
    return run.run_dir
