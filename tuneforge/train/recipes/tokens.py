"""The token-loss recipe (sft, cpt, distill): setup -> data -> model -> train -> save -> evaluate.

The loss of an optimizer step is the summed token loss of its micro-batches over the window's
trained tokens, so every trained token weighs the same whatever the batch, accumulation or
process split. This recipe is the one that runs on several processes (ddp, fsdp), under
DP-SGD, with EWC and with several tasks.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from tuneforge.config import ConfigError, RunConfig, to_yaml
from tuneforge.data.render import pad_batch
from tuneforge.evaluate.intervals import paired_intervals, system_intervals
from tuneforge.evaluate.plots import plot_losses
from tuneforge.evaluate.task import evaluate_rows
from tuneforge.hardware import autocast, environment, path_note, peak_memory, pick_device, pick_dtype, to_device
from tuneforge.io import atomic_write_text, write_json
from tuneforge.methods import count_trainable
from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.plan import ensure_fits
from tuneforge.plugins import lr_note, method_of, objective_of
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import distributed, fused_lora, lean, moe_stats, varlen
from tuneforge.train.continual import EWC, diagonal_fisher, init_from
from tuneforge.train.loop import Loop, Window, restore_trainable
from tuneforge.train.multitask import Task, load_tasks, training_mixture
from tuneforge.train.privacy import dp_loss_scale
from tuneforge.train.run_folder import manifest_hash, new_run_dir, preflight, report_tasks, writable
from tuneforge.data.render import epoch_batches, trained_tokens
from tuneforge.train.token_batches import validation_loss, validation_losses


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False, tracker=None) -> Path:
    t_start = time.perf_counter()
    # --- setup -------------------------------------------------------------------------
    device, dtype, world, run_dir, console = setup(cfg, resume, console, force)
    main, sharded = world.is_main, world.size > 1 and cfg.train.distributed == "fsdp"  # one process: no shards
    method, objective = method_of(cfg), objective_of(cfg)

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
    opts = method.for_task(cfg.method, next(t for t in tasks if not t.earlier).splits.train, cfg.data.system_prompt)
    model, per_example_attention = load_model(cfg, method, dtype, device, tok, opts)
    padding_free = cfg.train.padding_free and per_example_attention and not cfg.data.packing
    if cfg.train.init_from:
        console.print(f"continuing from {cfg.train.init_from} ({init_from(model, cfg.train.init_from)} tensors)")
    n_train, n_total = count_trainable(model)
    console.print(f"[bold]{cfg.method.name}[/]: {n_train:,} trainable of {n_total:,} parameters "
                  f"({100 * n_train / n_total:.3f}%)"
                  + ("; batches padding-free" if padding_free else "; packed" if cfg.data.packing else ""))
    if lr_note(cfg):
        console.print(lr_note(cfg))
    hidden_path = cfg.train.logits_at_trained_only and getattr(method, "supports_hidden_path", True)
    # Under FSDP the loss runs through the root that gathers the weights (train/distributed.py).
    loss_of = distributed.shard(model, objective) if sharded else objective
    moe = moe_stats.attach(cfg, model, run_dir if main else None, console)  # None: not a mixture of experts
    if moe is not None:
        loss_of = moe.wrap(loss_of)  # the router's aux loss, expert utilisation
    steps = TokenSteps(cfg, model, loss_of, tok.pad_token_id, train_rows, tasks, world, device, dtype,
                       hidden_path, padding_free)
    if moe is not None and getattr(cfg.method, "moe", None) and cfg.method.moe.top_k_experts:
        moe.calibrate(model, steps.batches(0)[: cfg.method.moe.calibration_batches], device, dtype)

    # --- train -------------------------------------------------------------------------
    penalty = ewc_penalty(cfg, model, objective, tasks, tok, run_dir if main else None, device, dtype, hidden_path,
                          console) if cfg.continual.ewc_lambda else None
    outcome = Loop(cfg, run_dir, model, steps, method, device=device, dtype=dtype, console=console,
                   resume=resume is not None, on_eval=on_eval, world=world, sharded=sharded, penalty=penalty,
                   monitor=moe, tracker=tracker).run()
    trained = ckpt.trainable_state(model, keep=main) if sharded else None
    if not main:
        distributed.teardown(world)
        return run_dir
    if sharded:  # rank 0 goes on alone (save, evaluate), so with whole weights in an unsharded model
        model, _ = load_model(cfg, method, dtype, device, tok, opts)
        restore_trainable(model, trained)

    # --- save --------------------------------------------------------------------------
    summary = {"steps": outcome.steps, "train_seconds": round(outcome.train_seconds, 1),
               "tokens_per_s": round(outcome.tokens_per_s, 1), **peak_memory(device), "trainable_params": n_train,
               "total_params": n_total, "data_manifest_sha256": manifest_hash(tasks), "world_size": world.size,
               "lr": cfg.train.lr, **({"lr_note": lr_note(cfg)} if lr_note(cfg) else {}),
               **({"init_text": opts.init_text} if getattr(opts, "init_text", None) else {}), **outcome.best}
    if moe is not None:
        summary["moe"] = moe.finish()
    if outcome.privacy:
        summary["privacy"] = outcome.privacy
        console.print(f"DP-SGD: epsilon {outcome.privacy['epsilon']:.2f} at delta {cfg.privacy.delta:g}")
    method.save(model, run_dir / "adapter")
    tok.save_pretrained(run_dir / "adapter")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")

    # --- evaluate ----------------------------------------------------------------------
    if cfg.eval.metric != "none":
        scores = evaluate(cfg, model, tok, tasks, device, dtype, run_dir, console)
        if scores is not None:
            summary["eval"] = scores
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(run_dir / "summary.json", summary)
    distributed.teardown(world)
    console.print(f"[bold green]done[/] in {summary['total_seconds']:.0f}s: {run_dir}")
    return run_dir


def setup(cfg: RunConfig, resume: Path | None, console: Console | None, force: bool):
    """Checks, device and process group, the run folder's config.yaml and environment.json,
    seeds. Returns (device, dtype, world, run_dir, console); only rank 0 writes and prints."""
    preflight(cfg)
    device = pick_device(cfg.train.device)
    world = distributed.setup(device)
    console = (console or Console()) if world.is_main else Console(quiet=True)
    if world.size > 1 and cfg.privacy is not None:
        raise ConfigError(["privacy with --nproc > 1 is not supported (Opacus needs DPDDP); train on one process"])
    dtype = pick_dtype(cfg.train.dtype, device)
    if not force:  # the estimate of `tuneforge plan`: refuse, with the fix, a run that cannot fit
        ensure_fits(cfg, device)
    run_dir = resume or new_run_dir(cfg, create=world.is_main)
    if world.is_main and resume:
        writable(run_dir)  # a run folder made read-only since: a config error now, not at the first checkpoint
    if world.is_main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        write_json(run_dir / "environment.json", environment(device, dtype)
                   | {"world_size": world.size, "distributed": cfg.train.distributed if world.size > 1 else None})
    distributed.barrier(world)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    console.print(f"[bold]run[/] {run_dir}  device={device} dtype={str(dtype).replace('torch.', '')}"
                  + (f"  processes={world.size} ({cfg.train.distributed})" if world.size > 1 else ""))
    return device, dtype, world, run_dir, console


class TokenSteps:
    """The loop's view of a token objective: seeded micro-batches of the training mixture, the
    window's token-sum loss over its trained tokens, validation loss per task."""

    def __init__(self, cfg: RunConfig, model, loss_of, pad_id: int, train_rows: list[dict], tasks: list[Task],
                 world, device: str, dtype: torch.dtype, hidden_path: bool, padding_free: bool):
        self.cfg, self.model, self.loss_of, self.pad_id, self.rows = cfg, model, loss_of, pad_id, train_rows
        self.world, self.device, self.dtype, self.hidden_path = world, device, dtype, hidden_path
        self.padding_free, self.n_rows = padding_free, len(train_rows)
        # Only SFT: its loss never reads the prefix's own positions, and it has no second model
        # (distillation's teacher) that would read the shared layout as one long sequence.
        self.shared_prefix = padding_free and cfg.train.shared_prefix and cfg.objective.name == "sft"
        t = cfg.train
        # Laid out as the training batches are (padding-free, shared prefix): the same loss,
        # without computing padding or a shared instruction once per row. A classification
        # task is validated 4 times a pass, so on a CPU this was a fifth of its training time.
        self.val_batches = {task.name: epoch_batches(task.enc["validation"].rows, 0, t.seed, t.batch_size, False,
                                                     cfg.data.max_length, pad_id, padding_free, self.shared_prefix)
                            for task in tasks if task.enc["validation"].rows}
        # The early stopper and a sweep watch the tasks trained on, not the earlier ones.
        self.selected = [task.name for task in tasks if not task.earlier and task.name in self.val_batches]

    def batches(self, epoch: int) -> list[dict]:
        c = self.cfg
        return epoch_batches(self.rows, epoch, c.train.seed, c.train.batch_size, c.data.packing, c.data.max_length,
                             self.pad_id, self.padding_free, self.shared_prefix)

    def backward(self, window: list[dict]) -> Window:
        n_tok = sum(trained_tokens(b) for b in window)
        # One normalisation for the whole window: every trained token weighs the same.
        # Under DP each example's gradient is taken at its own scale (see privacy.py).
        scale = (dp_loss_scale(sum(len(b["input_ids"]) for b in window), n_tok) if self.cfg.privacy
                 else 1 / max(n_tok, 1))
        loss_total = 0.0
        for b in window[self.world.rank :: self.world.size]:  # this process's share of the window
            with autocast(self.device, self.dtype):
                loss_sum, _ = self.loss_of.loss(self.model, to_device(b, self.device), self.cfg.objective,
                                                hidden_path=self.hidden_path)
            (loss_sum * scale).backward()
            loss_total += loss_sum.item()
        loss = distributed.all_sum(self.world, loss_total) / max(n_tok, 1)
        # tokens: the rows' tokens (what tokens/s counts); computed_tokens: the positions the model
        # ran, fewer when rows share a prefix (what FLOPs and MFU are counted on).
        computed = sum(int(b.get("n_computed", b["n_real"])) for b in window)
        return Window(loss, tokens=sum(int(b["n_real"]) for b in window),
                      extra={"trained_tokens": n_tok, "computed_tokens": computed})

    def validate(self) -> dict[str, float] | None:
        if not self.val_batches:
            return None
        per_task = {name: validation_loss(self.model, self.loss_of, self.cfg.objective, vb, device=self.device,
                                          dtype=self.dtype, hidden_path=self.hidden_path)
                    for name, vb in self.val_batches.items()}
        scores = {"val_loss": sum(per_task[n] for n in self.selected) / max(len(self.selected), 1)}
        if len(per_task) > 1:
            scores |= {f"val_loss/{n}": v for n, v in per_task.items()}
        return scores


