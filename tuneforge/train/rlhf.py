"""``tuneforge rlhf CONFIG``: supervised model -> reward model -> policy optimisation.

One YAML holds the shared sections (model, method, train, output_dir, ...) and a
``stages`` mapping with the sections each stage changes (usually data, objective and
train). Each stage is a normal run folder under ``output_dir/run_name/``; the reward and
policy stages start from the SFT model (its adapter merged into the base) and record it
as ``parent_run``; the policy stage reads the reward model from ``objective.reward_run``.
All three configs are validated before the first stage starts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from tuneforge.config import (
    ConfigError,
    RunConfig,
    deep_merge,
    parse_overrides,
    read_yaml,
)
from tuneforge.hardware import pick_device, pick_dtype
from tuneforge.io import atomic_dir, write_json
from tuneforge.plugins import validate_config
from tuneforge.runs import load_run
from tuneforge.train.run import train

STAGES = ("sft", "reward", "policy")


def stage_configs(raw: dict, source: str | None = None) -> dict[str, RunConfig]:
    """The three stage configs, with the chain's links filled in; every problem at once."""
    raw = dict(raw)
    stages = raw.pop("stages", None) or {}
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not isinstance(stages, dict):
        raise ConfigError([f"stages: unknown stage(s) {unknown}; the chain is {', '.join(STAGES)}"], source)
    root = Path(raw.pop("output_dir", "runs")) / (raw.pop("run_name", None) or "rlhf")
    merged_sft = root / "sft" / "merged"
    defaults = {"sft": {"objective": {"name": "sft"}},
                "reward": {"objective": {"name": "reward"}, "model": {"name": str(merged_sft)},
                           "parent_run": str(root / "sft")},
                "policy": {"objective": {"name": "policy", "reward_run": str(root / "reward")},
                           "model": {"name": str(merged_sft)}, "parent_run": str(root / "sft")}}
    configs, problems = {}, []
    for name in STAGES:
        stage = deep_merge(deep_merge(raw, stages.get(name) or {}), defaults[name])
        stage |= {"output_dir": str(root), "run_name": name}
        try:
            configs[name] = validate_config(stage, f"{source or 'rlhf'} (stage {name})")
        except ConfigError as e:
            problems += [f"stage {name}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems, source)
    return configs


def merge_run(run_dir: Path, out: Path, dtype: torch.dtype) -> Path:
    """A run's adapter merged into its base model: a plain HF folder the next stage loads."""
    model, tok, _ = load_run(run_dir, "cpu", dtype, merge=True)
    with atomic_dir(out, lambda p: (p / "config.json").is_file(), what="merged model folder") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)  # with the run's tokenizer fixes
    return out


def run_chain(path: str | Path, overrides: list[str] = (), console: Console | None = None) -> Path:
    console = console or Console()
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    raw = deep_merge(read_yaml(path), parse_overrides(list(overrides)))
    configs = stage_configs(raw, str(path))
    root = Path(configs["sft"].output_dir)
    chain = {"config": str(path), "stages": {}}
    for name in STAGES:
        console.rule(f"[bold]rlhf stage: {name}")
        cfg = configs[name]
        run_dir = train(cfg, console=console)
        chain["stages"][name] = str(run_dir)
        if name == "sft":
            dtype = pick_dtype(cfg.train.dtype, pick_device(cfg.train.device))
            merge_run(run_dir, Path(configs["reward"].model.name), dtype)
        write_json(root / "chain.json", chain)
    console.print(f"[bold green]rlhf chain done[/]: {root} (stages: {', '.join(STAGES)}; see chain.json)")
    return root
