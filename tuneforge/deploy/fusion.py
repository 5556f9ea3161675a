"""``tuneforge merge-adapters RUN... --how fusion --out DIR``: learned composition of trained
LoRA runs (methods/fusion.py), trained on a mix of the runs' own data, then measured per task
against each single adapter and the static linear merge.

Recipe: check -> data (each run's own splits, data/NAME/*.jsonl) -> config (the first run's,
method fusion, train.lr 0.05; key=value overrides on top) -> train (the one train entry: the run
folder is a normal run folder) -> compare per task -> tuneforge_merge.json + fusion_eval.json.

The comparison runs on one model: the fused layers with their weights set to each adapter alone
(one-hot), to equal weights 1/N (the exact static linear merge at equal weights, what
``--how linear`` gives at its default rank), and to the learned weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tuneforge.config import ConfigError, deep_merge, parse_overrides
from tuneforge.data.load import load_rows
from tuneforge.deploy.merge import (
    MERGE_FILE,
    check_runs,
    owned,
    run_like_config,
    task_names,
    write_task_data,
)
from tuneforge.evaluate.task import evaluate_rows
from tuneforge.hardware import pick_device, pick_dtype
from tuneforge.io import check_output, write_json
from tuneforge.methods import get_method
from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.plugins import validate_config
from tuneforge.runs import load_run_config
from tuneforge.train.run import train
from tuneforge.train.run_folder import claim_run_dir

# Only N numbers per layer train: a learning rate that moves them within a few hundred steps.
FUSION_TRAIN = {"lr": 5e-2, "weight_decay": 0.0}
EVAL_FILE = "fusion_eval.json"


def fuse_adapters(runs: list[Path], out: Path, overrides: list[str] = (), console: Console | None = None) -> Path:
    console = console or Console()
    # --- check -----------------------------------------------------------------------------
    runs, out = [Path(r) for r in runs], Path(out)
    check_output(out, owned, what="fusion run folder", inputs=runs)
    cfgs = [(r, load_run_config(r)) for r in runs]
    problems = check_runs(cfgs, [1.0] * len(cfgs), "fusion")
    if problems:
        raise ConfigError(problems, "merge-adapters --how fusion")
    if out.exists() and owned(out):
        shutil.rmtree(out)  # a fusion or merge folder tuneforge made before (check_output proved it)
    claim_run_dir(out)
    names = task_names(runs)
    write_json(out / MERGE_FILE, {"how": "fusion", "runs": [str(r.resolve()) for r in runs], "state": "training"})

    # --- data and config -------------------------------------------------------------------
    data, files = write_task_data(cfgs, names, out / "data", out.resolve() / "data")
    first = cfgs[0][1]
    raw = run_like_config(first, {"name": "fusion", "runs": [str(r.resolve()) for r in runs]}, data, out)
    raw["train"] |= FUSION_TRAIN
    cfg = validate_config(deep_merge(raw, parse_overrides(list(overrides))), "merge-adapters --how fusion")

    # --- train -----------------------------------------------------------------------------
    run_dir = train(cfg, console=console)

    # --- compare per task ------------------------------------------------------------------
    table = compare(cfg, run_dir, names, files, console)
    write_json(run_dir / EVAL_FILE, table)
    write_json(run_dir / MERGE_FILE, {"how": "fusion", "runs": [str(r.resolve()) for r in runs],
                                      "tasks": files, "state": "done", "eval": EVAL_FILE})
    return run_dir


def compare(cfg, run_dir: Path, names: list[str], files: dict, console: Console) -> dict:
    """Each task's test rows under each adapter alone, the equal-weight linear merge and the
    learned fusion -> {metric, systems, tasks: {task: {system: scores}}}; printed as a table."""
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    base = load_causal_lm(cfg.model.name, dtype, device, cfg.model.attn_implementation, cfg.model.revision,
                          cfg.model.trust_remote_code)
    fix_chat_tokenizer(tok, base)
    model = get_method("fusion").load_fusion(base, run_dir, cfg.method).eval()
    gates, n = model.fusion_gates, len(names)
    systems = {name: torch.eye(n)[i] for i, name in enumerate(names)} | {"linear": torch.full((n,), 1 / n),
                                                                           "fusion": None}
    kw = dict(device=device, autocast_dtype=None if dtype == torch.float32 else dtype,
              system_prompt=cfg.data.system_prompt)
    results: dict[str, dict] = {}
    for task in names:
        if "test" not in files[task]:
            continue
        rows, _ = load_rows([files[task]["test"]], "auto", {})
        results[task] = {}
        for system, fixed in systems.items():
            gates.fixed = fixed
            results[task][system] = evaluate_rows(model, tok, rows, cfg.eval, label=f"{system} on {task}",
                                                  **kw)["scores"]
    gates.fixed = None
    metric = next(iter(next(iter(next(iter(results.values())).values()))), None) if results else None
    print_comparison(results, metric, list(systems), console)
    return {"metric": metric, "systems": list(systems), "rows_per_task": cfg.eval.limit, "tasks": results}


def print_comparison(results: dict, metric: str | None, systems: list[str], console: Console) -> None:
    if metric is None:
        console.print("no task has test rows: nothing to compare")
        return
    table = Table(title=f"{metric} per task: each adapter alone, the linear merge (equal weights), the fusion")
    table.add_column("task")
    for s in systems:
        table.add_column(s, justify="right")
    for task, per in results.items():
        best = max(per[s][metric] for s in systems)
        table.add_row(task, *(f"{'[bold]' if per[s][metric] == best else ''}{100 * per[s][metric]:.1f}%"
                              for s in systems))
    console.print(table)