def load_model(cfg: RunConfig, method, dtype: torch.dtype, device: str, tok, opts=None):
    """The base model prepared for the method (``opts``: the method's options completed from the
    task, default ``cfg.method``); also whether rows laid end to end (padding-free batches,
    packing) attend per example (train/varlen.py)."""
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
    model = method.apply(model, opts or cfg.method)
    if cfg.train.fused_lora and cfg.privacy is None:  # DP-SGD's per-example gradients hook lora_A/lora_B
        fused_lora.enable(model)
    return model, per_example_attention


def ewc_penalty(cfg: RunConfig, model, objective, tasks: list[Task], tok, run_dir: Path | None, device, dtype,
                hidden_path: bool, console: Console) -> EWC:
    """EWC against forgetting the earlier tasks; the Fisher is kept in the run folder for inspection."""
    fisher = diagonal_fisher(model, objective, cfg.objective, fisher_batches(tasks, cfg, tok.pad_token_id),
                             device=device, dtype=dtype, hidden_path=hidden_path)
    if run_dir is not None:
        save_file({n: f.contiguous() for n, f in fisher.items()}, str(run_dir / "fisher.safetensors"))
    console.print(f"EWC: Fisher from {cfg.continual.fisher_rows} earlier-task rows, lambda {cfg.continual.ewc_lambda}")
    return EWC(model, fisher, cfg.continual.ewc_lambda)


