"""``tuneforge export RUN --format pruned``: the merged model pruned (deploy/prune.py) on
calibration rows from the run's own train split, optionally followed by a short LoRA recovery
fine-tune, and the table that says what it cost and what it bought.

The recovery is the normal train recipe (tuneforge.train.run.train) on a config that is the
run's own with ``model.name`` set to the pruned folder and ``train.max_steps`` to STEPS; its
LoRA is merged back (runs.load_run(merge=True)), so there is no second training loop.

The table (manifest.json "pruning.table"), one row per model — dense (the merged run),
pruned, pruned+recovered: size of its safetensors on disk in the export dtype, parameters,
greedy CPU tokens/s (one prompt at a time, fixed length) and the run's task metric on its
test split (fp32 on the CPU, all three on the same rows).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from tuneforge.data.prepare import build_splits
from tuneforge.data.render import render_chat, with_system
from tuneforge.deploy.prune import PruneError, PruneOptions, parameter_count, prune
from tuneforge.evaluate.task import evaluate_rows
from tuneforge.plugins import objective_of, validate_config
from tuneforge.runs import RunInfo, load_run, load_run_config


def check_run(run: RunInfo) -> None:
    """Refused before any weights load: pruning measures the task by generation on chat rows."""
    cfg = load_run_config(run.run_dir)
    if objective_of(cfg).data_kind != "sft":
        raise PruneError(f"{run.run_dir}: --format pruned measures the task by generation, for chat (sft-style) "
                         f"runs; objective '{cfg.objective.name}' is not one")


def calibration_ids(tok, rows: list[dict], system_prompt: str | None, n: int, max_length: int) -> list[list[int]]:
    """The first ``n`` train rows as the model sees them in training (template, system prompt,
    answer included), cut to ``max_length`` tokens."""
    return [render_chat(tok, with_system(r["messages"], system_prompt), r.get("tools"))[0][:max_length]
            for r in rows[:n]]


def write_pruned(run: RunInfo, dense, tok, tmp: Path, opts: PruneOptions, dtype: torch.dtype,
                 probe_prompts: list[list[int]], console=None) -> dict:
    """Prune (and recover) ``dense`` into ``tmp``; returns the manifest's "pruning" section."""
    cfg = load_run_config(run.run_dir)
    splits = build_splits(cfg.data, cfg.train.seed)
    calib = calibration_ids(tok, splits.train, cfg.data.system_prompt, opts.calibration_rows, cfg.data.max_length)
    pruned, report = prune(dense, calib, opts.sparsity, opts.structures)
    # Scratch beside the output (same file system): the dense and pruned-only folders measured
    # for the table, and the recovery run; removed when the export is done.
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".prune-") as scratch:
        scratch = Path(scratch)
        models = {"dense": (dense, _save(dense, tok, scratch / "dense", dtype))}
        pruned_dir = scratch / "pruned" if opts.recover_steps else tmp  # the recovery trains from it
        models["pruned"] = (pruned, _save(pruned, tok, pruned_dir, dtype))
        if opts.recover_steps:
            recovered, report["recovery"] = recover(cfg, pruned_dir, opts.recover_steps, scratch, console)
            models["pruned+recovered"] = (recovered, _save(recovered, tok, tmp, dtype))
        test = splits.test[: cfg.eval.limit] if cfg.eval.limit else splits.test
        table = [measure(name, m, folder, tok, test, cfg, probe_prompts) for name, (m, folder) in models.items()]
    return report | {"model": list(models)[-1], "table": table, "metric_rows": len(test),
                     "machine": machine()}


def recover(cfg, pruned_dir: Path, steps: int, scratch: Path, console=None) -> tuple[object, dict]:
    """A LoRA fine-tune of the pruned model on the run's own data by the normal train recipe,
    merged back. The run's LoRA settings are kept; another method's run recovers with LoRA."""
    from tuneforge.train.run import train  # deferred: the train stack loads only for --recover

    raw = {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k not in ("continual", "privacy")}
    raw["model"]["name"] = str(pruned_dir)
    if raw["method"]["name"] != "lora":
        raw["method"] = {"name": "lora", "target_modules": "all-linear"}
    raw["train"] |= {"max_steps": steps, "init_from": None, "eval_every": 0, "save_every": 0}
    # The table measures every model the same way; the recipe's own base-model eval would be a repeat.
    raw["eval"]["baseline"] = False
    raw |= {"output_dir": str(scratch), "run_name": "recovery", "parent_run": None}
    run_dir = train(validate_config(raw), console=console)
    model, _, _ = load_run(run_dir, merge=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [x["loss"] for x in losses if "loss" in x]
    return model, {"steps": steps, "method": raw["method"]["name"], "train_seconds": summary.get("train_seconds"),
                   "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def _save(model, tok, folder: Path, dtype: torch.dtype) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(folder)
    model.float()  # measured as saved (rounded to ``dtype``), computing in fp32 like every row
    tok.save_pretrained(folder)
    return folder


def measure(name: str, model, folder: Path, tok, test_rows: list[dict], cfg, prompts: list[list[int]]) -> dict:
    scores = evaluate_rows(model, tok, test_rows, cfg.eval, device="cpu", autocast_dtype=None,
                           system_prompt=cfg.data.system_prompt, label=f"task metric: {name}")["scores"]
    return {"model": name, "size_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "parameters": parameter_count(model), "cpu_tokens_per_s": round(tokens_per_second(model, tok, prompts), 2),
            "metric": next(iter(scores), None), "score": next(iter(scores.values()), None), "scores": scores}


@torch.no_grad()
def tokens_per_second(model, tok, prompts: list[list[int]], new_tokens: int = 32) -> float:
    """Greedy generation, one prompt at a time, exactly ``new_tokens`` each (no early stop, so
    every model generates the same amount)."""
    model.eval()
    n, t0 = 0, time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        n += out.shape[1] - len(p)
    return n / (time.perf_counter() - t0)


def machine() -> dict:
    """What the speed figures were measured on (a shared machine's load changes them)."""
    cpu = platform.processor()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in load] if load else None}
