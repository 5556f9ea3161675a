"""Names in a config -> plug-ins: the one place where a run config's ``method`` and
``objective`` sections are resolved to the registered method and objective, and their
options validated. ``tuneforge.config`` stays plain typed data below the plug points;
everything that loads a config (train, plan, the CLI, jobs, run folders) comes through here.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tuneforge.config import ConfigError, RunConfig, deep_merge, expand_auto, format_errors, parse_overrides, read_yaml
from tuneforge.methods import METHODS, Method, methods_taking
from tuneforge.objectives import OBJECTIVES, Objective


def method_of(cfg: RunConfig) -> Method:
    return _plugged(METHODS, "method", getattr(cfg.method, "name", None))


def objective_of(cfg: RunConfig) -> Objective:
    return _plugged(OBJECTIVES, "objective", getattr(cfg.objective, "name", None))


def _plugged(registry: dict, section: str, name):
    """The plug-in registered under ``name``, or a ConfigError naming the field (never a
    TypeError or KeyError: a config built without validate_config may hold anything)."""
    problem = name_problem(registry, section, name)
    if problem:
        raise ConfigError([problem])
    return registry[name]


def name_problem(registry: dict, section: str, name) -> str | None:
    """Why ``name`` is not a registered plug-in of ``section`` (None when it is one)."""
    if not isinstance(name, str):
        return (f"'{section}.name' must be a name (text), e.g. {section}: {{name: {next(iter(sorted(registry)))}}}; "
                f"got {type(name).__name__} {name!r:.60}")
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(sorted(registry))}"
        return f"unknown {section} '{name}': {hint}"
    return None


def validate_config(raw: dict, source: str | None = None) -> RunConfig:
    """Validate a raw dict; raise one ConfigError listing every problem."""
    problems: list[str] = []
    cfg = None
    if isinstance(raw, dict):
        try:
            raw = expand_auto(raw)  # auto: all / train.epochs=auto -> auto: [knobs] (train/auto.py decides them)
        except ConfigError as e:
            problems += e.problems
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += format_errors(err, RunConfig)

    plugged = {}
    for section, registry in (("method", METHODS), ("objective", OBJECTIVES)):
        default_name = RunConfig.model_fields[section].default_factory()["name"]
        value = raw.get(section) or {}
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            problems.append(f"'{section}' must be a mapping, e.g. {section}: {{name: {default_name}}}")
            continue
        value = {"name": default_name, **value}
        name = value["name"]
        problem = name_problem(registry, section, name)
        if problem:
            problems.append(problem)
            continue
        opts_cls = registry[name].options
        try:
            plugged[section] = opts_cls.model_validate(value)
        except ValidationError as err:
            problems += format_errors(err, opts_cls, prefix=(section,),
                                      owners=methods_taking if section == "method" else None)

    if cfg is not None and "objective" in plugged:
        problems += refused_settings(cfg, OBJECTIVES[plugged["objective"].name])
    if cfg is not None and cfg.train.distributed == "fsdp":
        problems += _fsdp_problems(cfg, plugged)
    if cfg is not None and cfg.model.kind == "vision":
        problems += vision_problems(cfg, plugged)
    if problems:
        raise ConfigError(problems, source)
    cfg = cfg.model_copy(update=plugged)
    default_lr = METHODS[cfg.method.name].default_lr
    # the method's own; never over a user's, nor where auto decides it (train/auto.py keeps it too)
    if default_lr is not None and "lr" not in cfg.train.model_fields_set and "lr" not in cfg.auto:
        cfg.train = cfg.train.model_copy(update={"lr": default_lr})
    return cfg


def lr_note(cfg: RunConfig) -> str | None:
    """One line on the learning rate when the method has its own default: that it was used and
    why, or that the config's value is far from it (e.g. LoRA's lr left in a file switched to
    prompt tuning)."""
    method = method_of(cfg)
    if method.default_lr is None:
        return None
    lr = cfg.train.lr
    if lr == method.default_lr:
        return f"train.lr {lr:g}: the default of method '{method.name}' ({method.default_lr_why})"
    ratio = method.default_lr / lr
    if ratio >= 10 or ratio <= 0.1:
        return (f"train.lr {lr:g} is {ratio if ratio >= 1 else 1 / ratio:.0f}x {'below' if ratio >= 1 else 'above'} "
                f"the default of method '{method.name}', {method.default_lr:g} ({method.default_lr_why}); "
                f"leave train.lr out of the config to use it")
    return None


# Run settings beyond the loss, which an objective's recipe may not honour (Objective.refuses):
# name -> (the config keys, is it asked for?).
SETTINGS = {
    "privacy": ("privacy", lambda c: c.privacy is not None),
    "continual": ("continual (previous tasks, replay, EWC)", lambda c: bool(c.continual.previous)),
    "tasks": ("data.tasks", lambda c: bool(c.data.tasks)),
    "packing": ("data.packing", lambda c: c.data.packing),
    "fsdp": ("train.distributed=fsdp", lambda c: c.train.distributed == "fsdp"),
    "early_stopping": ("train.early_stopping_patience", lambda c: c.train.early_stopping_patience is not None),
    "init_from": ("train.init_from", lambda c: c.train.init_from is not None),
}


def refused_settings(cfg: RunConfig, objective: Objective) -> list[str]:
    """Settings the config asks for that the objective's recipe cannot honour, with the reason:
    refused here rather than silently ignored by the recipe (fsdp: with the other fsdp problems)."""
    return [f"{SETTINGS[k][0]} with objective '{objective.name}': {why}"
            for k, why in objective.refuses.items() if k != "fsdp" and SETTINGS[k][1](cfg)]


# What a vision-language run (model.kind=vision, train/recipes/vision.py) does not do, and why.
VISION_REFUSES = {
    "privacy": ("privacy", lambda c: c.privacy is not None, "DP-SGD is not wired into the vision recipe"),
    "continual": ("continual (previous tasks, replay, EWC)", lambda c: bool(c.continual.previous or
                  c.continual.ewc_lambda or c.continual.replay_share), "the vision recipe trains one task"),
    "tasks": ("data.tasks", lambda c: bool(c.data.tasks), "the vision recipe trains one dataset: give data.train"),
    "packing": ("data.packing", lambda c: c.data.packing, "rows with images are not packed (each row's image "
                "tokens belong to its own images)"),
    "truncate": ("data.overlength=truncate", lambda c: c.data.overlength == "truncate",
                 "truncating a row can cut its image tokens apart from the image; use drop or error"),
    "init_from": ("train.init_from", lambda c: c.train.init_from is not None, "not supported for vision runs yet"),
}


def vision_problems(cfg: RunConfig, plugged: dict) -> list[str]:
    """Settings a vision-language run cannot honour, each with the reason (never accepted and dropped)."""
    problems = [f"{key} with model.kind=vision: {why}" for key, asked, why in VISION_REFUSES.values() if asked(cfg)]
    method = plugged.get("method")
    if method is not None and method.name != "lora":
        problems.append(f"method '{method.name}' with model.kind=vision: vision-language runs train LoRA on the "
                        f"language model (method.name=lora), plus the projector / vision tower in full through "
                        f"model.vision.train_projector / train_vision_tower")
    objective = plugged.get("objective")
    if objective is not None and objective.name != "sft":
        problems.append(f"objective '{objective.name}' with model.kind=vision: only sft (loss on the assistant "
                        f"turns) trains on rows with images")
    if cfg.train.distributed == "fsdp":
        problems.append("train.distributed=fsdp with model.kind=vision: the vision recipe runs on one process")
    if cfg.data.messages != type(cfg.data.messages)():
        problems.append("data.messages with model.kind=vision: rows with images are read in the ShareGPT/LLaVA "
                        "(from/value) or OpenAI (role/content) spelling; rename their fields with data.columns")
    return problems


def _fsdp_problems(cfg: RunConfig, plugged: dict) -> list[str]:
    """Combinations the sharded loop (train/distributed.py) does not run."""
    problems = []
    if "method" in plugged and not METHODS[plugged["method"].name].shardable:
        problems.append(f"train.distributed=fsdp with method '{plugged['method'].name}': its weights cannot be "
                        f"sharded; use train.distributed=ddp")
    if "objective" in plugged and "fsdp" in OBJECTIVES[plugged["objective"].name].refuses:
        name = plugged["objective"].name
        problems.append(f"train.distributed=fsdp with objective '{name}': {OBJECTIVES[name].refuses['fsdp']}")
    if cfg.continual.ewc_lambda:
        problems.append("train.distributed=fsdp with continual.ewc_lambda: the EWC penalty needs every weight whole "
                        "on every process; use train.distributed=ddp")
    return problems


def load_config(path: str | Path | None, overrides: list[str] | Mapping[str, Any] = ()) -> RunConfig:
    """A config file (or none: every default) with overrides on top, validated: ``key=value``
    items from the command line, or a mapping of dotted keys (config.parse_overrides)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"])
        raw = read_yaml(path)
    extra = parse_overrides(overrides if isinstance(overrides, Mapping) else list(overrides))
    raw = deep_merge(_switched(raw, extra), extra)
    return validate_config(raw, str(path) if path else None)


def _switched(raw: dict, overrides: dict) -> dict:
    """When the command line switches a method or objective (`method.name=ia3` over a LoRA
    file), the file's options the new one does not take are left out, with a one-line notice
    naming them: they belonged to the old choice. An option given on the command line itself
    is kept, so a wrong one is still an error."""
    out = dict(raw)
    for section, registry in (("method", METHODS), ("objective", OBJECTIVES)):
        asked, mine = overrides.get(section), raw.get(section)
        if not (isinstance(asked, dict) and isinstance(mine, dict) and asked.get("name") in registry):
            continue
        if mine.get("name") == asked["name"]:
            continue
        takes = registry[asked["name"]].options.model_fields
        left = [k for k in mine if k != "name" and k not in takes and k not in asked]
        if left:
            out[section] = {k: v for k, v in mine.items() if k not in left}
            print(f"note: {section} switched to '{asked['name']}' on the command line: the file's "
                  f"{', '.join(f'{section}.{k}' for k in left)} left out ({asked['name']} does not take "
                  f"{'it' if len(left) == 1 else 'them'})", file=sys.stderr)
    return out
