"""The Python API: the stages as functions, for notebooks and scripts (docs/python-api.md).
The command line is a thin shell over these same functions (tuneforge/cli).

    import tuneforge
    manifest = tuneforge.prepare(["builtin:orders?n=200"], "prepared/orders")
    cfg = tuneforge.check("examples/quickstart.yaml", train__max_steps=20)
    run = tuneforge.train("examples/quickstart.yaml", train__max_steps=20, run_name="nb")
    report = tuneforge.evaluate(run, limit=20)
    model = tuneforge.load_run(run)
    model.generate("Please ship 3 teapots to Oslo")

Overrides are keyword arguments: a config key's dots are written as double underscores
(``train__lr=1e-4`` is ``train.lr=1e-4`` on the command line), values are Python values.
``prepare`` and ``evaluate`` take their options the same way (``split__test=0.2``).
A config may be a YAML path, a dict, or a RunConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneforge.config import ConfigError, RunConfig, deep_merge, parse_overrides
from tuneforge.plugins import load_config as _load_file, validate_config

ConfigLike = str | Path | dict | RunConfig


def dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword overrides -> dotted keys: ``{"train__lr": 1e-4}`` -> ``{"train.lr": 1e-4}``."""
    return {k.replace("__", "."): v for k, v in overrides.items()}


def load_config(config: ConfigLike | None = None, **overrides: Any) -> RunConfig:
    """The validated run config: ``config`` (a YAML path, a dict, a RunConfig, or None for every
    default) with ``overrides`` on top. Every problem is reported at once (ConfigError)."""
    extra = dotted(overrides)
    if config is None or isinstance(config, (str, Path)):
        return _load_file(config, extra)
    raw = config.model_dump(mode="json") if isinstance(config, RunConfig) else config
    return validate_config(deep_merge(raw, parse_overrides(extra)))


def check(config: ConfigLike, **overrides: Any) -> RunConfig:
    """``tuneforge check``: the config validated, then checked against the model's module names,
    the data files and the installed trackers (no weights load). Returns the config."""
    # deferred (here and below): each stage imports torch/transformers; `import tuneforge` must not
    from tuneforge.train.run_folder import preflight

    cfg = load_config(config, **overrides)
    if cfg.model.kind == "vision":  # the model's parts and the LoRA targets inside its language model
        from tuneforge.train.recipes.vision import preflight as vision_preflight

        vision_preflight(cfg)
    else:
        preflight(cfg)
    return cfg


def plan(config: ConfigLike, *, console: Console | None = None, **overrides: Any) -> dict:
    """``tuneforge plan``: memory and step-time estimates per method before any weights load.
    Returns {"device", "dtype", "memory", "rows": {method: Estimate}, "speed", ...}; with a
    ``console`` the table is printed too."""
    from tuneforge.plan import plan as estimate, print_plan

    cfg = load_config(config, **overrides)
    if cfg.model.kind == "vision":
        raise ConfigError(["tuneforge plan does not estimate vision-language runs (model.kind=vision) yet: its "
                           "memory and time model covers causal LMs; `tuneforge check` validates the config"])
    if cfg.auto:  # plan what will train: the values auto decides from the data
        from tuneforge.hardware import pick_device
        from tuneforge.train import auto

        cfg, decisions, _ = auto.resolve(cfg, list(cfg.auto), pick_device(cfg.train.device))
        if console is not None:
            auto.show(decisions, console)
    return print_plan(cfg, console) if console is not None else estimate(cfg)


def prepare(inputs: str | list[str], output: str | Path, *, overwrite: bool = False, console: Console | None = None,
            **options: Any) -> dict:
    """``tuneforge data prepare``: load, validate, clean, de-duplicate, redact and split
    ``inputs`` (files, folders, ``builtin:TASK``) into the folder ``output``. Options are
    PrepareOptions fields (``task="sft"``, ``max_length=512``) and, through ``__``, those of
    its sections (``split__test=0.2``, ``pii__action="drop"``, ``dedup__near=False``).
    Returns the manifest (stages with kept/dropped counts, splits)."""
    from pydantic import ValidationError

    from tuneforge.data.load import DataError
    from tuneforge.data.prepare import PrepareOptions, prepare as run_prepare

    raw = deep_merge({"inputs": [inputs] if isinstance(inputs, str) else list(inputs)},
                     parse_overrides(dotted(options)))
    try:
        opts = PrepareOptions.model_validate(raw)
    except ValidationError as e:
        raise DataError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    return run_prepare(opts, Path(output), console, overwrite=overwrite)


