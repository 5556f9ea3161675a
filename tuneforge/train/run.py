"""The one train entry. Reads top to bottom: setup -> data -> model -> train -> save -> evaluate.

Every run is a folder: config.yaml (resolved), environment.json, data_report.json,
metrics.jsonl, loss.png, checkpoints/, adapter/ (standard peft), eval.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from datetime import datetime
from importlib import import_module
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file, save_file
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tuneforge.config import ConfigError, RunConfig, to_yaml

from tuneforge.plugins import validate_config
from tuneforge.data.render import pad_batch
from tuneforge.evaluate.task import evaluate_rows
from tuneforge.io import atomic_write_text, write_json
from tuneforge.methods import METHODS, count_trainable
from tuneforge.models.load import load_causal_lm, load_tokenizer, meta_module_names
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.objectives import OBJECTIVES
from tuneforge.plan import ensure_fits
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import distributed
from tuneforge.train.callbacks import EarlyStopping, NanGuard, TrainingDiverged, scale_lr
from tuneforge.train.continual import EWC, diagonal_fisher, init_from
from tuneforge.hardware import environment, peak_memory, pick_device, pick_dtype
from tuneforge.allocator import free_memory_releaser
from tuneforge.train import fused_lora, lean, varlen
from tuneforge.train.loop import epoch_batches, total_steps, trained_tokens, validation_loss
from tuneforge.hardware import autocast, to_device
from tuneforge.train.multitask import Task, load_tasks, task_configs, training_mixture
from tuneforge.evaluate.plots import plot_losses
from tuneforge.train.privacy import dp_loss_scale, make_private


def preflight(cfg: RunConfig) -> None:
    """Checks that need the model's config (not its weights): all problems at once."""
    problems = []
    try:
        names = meta_module_names(cfg.model.name, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - reported as a config problem, with the loader's message
        raise ConfigError([f"model.name: {e}"]) from None
    problems += METHODS[cfg.method.name].check(cfg.method, names)
    problems += OBJECTIVES[cfg.objective.name].check(cfg.objective)
    tasks = [t for t, _ in task_configs(cfg)]
    for spec in [s for t in tasks for s in (*t.train, *t.validation, *t.test)]:
        if not spec.startswith("builtin:") and not Path(spec).exists():
            problems.append(f"data: '{spec}' does not exist (working directory: {Path.cwd()})")
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        problems.append(f"train.init_from: {cfg.train.init_from} does not exist")
    if cfg.privacy is not None:
        if cfg.continual.ewc_lambda:
            problems.append("privacy with continual.ewc_lambda: DP-SGD replaces the gradient with its noisy "
                            "clipped per-example sum, so the EWC gradient would be dropped; use replay instead")
        if cfg.data.packing:
            problems.append("privacy with data.packing: DP bounds each sequence's gradient, and a packed "
                            "sequence holds several examples; set data.packing=false")
    if problems:
        raise ConfigError(problems)


def new_run_dir(cfg: RunConfig, create: bool = True) -> Path:
    name = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.name}"
    run_dir = Path(cfg.output_dir) / name
    if create:
        if (run_dir / "config.yaml").exists():
            raise FileExistsError(f"{run_dir} already holds a run; pick another run_name or resume it with --resume")
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False) -> Path:
    """``on_eval(step, val_loss)`` is called after every validation (a sweep prunes from it)."""
    if OBJECTIVES[cfg.objective.name].recipe:  # pairs, heads, online RL: a loop of their own
        return import_module(OBJECTIVES[cfg.objective.name].recipe).train(cfg, resume, console or Console())
    t_start = time.perf_counter()

    # --- setup -------------------------------------------------------------------------
    preflight(cfg)
    device = pick_device(cfg.train.device)
    world = distributed.setup(device)
    main = world.is_main  # only rank 0 writes files and prints
    console = (console or Console()) if main else Console(quiet=True)
    if world.size > 1 and cfg.privacy is not None:
        raise ConfigError(["privacy with --nproc > 1 is not supported (Opacus needs DPDDP); train on one process"])
    sharded = world.size > 1 and cfg.train.distributed == "fsdp"  # one process: nothing to shard
    dtype = pick_dtype(cfg.train.dtype, device)
    if not force:  # the estimate of `tuneforge plan`: refuse, with the fix, a run that cannot fit
        ensure_fits(cfg, device)
    run_dir = resume or new_run_dir(cfg, create=main)
    if main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        write_json(run_dir / "environment.json", environment(device, dtype)
                   | {"world_size": world.size, "distributed": cfg.train.distributed if world.size > 1 else None})
    distributed.barrier(world)
    method, objective = METHODS[cfg.method.name], OBJECTIVES[cfg.objective.name]
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    console.print(f"[bold]run[/] {run_dir}  device={device} dtype={str(dtype).replace('torch.', '')}"
                  + (f"  processes={world.size} ({cfg.train.distributed})" if world.size > 1 else ""))

    # --- data --------------------------------------------------------------------------
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    tasks = load_tasks(cfg, tok, objective)
    for task in tasks:
        if not task.earlier and not task.enc["train"].rows:
            raise ConfigError([f"every training row of task {task.name} is longer than data.max_length="
                               f"{cfg.data.max_length}: raise it or set data.overlength=truncate "
                               f"({task.enc['train'].examples[:1]})"])
    train_rows, mixture = training_mixture(tasks, cfg)
    if main:
        report_tasks(run_dir, tasks, mixture, console)

    # --- model -------------------------------------------------------------------------
    model, per_example_attention = load_model(cfg, method, dtype, device, tok)
    padding_free = cfg.train.padding_free and per_example_attention and not cfg.data.packing
    if cfg.train.init_from:
        n = init_from(model, cfg.train.init_from)
        console.print(f"continuing from {cfg.train.init_from} ({n} tensors)")
    n_train, n_total = count_trainable(model)
    console.print(f"[bold]{cfg.method.name}[/]: {n_train:,} trainable of {n_total:,} parameters "
                  f"({100 * n_train / n_total:.3f}%)"
                  + ("; batches padding-free" if padding_free else "; packed" if cfg.data.packing else ""))
    hidden_path = cfg.train.logits_at_trained_only and getattr(method, "supports_hidden_path", True)
    # Under FSDP the loss runs through the root that gathers the weights (train/distributed.py).
    loss_of = distributed.shard(model, objective) if sharded else objective

    # --- optimizer and schedule --------------------------------------------------------
    from transformers import get_scheduler

    t = cfg.train
    opts = cfg.objective
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of ~10 small ops per tensor per step.
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
    batches = lambda epoch: epoch_batches(train_rows, epoch, t.seed, t.batch_size,  # noqa: E731
                                          cfg.data.packing, cfg.data.max_length, tok.pad_token_id, padding_free)
    epoch_cache = {0: batches(0)}
    micro_per_step = t.grad_accum * world.size
    steps = total_steps(len(epoch_cache[0]), micro_per_step, t.epochs, t.max_steps)
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    val_batches = {task.name: epoch_batches(task.enc["validation"].rows, 0, t.seed, t.batch_size, False,
                                            cfg.data.max_length, tok.pad_token_id)
                   for task in tasks if task.enc["validation"].rows}
    selected = [task.name for task in tasks if not task.earlier and task.name in val_batches]

    extra_loss = None
    if cfg.continual.ewc_lambda:
        fisher = diagonal_fisher(model, objective, opts, fisher_batches(tasks, cfg, tok.pad_token_id),
                                 device=device, dtype=dtype, hidden_path=hidden_path)
        extra_loss = EWC(model, fisher, cfg.continual.ewc_lambda)
        if main:  # which weights the earlier tasks rely on: kept for inspection
            save_file({n: f.contiguous() for n, f in fisher.items()}, str(run_dir / "fisher.safetensors"))
        console.print(f"EWC: Fisher from {cfg.continual.fisher_rows} earlier-task rows, lambda "
                      f"{cfg.continual.ewc_lambda}")
    private = None
    if cfg.privacy is not None:
        private = make_private(model, optimizer, cfg.privacy, micro_batch_size=t.batch_size,
                               rows_per_step=t.batch_size * t.grad_accum, n_rows=len(train_rows), steps=steps)
        console.print(f"DP-SGD: noise multiplier {private.noise_multiplier:.3f}, per-example clip "
                      f"{cfg.privacy.max_grad_norm}, sample rate {private.sample_rate:.4f}")
    step_optimizer = private.optimizer if private else optimizer

    pos, last = ckpt.Position(), None
    metrics_path = run_dir / "metrics.jsonl"
    restored = (ckpt.restore_latest(run_dir, model, optimizer, scheduler, metrics_path if main else None)
                if resume else None)
    if restored is not None:
        pos, last = restored
        console.print(f"resumed from {last} (step {pos.step}, epoch {pos.epoch}, batch {pos.micro})")
    elif main and metrics_path.exists():
        metrics_path.unlink()
    stopper = EarlyStopping.replay(t.early_stopping_patience, t.early_stopping_min_delta,
                                   _eval_history(metrics_path) if resume else [])
    guard = NanGuard(t.nan_lr_factor)
    best_path = run_dir / "checkpoints" / "best.safetensors"

    def log(row: dict) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    # --- train -------------------------------------------------------------------------
    model.train()

    def next_batch():
        if pos.micro >= len(epoch_cache.setdefault(pos.epoch, batches(pos.epoch))):
            epoch_cache.pop(pos.epoch, None)
            pos.epoch, pos.micro = pos.epoch + 1, 0
            epoch_cache[pos.epoch] = batches(pos.epoch)
        b = epoch_cache[pos.epoch][pos.micro]
        pos.micro += 1
        return b

    def save(rng=None, at: ckpt.Position | None = None):
        path = None
        if main or sharded:  # under FSDP every rank takes part in gathering the shards
            path = ckpt.save_checkpoint(run_dir / "checkpoints", at or pos, model, optimizer, scheduler,
                                        rng or ckpt.rng_state(), t.keep_checkpoints, write=main)
        distributed.barrier(world)
        return path

    def roll_back(loss: float) -> EarlyStopping:
        """NaN guard: drop this step, restore the last checkpoint, lower the LR; returns the
        early stopper as it was at that checkpoint."""
        step_optimizer.zero_grad(set_to_none=True)
        bad_step = pos.step + 1
        loaded, good = ckpt.restore_latest(run_dir, model, optimizer, scheduler, metrics_path if main else None)
        vars(pos).update(vars(loaded))
        scale_lr(optimizer, scheduler, t.nan_lr_factor)
        log({"kind": "rollback", "step": pos.step, "bad_step": bad_step, "loss": str(loss),
             "lr_factor": t.nan_lr_factor})
        console.print(f"[yellow]loss {loss} at step {bad_step}[/]: rolled back to {good.name}, LR x{t.nan_lr_factor}")
        return EarlyStopping.replay(t.early_stopping_patience, t.early_stopping_min_delta, _eval_history(metrics_path))

    if last is None:
        save()  # step 0: the NaN guard always has a good state to roll back to

    progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console)
    release = free_memory_releaser() if t.release_memory and device == "cpu" else None
    tokens_seen, tps, t_loop = 0, 0.0, time.perf_counter()
    with progress:
        bar = progress.add_task("train", total=steps, completed=pos.step, info="")
        while pos.step < steps:
            method.on_step(model, pos.step)
            # Interrupt safety: weights only change at optimizer.step(), so the state at the
            # start of the window (position + RNG) is a consistent point to resume from.
            window_start = ckpt.Position(**vars(pos))
            rng_before = ckpt.rng_state()
            try:
                window = [next_batch() for _ in range(micro_per_step)]
                n_tok = sum(trained_tokens(b) for b in window)
                # One normalisation for the whole window: every trained token weighs the same.
                # Under DP each example's gradient is taken at its own scale (see privacy.py).
                scale = (dp_loss_scale(sum(len(b["input_ids"]) for b in window), n_tok) if private
                         else 1 / max(n_tok, 1))
                loss_total = 0.0
                for b in window[world.rank :: world.size]:
                    with autocast(device, dtype):
                        loss_sum, _ = loss_of.loss(model, to_device(b, device), opts, hidden_path=hidden_path)
                    (loss_sum * scale).backward()
                    loss_total += loss_sum.item()
                loss = distributed.all_sum(world, loss_total) / max(n_tok, 1)
                if not sharded:  # FSDP has reduce-scattered them during backward
                    distributed.sum_gradients(world, params)
                penalty = None
                if extra_loss is not None:
                    penalty = extra_loss()
                    penalty.backward()
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm and not private
                             else torch.tensor(0.0))
                if guard.check(loss, pos.step + 1):
                    stopper = roll_back(loss)
                    progress.update(bar, completed=pos.step)
                    continue
                step_optimizer.step()
                scheduler.step()
                step_optimizer.zero_grad(set_to_none=True)
                if release:
                    release()
            except KeyboardInterrupt:
                step_optimizer.zero_grad(set_to_none=True)
                ckpt.exit_interrupted(save(rng_before, window_start), run_dir, console)
            pos.step += 1
            tokens_seen += sum(int(b["n_real"]) for b in window)
            tps = tokens_seen / (time.perf_counter() - t_loop)
            lr = scheduler.get_last_lr()[0]
            row = {"kind": "train", "step": pos.step, "epoch": pos.epoch, "loss": round(loss, 5), "lr": lr,
                   "grad_norm": round(float(distributed.whole(grad_norm)), 4), "tokens_per_s": round(tps, 1),
                   "trained_tokens": n_tok}
            if penalty is not None:
                row["ewc_penalty"] = round(penalty.item(), 6)
            log(row)
            progress.update(bar, advance=1, info=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
            is_last = pos.step == steps
            if val_batches and ((t.eval_every and pos.step % t.eval_every == 0) or is_last):
                per_task = {name: validation_loss(model, loss_of, opts, vb, device=device, dtype=dtype,
                                                  hidden_path=hidden_path) for name, vb in val_batches.items()}
                vl = sum(per_task[n] for n in selected) / max(len(selected), 1)
                row = {"kind": "eval", "step": pos.step, "val_loss": round(vl, 5)}
                if len(per_task) > 1:
                    row |= {f"val_loss/{n}": round(v, 5) for n, v in per_task.items()}
                if private:
                    row["epsilon"] = round(private.epsilon(pos.step), 4)
                log(row)
                progress.console.print(f"step {pos.step}: train loss {loss:.4f}  validation loss {vl:.4f}"
                                       + "".join(f"  {n} {v:.4f}" for n, v in per_task.items() if len(per_task) > 1))
                if not math.isfinite(vl):
                    # Weights blown up enough that held-out rows overflow while the training
                    # loss still looks finite: the run is lost either way, so say so (a sweep
                    # marks the trial failed instead of keeping its earlier score).
                    raise TrainingDiverged(f"validation loss is {vl} at step {pos.step}: lower train.lr, use "
                                           "train.dtype=fp32, or check the data")
                if stopper.update(pos.step, vl) and t.early_stopping_patience and (main or sharded):
                    best = ckpt.trainable_state(model, keep=main)
                    if main:
                        save_file(best, str(best_path))
                if on_eval is not None:
                    on_eval(pos.step, vl)
                if stopper.should_stop and not is_last:
                    progress.console.print(f"[yellow]early stop[/]: no validation improvement in "
                                           f"{stopper.patience} evaluations; best {stopper.best:.4f} at step "
                                           f"{stopper.best_step}")
                    save()
                    break
            if (t.save_every and pos.step % t.save_every == 0) or is_last:
                save()
    train_seconds = time.perf_counter() - t_loop
    if private:
        private.close()
    distributed.barrier(world)
    trained = ckpt.trainable_state(model, keep=main) if sharded else None
    if not main:
        distributed.teardown(world)
        return run_dir
    if sharded:  # rank 0 goes on alone (save, evaluate), so with whole weights in an unsharded model
        model, _ = load_model(cfg, method, dtype, device, tok)
        restore_trainable(model, trained)

    # --- save --------------------------------------------------------------------------
    summary = {"steps": pos.step, "train_seconds": round(train_seconds, 1), "tokens_per_s": round(tps, 1),
               **peak_memory(device), "trainable_params": n_train, "total_params": n_total,
               "data_manifest_sha256": _manifest_hash(tasks), "world_size": world.size}
    if t.early_stopping_patience and best_path.exists():
        # Keep-best: the adapter users get is the one with the lowest validation loss.
        restore_trainable(model, load_file(str(best_path)))
        summary |= {"best_step": stopper.best_step, "best_val_loss": round(stopper.best, 5),
                    "stopped_early": pos.step < steps}
    if private:
        summary["privacy"] = private.report(cfg.privacy.max_grad_norm, pos.step)
        console.print(f"DP-SGD: epsilon {summary['privacy']['epsilon']:.2f} at delta {cfg.privacy.delta:g}")
    method.save(model, run_dir / "adapter")
    tok.save_pretrained(run_dir / "adapter")
    plot_losses(metrics_path, run_dir / "loss.png")

    # --- evaluate ----------------------------------------------------------------------
    if cfg.eval.metric != "none" and objective.evaluate and tasks[0].splits.test:
        summary["eval"] = objective.evaluate(model, tok, tasks[0].splits.test, cfg, method, device, dtype, run_dir,
                                             console)
    elif cfg.eval.metric != "none":
        evaluated = [task for task in tasks if task.splits.test]
        scores = {task.name: evaluate_run(model, tok, task.splits.test, cfg, method, device, dtype, run_dir, console,
                                          tag="" if len(tasks) == 1 else f"-{task.name}")
                  for task in evaluated}
        if scores:
            summary["eval"] = scores[evaluated[0].name] if len(tasks) == 1 else scores
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(run_dir / "summary.json", summary)
    distributed.teardown(world)
    console.print(f"[bold green]done[/] in {summary['total_seconds']:.0f}s: {run_dir}")
    return run_dir


def load_model(cfg: RunConfig, method, dtype: torch.dtype, device: str, tok):
    """The base model prepared for the method; also whether rows laid end to end (padding-free
    batches, packing) attend per example (train/varlen.py)."""
    model = load_causal_lm(cfg.model.name, method.base_dtype(cfg.method, dtype), device,
                           cfg.model.attn_implementation, cfg.model.revision, cfg.model.trust_remote_code,
                           method.quantization_config(cfg.method, dtype))
    fix_chat_tokenizer(tok, model)
    per_example_attention = ((cfg.train.padding_free or cfg.data.packing) and getattr(method, "padding_free", True)
                             and cfg.privacy is None and varlen.enable(model))
    if cfg.train.lean_activations:
        lean.enable(model)
    if cfg.train.gradient_checkpointing:  # recompute each block's activations in backward: less memory, ~1/3 more time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = method.apply(model, cfg.method)
    if cfg.train.fused_lora and cfg.privacy is None:  # DP-SGD's per-example gradients hook lora_A/lora_B
        fused_lora.enable(model)
    return model, per_example_attention


def fisher_batches(tasks: list[Task], cfg: RunConfig, pad_id: int) -> list[dict]:
    """One-example batches of earlier-task training rows for the Fisher estimate (seeded)."""
    rows = [r for task in tasks if task.earlier for r in task.enc["train"].rows]
    picked = random.Random(cfg.train.seed).sample(rows, min(cfg.continual.fisher_rows, len(rows)))
    return [pad_batch([r], pad_id) for r in picked]


def restore_trainable(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)


def evaluate_run(model, tok, test_rows, cfg: RunConfig, method, device, dtype, run_dir, console, tag: str = "") -> dict:
    """Base vs tuned on one task's test rows -> eval{tag}.json, eval_samples{tag}.jsonl."""
    kw = dict(device=device, autocast_dtype=None if dtype == torch.float32 else dtype,
              system_prompt=cfg.data.system_prompt)
    results = {}
    if cfg.eval.baseline and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            results["base"] = evaluate_rows(model, tok, test_rows, cfg.eval, label=f"base model{tag}", **kw)
    results["tuned"] = evaluate_rows(model, tok, test_rows, cfg.eval, label=f"tuned model{tag}", **kw)
    with open(run_dir / f"eval_samples{tag}.jsonl", "w") as f:
        for who, r in results.items():
            for s in r.pop("samples"):
                f.write(json.dumps({"model": who, **s}) + "\n")
    write_json(run_dir / f"eval{tag}.json", results)
    print_before_after(results, console, tag.lstrip("-"))
    return {who: r["scores"] for who, r in results.items()}


def print_before_after(results: dict, console: Console, task: str = "") -> None:
    metrics = list(results["tuned"]["scores"])
    table = Table(title=f"held-out test set{f' of {task}' if task else ''} ({results['tuned']['n']} rows)")
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


def data_report(splits, enc: dict) -> dict:
    return {"manifest_sha256": splits.manifest_hash(), "prepared": splits.prepared,
            "rows": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
            "load": {k: v.as_dict() for k, v in splits.reports.items()},
            "render": {k: {"kept": len(e.rows), "dropped": dict(e.dropped), "truncated": e.truncated,
                           "examples": e.examples} for k, e in enc.items()}}


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


def _manifest_hash(tasks: list[Task]) -> str:
    if len(tasks) == 1:
        return tasks[0].splits.manifest_hash()
    return hashlib.sha256("".join(f"{t.name}:{t.splits.manifest_hash()}" for t in tasks).encode()).hexdigest()


def _eval_history(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