def fisher_batches(tasks: list[Task], cfg: RunConfig, pad_id: int) -> list[dict]:
    """One-example batches of earlier-task training rows for the Fisher estimate (seeded)."""
    rows = [r for task in tasks if task.earlier for r in task.enc["train"].rows]
    picked = random.Random(cfg.train.seed).sample(rows, min(cfg.continual.fisher_rows, len(rows)))
    return [pad_batch([r], pad_id) for r in picked]


# --- held-out evaluation ----------------------------------------------------------------------


def evaluate(cfg: RunConfig, model, tok, tasks: list[Task], device, dtype, run_dir: Path, console) -> dict | None:
    """The objective's held-out measure: perplexity on text (cpt), else generated answers scored
    against the references (base vs tuned), per task with test rows."""
    objective = objective_of(cfg)
    if objective.held_out == "perplexity":
        if not tasks[0].splits.test:
            return None
        return evaluate_perplexity(cfg, model, tok, tasks[0].splits.test, device, dtype, run_dir, console)
    evaluated = [task for task in tasks if task.splits.test]
    scores = {task.name: evaluate_run(model, tok, task.splits.test, cfg, device, dtype, run_dir, console,
                                      tag="" if len(tasks) == 1 else f"-{task.name}")
              for task in evaluated}
    if not scores:
        return None
    return scores[evaluated[0].name] if len(tasks) == 1 else scores