def train(config: ConfigLike | None = None, *, resume: str | Path | None = None, force: bool = False,
          console: Console | None = None, **overrides: Any) -> Path:
    """``tuneforge train``: fine-tune and evaluate base vs tuned; returns the run folder.
    ``resume``: a run folder to continue from its last checkpoint (``config`` is then None or
    ignored in favour of the run's own config.yaml, with ``overrides`` on top); ``force``
    trains even when the memory plan says the run will not fit."""
    from tuneforge.runs import load_run_config
    from tuneforge.train.run import train as run_train

    if resume is not None:
        run_dir = Path(resume)
        return run_train(load_run_config(run_dir, dotted(overrides)), resume=run_dir, console=console, force=force)
    return run_train(load_config(config, **overrides), console=console, force=force)


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` wrote: the folder (eval_results.json, eval_samples.jsonl, report.md)
    and the results it holds (per system: scores; comparisons; forgetting; diagnosis)."""

    folder: Path
    results: dict


def evaluate(target: str | Path, *, console: Console | None = None, **options: Any) -> Evaluation:
    """``tuneforge eval``: score a run folder (or any model) on held-out rows against its base
    (or ``baseline=MODEL``), with ``few_shot``, ``limit``, ``data`` (a file, default the run's
    own test split) and the other EvalOptions fields."""
    import json

    from tuneforge.evaluate.command import EvalOptions, run_eval

    # EvalOptions ignores unknown fields; a misspelt option must not be dropped silently.
    unknown = sorted(set(options) - set(EvalOptions.model_fields) - {"target"})
    if unknown:
        raise TypeError(f"evaluate() got unknown option(s) {', '.join(unknown)}; it takes "
                        f"{', '.join(f for f in EvalOptions.model_fields if f != 'target')}")
    folder = run_eval(EvalOptions(target=str(target), **options), console=console)
    return Evaluation(folder, json.loads((folder / "eval_results.json").read_text()))


def export(run: str | Path, format: str = "merged", out: str | Path | None = None, dtype: str = "fp32", *,
           sparsity: float | None = None, structured: str | tuple[str, ...] = ("mlp", "heads"),
           recover: int | None = None, console: Console | None = None) -> Path:
    """``tuneforge export``: ``merged`` (a plain Hugging Face folder), ``gguf``, ``int8`` or
    ``pruned`` (a smaller model: ``sparsity`` is the share of ``structured`` parts removed,
    any of "mlp", "heads", "layers"; ``recover`` LoRA steps on the run's data afterwards);
    returns the export folder (default RUN/export/FORMAT) with its manifest.json and model card."""
    from tuneforge.deploy.export import export as run_export
    from tuneforge.deploy.prune import PruneOptions

    if format != "pruned" and (sparsity is not None or recover is not None):
        raise ValueError(f"sparsity and recover are options of format 'pruned', not of '{format}'")
    if format == "pruned" and sparsity is None:
        raise ValueError("format 'pruned' needs sparsity (the share of channels/heads/layers removed)")
    parts = tuple(structured.split(",")) if isinstance(structured, str) else tuple(structured)
    prune = PruneOptions(sparsity, parts, recover) if format == "pruned" else None
    return run_export(run, format, out, dtype, prune, console)


@dataclass
class Model:
    """A model ready for generation: a run folder's base with what it trained (or any model),
    its fixed chat tokenizer, and the run's system prompt. ``model``/``tokenizer`` are the
    transformers (and peft) objects themselves."""

    model: Any
    tokenizer: Any
    system_prompt: str | None
    device: str
    dtype: Any
    config: RunConfig | None = None

    def generate(self, prompts: str | list[str] | list[list[dict]], *, max_new_tokens: int = 128,
                 system: str | None = None, batch_size: int = 8) -> str | list[str]:
        """Replies to user messages (a str gives a str), or to conversations (lists of
        ``{"role", "content"}`` messages), rendered with the model's chat template as training
        rendered its rows; ``system`` replaces the run's system prompt."""
        import torch

        from tuneforge.evaluate.generate import generate_texts

        one = isinstance(prompts, str)
        chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in ([prompts] if one else prompts)]
        ids = [chat_prompt(self.tokenizer, system or self.system_prompt, c) for c in chats]
        outs = generate_texts(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              device=self.device, autocast_dtype=None if self.dtype == torch.float32 else self.dtype)
        return outs[0] if one else outs


def load_run(target: str | Path, device: str = "auto", dtype: str = "auto") -> Model:
    """A run folder (or an embedded alias, a local model folder, a .gguf file, a hub id)
    loaded for generation on ``device`` (auto: CUDA when present)."""
    from tuneforge.runs import load_for_inference, load_run_config

    model, tok, system, dev, torch_dtype = load_for_inference(str(target), device, dtype)
    cfg = load_run_config(target) if (Path(target) / "config.yaml").is_file() else None
    return Model(model, tok, system, dev, torch_dtype, cfg)


def chat_prompt(tokenizer: Any, system: str | None, conversation: list[dict]) -> list[int]:
    """The prompt ids of ``conversation`` as training rendered its rows (chat template, tools,
    a system turn folded in where the template refuses one), ready for the reply."""
    from tuneforge.data.render import with_system
    from tuneforge.data.tools import chat_ids

    return chat_ids(tokenizer, with_system(conversation, system), add_generation_prompt=True)


def generate(target: str | Path | Model, prompts: str | list[str] | list[list[dict]], **options: Any) -> str | list[str]:
    """One call from a run folder (or model) to replies: ``load_run(target).generate(prompts)``.
    Loading takes seconds: keep ``load_run``'s Model for many calls."""
    model = target if isinstance(target, Model) else load_run(target)
    return model.generate(prompts, **options)
