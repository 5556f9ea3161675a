"""The one train entry. Reads top to bottom: setup -> data -> model -> train -> save -> evaluate.

Every run is a folder: config.yaml (resolved), environment.json, data_report.json,
metrics.jsonl, loss.png, checkpoints/, adapter/ (standard peft), eval.json.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from importlib import import_module
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tuneforge.config import ConfigError, RunConfig, to_yaml, validate_config
from tuneforge.data.prepare import build_splits
from tuneforge.evaluate.task import evaluate_rows
from tuneforge.io import atomic_write_text, write_json
from tuneforge.methods import METHODS, count_trainable
from tuneforge.models.load import load_causal_lm, load_tokenizer, meta_module_names
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.objectives import OBJECTIVES
from tuneforge.train import checkpoint as ckpt
from tuneforge.train.hardware import environment, peak_rss_mb, pick_device, pick_dtype
from tuneforge.train.loop import autocast, epoch_batches, to_device, total_steps, trained_tokens, validation_loss
from tuneforge.train.plots import plot_losses


def preflight(cfg: RunConfig) -> None:
    """Checks that need the model's config (not its weights): all problems at once."""
    problems = []
    try:
        names = meta_module_names(cfg.model.name, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - reported as a config problem, with the loader's message
        raise ConfigError([f"model.name: {e}"]) from None
    problems += METHODS[cfg.method.name].check(cfg.method, names)
    for spec in [*cfg.data.train, *cfg.data.validation, *cfg.data.test]:
        if not spec.startswith("builtin:") and not Path(spec).is_file():
            problems.append(f"data: file '{spec}' does not exist (working directory: {Path.cwd()})")
    if problems:
        raise ConfigError(problems)


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.name}"
    run_dir = Path(cfg.output_dir) / name
    if (run_dir / "config.yaml").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pick another run_name or resume it with --resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None) -> Path:
    console = console or Console()
    if OBJECTIVES[cfg.objective.name].recipe:  # pairs, heads, online RL: a loop of their own
        return import_module(OBJECTIVES[cfg.objective.name].recipe).train(cfg, resume, console)
    t_start = time.perf_counter()

    # --- setup -------------------------------------------------------------------------
    preflight(cfg)
    run_dir = resume or new_run_dir(cfg)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    write_json(run_dir / "environment.json", environment(device, dtype))
    method, objective = METHODS[cfg.method.name], OBJECTIVES[cfg.objective.name]
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    console.print(f"[bold]run[/] {run_dir}  device={device} dtype={str(dtype).replace('torch.', '')}")

    # --- data --------------------------------------------------------------------------
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    splits = build_splits(cfg.data, cfg.train.seed, objective.data_kind)
    enc = {name: objective.encode(tok, getattr(splits, name), cfg.data) for name in ("train", "validation")}
    if not enc["train"].rows:
        raise ConfigError([f"every training row is longer than data.max_length={cfg.data.max_length}: "
                           f"raise it or set data.overlength=truncate ({enc['train'].examples[:1]})"])
    report_data(run_dir, splits, enc, console)

    # --- model -------------------------------------------------------------------------
    model = load_causal_lm(cfg.model.name, method.base_dtype(cfg.method, dtype), device,
                           cfg.model.attn_implementation, cfg.model.revision, cfg.model.trust_remote_code)
    fix_chat_tokenizer(tok, model)
    model = method.apply(model, cfg.method)
    n_train, n_total = count_trainable(model)
    console.print(f"[bold]{cfg.method.name}[/]: {n_train:,} trainable of {n_total:,} parameters "
                  f"({100 * n_train / n_total:.3f}%)")
    hidden_path = cfg.train.logits_at_trained_only and getattr(method, "supports_hidden_path", True)

    # --- optimizer and schedule --------------------------------------------------------
    from transformers import get_scheduler

    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    batches = lambda epoch: epoch_batches(enc["train"].rows, epoch, t.seed, t.batch_size,  # noqa: E731
                                          cfg.data.packing, cfg.data.max_length, tok.pad_token_id)
    epoch_cache = {0: batches(0)}
    steps = total_steps(len(epoch_cache[0]), t.grad_accum, t.epochs, t.max_steps)
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    val_batches = epoch_batches(enc["validation"].rows, 0, t.seed, t.batch_size, False, cfg.data.max_length,
                                tok.pad_token_id) if enc["validation"].rows else []

    pos = ckpt.Position()
    metrics_path = run_dir / "metrics.jsonl"
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    if last is not None:
        pos, rng = ckpt.load_checkpoint(last, model, optimizer, scheduler)
        ckpt.set_rng_state(rng)
        _truncate_metrics(metrics_path, pos.step)
        console.print(f"resumed from {last} (step {pos.step}, epoch {pos.epoch}, batch {pos.micro})")
    elif metrics_path.exists():
        metrics_path.unlink()

    # --- train -------------------------------------------------------------------------
    model.train()
    opts = cfg.objective

    def next_batch():
        if pos.micro >= len(epoch_cache.setdefault(pos.epoch, batches(pos.epoch))):
            epoch_cache.pop(pos.epoch, None)
            pos.epoch, pos.micro = pos.epoch + 1, 0
            epoch_cache[pos.epoch] = batches(pos.epoch)
        b = epoch_cache[pos.epoch][pos.micro]
        pos.micro += 1
        return b

    def save(rng=None, at: ckpt.Position | None = None):
        return ckpt.save_checkpoint(run_dir / "checkpoints", at or pos, model, optimizer, scheduler,
                                    rng or ckpt.rng_state(), t.keep_checkpoints)

    progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console)
    tokens_seen, tps, t_loop = 0, 0.0, time.perf_counter()
    with progress, open(metrics_path, "a") as mlog:
        bar = progress.add_task("train", total=steps, completed=pos.step, info="")
        while pos.step < steps:
            # Interrupt safety: weights only change at optimizer.step(), so the state at the
            # start of the window (position + RNG) is a consistent point to resume from.
            window_start = ckpt.Position(**vars(pos))
            rng_before = ckpt.rng_state()
            try:
                window = [next_batch() for _ in range(t.grad_accum)]
                n_tok = sum(trained_tokens(b) for b in window)
                loss_total = 0.0
                for b in window:
                    with autocast(device, dtype):
                        loss_sum, _ = objective.loss(model, to_device(b, device), opts, hidden_path=hidden_path)
                    # One normalisation for the whole window: every trained token weighs the same.
                    (loss_sum / max(n_tok, 1)).backward()
                    loss_total += loss_sum.item()
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm
                             else torch.tensor(0.0))
                loss = loss_total / max(n_tok, 1)
                if not torch.isfinite(torch.tensor(loss)):
                    raise FloatingPointError(f"loss is {loss} at step {pos.step + 1}: lower train.lr or use fp32")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except KeyboardInterrupt:
                optimizer.zero_grad(set_to_none=True)
                path = save(rng_before, window_start)
                console.print(f"[yellow]interrupted[/]: checkpoint {path}. Continue with: "
                              f"tuneforge train --resume {run_dir}")
                raise SystemExit(130) from None
            pos.step += 1
            tokens_seen += sum(int(b["n_real"]) for b in window)
            tps = tokens_seen / (time.perf_counter() - t_loop)
            lr = scheduler.get_last_lr()[0]
            row = {"kind": "train", "step": pos.step, "epoch": pos.epoch, "loss": round(loss, 5), "lr": lr,
                   "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tps, 1), "trained_tokens": n_tok}
            mlog.write(json.dumps(row) + "\n")
            progress.update(bar, advance=1, info=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
            is_last = pos.step == steps
            if val_batches and ((t.eval_every and pos.step % t.eval_every == 0) or is_last):
                vl = validation_loss(model, objective, opts, val_batches, device=device, dtype=dtype,
                                     hidden_path=hidden_path)
                mlog.write(json.dumps({"kind": "eval", "step": pos.step, "val_loss": round(vl, 5)}) + "\n")
                progress.console.print(f"step {pos.step}: train loss {loss:.4f}  validation loss {vl:.4f}")
            mlog.flush()
            if (t.save_every and pos.step % t.save_every == 0) or is_last:
                save()
    train_seconds = time.perf_counter() - t_loop

    # --- save --------------------------------------------------------------------------
    method.save(model, run_dir / "adapter")
    tok.save_pretrained(run_dir / "adapter")
    plot_losses(metrics_path, run_dir / "loss.png")
    summary = {"steps": pos.step, "train_seconds": round(train_seconds, 1), "tokens_per_s": round(tps, 1),
               "peak_rss_mb": round(peak_rss_mb()), "trainable_params": n_train, "total_params": n_total,
               "data_manifest_sha256": splits.manifest_hash()}

    # --- evaluate ----------------------------------------------------------------------
    if cfg.eval.metric != "none" and splits.test:
        evaluate = objective.evaluate or evaluate_run
        summary["eval"] = evaluate(model, tok, splits.test, cfg, method, device, dtype, run_dir, console)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(run_dir / "summary.json", summary)
    console.print(f"[bold green]done[/] in {summary['total_seconds']:.0f}s: {run_dir}")
    return run_dir


def evaluate_run(model, tok, test_rows, cfg: RunConfig, method, device, dtype, run_dir, console) -> dict:
    kw = dict(device=device, autocast_dtype=None if dtype == torch.float32 else dtype,
              system_prompt=cfg.data.system_prompt)
    results = {}
    if cfg.eval.baseline and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            results["base"] = evaluate_rows(model, tok, test_rows, cfg.eval, label="base model", **kw)
    results["tuned"] = evaluate_rows(model, tok, test_rows, cfg.eval, label="tuned model", **kw)
    with open(run_dir / "eval_samples.jsonl", "w") as f:
        for who, r in results.items():
            for s in r.pop("samples"):
                f.write(json.dumps({"model": who, **s}) + "\n")
    write_json(run_dir / "eval.json", results)
    print_before_after(results, console)
    return {who: r["scores"] for who, r in results.items()}


def print_before_after(results: dict, console: Console) -> None:
    metrics = list(results["tuned"]["scores"])
    table = Table(title=f"held-out test set ({results['tuned']['n']} rows)")
    table.add_column("metric")
    for who in results:
        table.add_column(who, justify="right")
    if "base" in results:
        table.add_column("change", justify="right")
    for m in metrics:
        vals = [results[w]["scores"][m] for w in results]
        cells = [f"{100 * v:.1f}%" for v in vals]
        if "base" in results:
            cells.append(f"{100 * (vals[-1] - vals[0]):+.1f} pts")
        table.add_row(m, *cells)
    console.print(table)


def report_data(run_dir: Path, splits, enc: dict, console: Console) -> None:
    report = {"manifest_sha256": splits.manifest_hash(),
              "rows": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
              "load": {k: v.as_dict() for k, v in splits.reports.items()},
              "render": {k: {"kept": len(e.rows), "dropped": dict(e.dropped), "truncated": e.truncated,
                             "examples": e.examples} for k, e in enc.items()}}
    write_json(run_dir / "data_report.json", report)
    for k, r in splits.reports.items():
        console.print(f"data {k}: {r.read} rows read, {r.kept} kept; format {r.format} ({r.format_reason})")
        for reason, n in r.dropped.items():
            console.print(f"  [yellow]dropped {n}[/] ({reason}), e.g. {r.examples[reason][0]}")
    for k, e in enc.items():
        for reason, n in e.dropped.items():
            console.print(f"  [yellow]{k}: dropped {n}[/] ({reason}), e.g. {e.examples[0]}")
        if e.truncated:
            console.print(f"  [yellow]{k}: truncated {e.truncated}[/] rows to max_length, e.g. {e.examples[0]}")
    console.print(f"splits: train {len(enc['train'].rows)}, validation {len(enc['validation'].rows)}, "
                  f"test {len(splits.test)}")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> RunConfig:
    from tuneforge.config import deep_merge, parse_overrides

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    return validate_config(deep_merge(raw, parse_overrides(list(overrides))), str(run_dir / "config.yaml"))