def evaluate_perplexity(cfg: RunConfig, model, tok, test_rows, device, dtype, run_dir: Path, console) -> dict:
    """Held-out token loss and perplexity, before (adapter off) and after -> eval.json, with
    bootstrap intervals over rows (each system's and the paired change)."""
    objective = objective_of(cfg)
    enc = objective.encode(tok, test_rows, cfg.data)
    # One row per batch: the same summed loss as larger batches, and per-row losses to resample.
    batches = epoch_batches(enc.rows, 0, 0, 1, False, cfg.data.max_length, tok.pad_token_id)
    kw = dict(device=device, dtype=dtype, hidden_path=cfg.train.logits_at_trained_only)
    per_row = {}
    if cfg.eval.baseline and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            per_row["base"] = validation_losses(model, objective, cfg.objective, batches, **kw)
    per_row["tuned"] = validation_losses(model, objective, cfg.objective, batches, **kw)
    systems = {who: loss_system(rows) for who, rows in per_row.items()}
    scores = {who: {"loss": round(s["scores"]["loss"], 5), "perplexity": round(s["scores"]["perplexity"], 3)}
              for who, s in systems.items()}
    results = {who: scores[who] | {"intervals": system_intervals(s)} for who, s in systems.items()}
    if "base" in systems:
        results["comparison"] = {m: {"delta": systems["tuned"]["scores"][m] - systems["base"]["scores"][m]} | ci
                                 for m, ci in paired_intervals(systems["base"], systems["tuned"]).items()}
    write_json(run_dir / "eval.json", results | {"tokens": sum(len(r["input_ids"]) for r in enc.rows)})
    console.print("held-out perplexity (95% interval): " + "  ".join(
        f"{w} {s['perplexity']:.2f} [{results[w]['intervals']['perplexity'][0]:.2f}, "
        f"{results[w]['intervals']['perplexity'][1]:.2f}]" for w, s in scores.items()))
    return scores


def loss_system(rows: list[tuple[float, int]]) -> dict:
    """Per-row (summed loss, tokens) as evaluate.intervals resamples them."""
    total, count = sum(t for t, _ in rows), sum(n for _, n in rows)
    loss = total / max(count, 1)
    return {"n": len(rows), "scores": {"loss": loss, "perplexity": math.exp(min(loss, 50.0))},
            "per_example": {"loss": [t / n if n else 0.0 for t, n in rows]}, "loss_tokens": [n for _, n in rows]}


def evaluate_run(model, tok, test_rows, cfg: RunConfig, device, dtype, run_dir, console, tag: str = "") -> dict:
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
    if "base" in results:
        # tuned - base on the same rows, per metric: the interval a reader (and the registry) needs.
        b, t = results["base"], results["tuned"]
        results["comparison"] = {m: {"delta": t["scores"][m] - b["scores"][m]} | ci
                                 for m, ci in paired_intervals(b, t).items() if m in t["scores"]}
    write_json(run_dir / f"eval{tag}.json", results)
    print_before_after(results, console, tag.lstrip("-"), caption=path_note(device, dtype))
    return {who: results[who]["scores"] for who in ("base", "tuned") if who in results}


def print_before_after(results: dict, console: Console, task: str = "", caption: str | None = None) -> None:
    """Each model's score with its 95% interval, and the change with its paired interval."""
    who = [w for w in ("base", "tuned") if w in results]
    table = Table(title=f"held-out test set{f' of {task}' if task else ''} ({results['tuned']['n']} rows, "
                        "95% bootstrap intervals)", caption=caption)
    table.add_column("metric")
    for w in who:
        table.add_column(w, justify="right")
    if "comparison" in results:
        table.add_column("change", justify="right")
    for m in results["tuned"]["scores"]:
        cells = []
        for w in who:
            lo, hi = results[w].get("intervals", {}).get(m, (None, None))
            ci = f" [{100 * lo:.0f}, {100 * hi:.0f}]" if lo is not None else ""
            cells.append(f"{100 * results[w]['scores'][m]:.1f}%{ci}")
        c = results.get("comparison", {}).get(m)
        if c:
            cells.append(f"{100 * c['delta']:+.1f} pts [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]")
        elif "comparison" in results:
            cells.append("-")
        table.add_row(m, *cells)
    console.print(table)
