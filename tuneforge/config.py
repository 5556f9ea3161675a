"""The typed run config: model, data, method, objective, train, eval, output.

A config is a YAML file plus ``key=value`` overrides. It is validated in full before any
weights load, and every problem is reported at once with a suggested fix. The method and
objective sections are plug points: this module is plain typed data and knows no plug-in;
``tuneforge.plugins`` resolves their ``name`` to the method and objective option classes.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """Every problem found in a config, each on its own line with the fix."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        head = f"{len(problems)} problem(s) in config{f' {source}' if source else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))


class Strict(BaseModel):
    """Every config model's base: unknown keys are errors, and so are inf and NaN (a float
    field takes finite numbers only: ``lr: .inf`` would train a NaN adapter)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class VisionOptions(Strict):
    """A vision-language run (model.kind=vision): which parts of the VLM train besides the LoRA
    adapters on its language model. The vision tower is frozen by default."""

    train_projector: bool = Field(
        False, description="train the projector (image features -> language model) in full; saved in the adapter")
    train_vision_tower: bool = Field(
        False, description="train the vision encoder in full (many more weights, and it can forget); saved in "
        "the adapter")
    max_images: int = Field(8, gt=0, description="a row with more images than this is dropped and counted")


class ModelConfig(Strict):
    name: str = Field(
        "smollm2-135m-instruct",
        description="embedded alias (see `tuneforge models`), local HF folder, .gguf file or hub id",
    )
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    kind: Literal["text", "vision"] = Field(
        "text", description="text: a causal LM; vision: an image-text-to-text model (AutoModelForImageTextToText "
        "+ AutoProcessor) trained on rows with images")
    vision: VisionOptions | None = Field(None, description="options of model.kind=vision (see VisionOptions)")

    @model_validator(mode="after")
    def _vision_options(self):
        if self.vision is not None and self.kind != "vision":
            raise ValueError("model.vision is set but model.kind is text: set model.kind=vision to train a "
                             "vision-language model, or remove model.vision")
        return self


class TaskConfig(Strict):
    """One task of a multi-task or continual run; format, columns, max_length... come from `data`."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    train: list[str] = Field(..., min_length=1)
    validation: list[str] = []
    test: list[str] = []
    weight: float | None = Field(None, gt=0, description="mixing weight; none set: sizes ** (1/temperature)")
    val_size: float | None = Field(None, ge=0, lt=1, description="default: data.val_size")
    test_size: float | None = Field(None, ge=0, lt=1, description="default: data.test_size")


class MessagesOptions(Strict):
    """Where a row's conversation lives and how its messages are spelled (Axolotl's
    ``chat_template`` options; LLaMA-Factory's ``tags`` map onto the same fields)."""

    field: str | None = Field(
        None, description="the row field holding the message list (Axolotl field_messages); default: messages, "
        "or conversations for ShareGPT rows")
    role_key: str | None = Field(None, description="message key of the role; default: role, else from")
    content_key: str | None = Field(None, description="message key of the text; default: content, else value")
    roles: dict[str, list[str]] = Field(
        {}, description="tuneforge role -> source role names, e.g. {user: [human], assistant: [gpt]}; roles: "
        "system, user, assistant, tool, tool_call (a turn whose text is the JSON of a call, LLaMA-Factory's "
        "function_call); names not listed fall back to the usual ones (human, gpt, observation, ...)")
    train_key: str | None = Field(
        None, description="per-message training flag (bool); default: training, else train. An assistant turn "
        "flagged false is not trained (weight 0)")
    roles_to_train: list[str] = Field(["assistant"], description="only [assistant] is supported")

    @model_validator(mode="after")
    def _check(self):
        bad = sorted(set(self.roles) - {"system", "user", "assistant", "tool", "tool_call"})
        if bad:
            raise ValueError(f"data.messages.roles: unknown tuneforge role(s) {bad} "
                             "(use system, user, assistant, tool, tool_call)")
        if self.roles_to_train != ["assistant"]:
            raise ValueError(f"data.messages.roles_to_train={self.roles_to_train}: tuneforge trains the assistant "
                             "turns only (prompts are context, never targets); mark single assistant turns "
                             "untrained with the train_key flag instead")
        return self


class DataConfig(Strict):
    train: list[str] = Field(
        [], description="files (jsonl/json/csv/tsv/parquet/txt), folders, builtin:TASK[?n=N&seed=S], "
        "or one folder written by `tuneforge data prepare` (its train/validation/test splits are used); or use `tasks`"
    )
    tasks: list[TaskConfig] = Field([], description="multi-task: several datasets mixed into one run")
    temperature: float = Field(
        1.0, gt=0, description="multi-task sampling p_i ~ n_i ** (1/T) when no task sets a weight (T>1 flattens)"
    )
    validation: list[str] = []
    test: list[str] = []
    format: str = Field("auto", description="auto, or a format name from tuneforge.data.formats")
    columns: dict[str, str] = Field(
        {}, description="map the format's field names to the file's: {instruction: question}"
    )
    system_prompt: str | None = Field(
        None, description="system message added to every conversation that lacks one"
    )
    messages: MessagesOptions = Field(
        MessagesOptions(), description="how chat rows spell their messages (Axolotl chat_template options)")
    ignore_fields: list[str] = Field(
        [], description="row fields dropped before loading (counted in the report), e.g. [kto_tag] to train "
        "KTO rows' answers as SFT")
    val_size: float = Field(0.1, ge=0, lt=1, description="share of train held out when validation is empty")
    test_size: float = Field(0.1, ge=0, lt=1, description="share of train held out when test is empty")
    max_length: int = Field(512, gt=8)
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="what happens to rows longer than max_length; always counted"
    )
    packing: bool = Field(False, description="pack several rows into each sequence (no padding)")
    pii: Literal["redact", "drop", "off"] = Field(
        "redact", description="personal data in raw files (emails, phones, cards, IBANs, SSNs, IPs, secrets): "
        "redact to <TYPE> (as `data prepare` does), drop the row, or off; counted in data_report.json. "
        "A prepared folder keeps what `data prepare` did")

    @model_validator(mode="after")
    def _sizes(self):
        if self.val_size + self.test_size >= 0.9:
            raise ValueError("val_size + test_size must leave at least 10% of the rows for training")
        if bool(self.train) == bool(self.tasks):
            raise ValueError("give either data.train (one task) or data.tasks (several), not both or neither")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique (got {names})")
        weighted = [t.weight is not None for t in self.tasks]
        if any(weighted) and not all(weighted):
            raise ValueError("set a weight on every task or on none (then sizes and data.temperature decide)")
        return self


class TrackingConfig(Strict):
    """How a run appears in the trackers of ``train.report_to`` (docs/tracking.md)."""

    project: str = Field("tuneforge", min_length=1, description="MLflow experiment and W&B project")
    name: str | None = Field(None, description="the run's name in MLflow and W&B; default: the run folder's name")
    entity: str | None = Field(None, description="W&B entity (user or team); default: the API key's own")
    tags: list[str] = Field([], description="MLflow tags (each set to 'true') and W&B tags")


class TrainConfig(Strict):
    lr: float = Field(2e-4, gt=0, description="when not set: the method's own default if it has one (prompt 3e-2, "
                                               "ptuning and prefix 1e-2), named in the run's summary; a value set here always wins")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs")
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with bf16 units, else fp32"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with --nproc N: ddp replicates the model on every process and sums gradients; fsdp "
        "shards weights, gradients and optimizer state across the processes (FSDP2, per decoder layer)",
    )
    eval_every: int = Field(50, ge=0, description="validation loss every N optimizer steps (0: only at the end)")
    save_every: int = Field(100, ge=0, description="checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0)
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: much less activation memory, ~30% more time")
    logits_at_trained_only: bool = Field(
        True,
        description="compute vocabulary logits only where the loss is taken (same loss, less time and memory)",
    )
    lean_activations: bool = Field(
        True,
        description="RMSNorm and the SiLU MLP keep less for backward and recompute the rest, norm outputs and "
        "the MLP product included (llama, mistral, qwen2/3 blocks): same bits, ~240 MB less peak memory on the "
        "fp32 SmolLM2 benchmark step",
    )
    fused_lora: bool = Field(
        True,
        description="each plain LoRA layer runs as one autograd node (base and rank-r products and the scale "
        "fused) instead of peft's chain of modules: same result to bf16 rounding, fewer ops a step",
    )
    release_memory: bool = Field(
        True,
        description="with tcmalloc or mimalloc, hand freed pages back to the system after each step: lower peak RSS "
        "(1.84 -> 1.77 GB on the CPU benchmark job), no speed cost measured",
    )
    padding_free: bool = Field(
        True,
        description="lay each micro-batch's rows end to end, each attending only to itself: same rows, "
        "same loss, no compute spent on padding (off for prompt/prefix tuning and DP-SGD)",
    )
    shared_prefix: bool = Field(
        True,
        description="with padding_free (sft): a micro-batch whose rows begin with the same untrained tokens (a "
        "system prompt, an instruction; at least 16) computes them once instead of once per row: same loss and "
        "gradients, except that LoRA dropout draws one mask for the shared prefix per batch",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop after N evaluations without a better validation loss; the adapter kept is the best"
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="smaller improvements count as none")
    nan_lr_factor: float = Field(
        0.5, gt=0, lt=1, description="on a NaN/inf loss: roll back to the last checkpoint, multiply the LR by this, once"
    )
    init_from: str | None = Field(
        None, description="run folder (or adapter folder) whose trained weights this run starts from"
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], description="experiment trackers that get the config, per-step metrics, eval results and the adapter "
        "(docs/tracking.md); each needs its library (pip install 'tuneforge[tracking]')")
    tracking: TrackingConfig = Field(TrackingConfig(), description="project, name, entity and tags for report_to")

    @model_validator(mode="after")
    def _tracking(self):
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"train.report_to={self.report_to}: name each tracker once")
        # Values, not fields set: a run's config.yaml spells every default out.
        given = [k for k, v in self.tracking if v != TrackingConfig.model_fields[k].default]
        if given and not {"mlflow", "wandb"} & set(self.report_to):
            raise ValueError(f"train.tracking.{given[0]} is set but no tracker in train.report_to uses it "
                             f"(report_to={self.report_to}): add mlflow or wandb, or leave train.tracking out")
        if self.tracking.entity is not None and "wandb" not in self.report_to:
            raise ValueError("train.tracking.entity is a W&B setting: add wandb to train.report_to or leave it out")
        return self


class ContinualConfig(Strict):
    """Earlier tasks of a continual run: replayed, protected by EWC, and scored for forgetting."""

    previous: list[TaskConfig] = Field([], description="earlier tasks (same seed/sizes as their own runs)")
    replay_share: float = Field(0.0, ge=0, lt=1, description="share of training rows drawn from earlier tasks")
    ewc_lambda: float = Field(0.0, ge=0, description="EWC penalty strength (0: off)")
    fisher_rows: int = Field(64, gt=0, description="earlier-task rows used to estimate the diagonal Fisher")

    @model_validator(mode="after")
    def _needs_previous(self):
        if (self.replay_share or self.ewc_lambda) and not self.previous:
            raise ValueError("replay_share and ewc_lambda need continual.previous (the earlier tasks)")
        return self


class PrivacyConfig(Strict):
    """DP-SGD (Opacus): per-example gradient clipping + Gaussian noise; epsilon is reported."""

    target_epsilon: float | None = Field(None, gt=0, description="noise is calibrated to reach this at the end")
    noise_multiplier: float | None = Field(None, ge=0, description="alternative to target_epsilon")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient clipping bound")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of privacy.target_epsilon and privacy.noise_multiplier")
        return self


class FairnessConfig(Strict):
    """Bias and fairness evaluation in ``tuneforge eval`` (evaluate/fairness; ``--fairness SPEC``
    overrides groups, swap and probes). Term lists: ``LIST: {group: [terms]}``; the terms at
    the same position in each group stand for each other (he/she, him/her)."""

    groups: list[str] = Field(
        [], description="slice the test rows by each of these: a column of the test rows (e.g. dialect), or "
        "terms:LIST (the group of term list LIST that the prompt mentions)")
    swap: list[str] = Field(
        [], description="counterfactual probes: the test prompts (and references) with the terms of these lists "
        "swapped, whole words only; built-in lists: names, names_origin, pronouns, nationalities, religions; or one of "
        "eval.fairness.terms")
    probes: list[Literal["bbq", "crows"]] = Field(
        [], description="built-in probe sets scored by log-likelihood: bbq (ambiguous questions whose unbiased "
        "answer is 'unknown'), crows (stereotype vs anti-stereotype sentence pairs)")
    terms: dict[str, dict[str, list[str]]] = Field(
        {}, description="your own term lists: LIST -> {group: [terms]}, every group equally long")
    counterfactual_rows: int = Field(48, gt=0, description="swap at most this many test rows per list (each is "
                                     "generated again by both models)")
    min_group_rows: int = Field(5, gt=0, description="a slice with fewer rows is reported but left out of the gap")

    @model_validator(mode="after")
    def _check_terms(self):
        for name, groups in self.terms.items():
            if len(groups) < 2:
                raise ValueError(f"eval.fairness.terms.{name}: give at least two groups to swap between")
            sizes = {g: len(t) for g, t in groups.items()}
            if 0 in sizes.values() or len(set(sizes.values())) > 1:
                raise ValueError(f"eval.fairness.terms.{name}: every group needs the same number of terms, "
                                 f"aligned by position (got {sizes})")
            owner: dict[str, str] = {}
            for g, ts in groups.items():
                for t in ts:
                    if not t.strip():
                        raise ValueError(f"eval.fairness.terms.{name}.{g}: an empty term")
                    if owner.setdefault(t.lower(), g) != g:
                        raise ValueError(f"eval.fairness.terms.{name}: '{t}' is in groups {owner[t.lower()]} and "
                                         f"{g}; a term may belong to one group only")
        return self


class EvalConfig(Strict):
    metric: Literal["auto", "exact_match", "json", "token_f1", "none"] = Field(
        "auto", description="auto: json when the references are JSON objects, else exact_match"
    )
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate at most N test rows")
    baseline: bool = Field(True, description="also evaluate the base model on the same test rows")
    fairness: FairnessConfig | None = Field(
        None, description="bias and fairness evaluation in `tuneforge eval` (see FairnessConfig); off when unset")


class MoEOptions(Strict):
    """Mixture-of-experts LoRA (``method.moe``, method lora): where the adapters go, whether the
    router trains, which experts train, and the router's load-balancing loss."""

    lora_on: Literal["attention", "experts", "both"] = Field(
        "both", description="LoRA on the attention projections, on the routed experts (and a shared expert), or both")
    router: Literal["frozen", "trained"] = Field(
        "frozen", description="trained: the router's weights train in full (saved in the adapter)")
    experts: list[int] | Literal["all"] = Field(
        "all", description="indices of the routed experts whose LoRA trains (in every MoE layer); the others "
        "keep their base weights exactly")
    top_k_experts: int | None = Field(
        None, gt=0, description="train only the k experts each layer routes most tokens of the training data to, "
        "counted by a calibration pass before training")
    calibration_batches: int = Field(8, gt=0, description="training micro-batches the calibration pass runs")
    aux_loss_coef: float | None = Field(
        None, ge=0, description="weight of the router's load-balancing loss added to the training loss; "
        "default: the model config's router_aux_loss_coef; 0: off")
    collapse_entropy: float = Field(
        0.2, ge=0, le=1, description="warn when a layer's expert-load balance (entropy rescaled: 1 = every "
        "expert gets the same share, 0 = the same top-k experts take every token) falls below this")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.experts, list):
            if not self.experts:
                raise ValueError("method.moe.experts: name at least one expert index, or use all")
            if min(self.experts) < 0 or len(set(self.experts)) != len(self.experts):
                raise ValueError(f"method.moe.experts={self.experts}: indices must be distinct and >= 0")
        chooses = self.experts != "all" or self.top_k_experts is not None
        if self.experts != "all" and self.top_k_experts is not None:
            raise ValueError("method.moe: set experts (by index) or top_k_experts (most used on the data), not both")
        if chooses and self.lora_on == "attention":
            raise ValueError("method.moe: choosing experts needs LoRA on them; set lora_on: experts or both "
                             "(with lora_on: attention no expert trains)")
        return self


# What `auto` decides from the data (tuneforge/train/auto.py), and the config keys each sets.
AUTO_KNOBS = {
    "epochs": ("train.epochs",),
    "lr": ("train.lr",),
    "batch_size": ("train.batch_size",),
    "max_length": ("data.max_length",),
    "lora": ("method.r", "method.alpha", "method.target_modules"),
    "early_stopping": ("train.early_stopping_patience", "train.eval_every"),
    "task_shape": ("eval.max_new_tokens", "eval.metric"),
}
# Fields whose own value "auto" predates the knobs and means something of its own
# (eval.metric: auto = json or exact_match by the references); every saved config holds it.
OWN_AUTO = {"eval.metric"}
AutoKnob = Literal["epochs", "lr", "batch_size", "max_length", "lora", "early_stopping", "task_shape"]


class RunConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    # Plug-in sections: validated against the method/objective registries by tuneforge.plugins.
    method: Any = Field(default_factory=lambda: {"name": "lora"})
    objective: Any = Field(default_factory=lambda: {"name": "sft"})
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    continual: ContinualConfig = ContinualConfig()
    privacy: PrivacyConfig | None = None
    output_dir: str = "runs"
    run_name: str | None = Field(None, description="run folder name; default: time stamp + method")
    parent_run: str | None = Field(None, description="the run this one builds on (set by `tuneforge rlhf`)")
    auto: list[AutoKnob] = Field(
        [], description="settings decided from the data before training, each with its reason (auto.json): "
        "all (every one the config does not set), or a list of epochs, lr, batch_size, max_length, lora, "
        "early_stopping, task_shape; a single key can also be set to auto (train.epochs=auto)")


# --- loading, overrides and error reporting ------------------------------------------


def _parse_value(raw: str):
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        # '?' and '&' are YAML syntax inside a flow list ([builtin:orders?n=60&seed=1]):
        # read such values as the plain text the user meant.
        inner = raw.strip()
        if inner.startswith("[") and inner.endswith("]"):
            return [_parse_value(x.strip()) for x in inner[1:-1].split(",") if x.strip()]
        return raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    return value


def override_items(items: list[str]) -> dict[str, Any]:
    """Command-line overrides ``["train.lr=1e-4", "data.packing=true"]`` -> dotted keys and their
    values parsed as YAML: ``{"train.lr": 1e-4, "data.packing": True}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError([f"override '{item}' is not key=value (e.g. train.lr=1e-4)"])
        key, _, raw = item.partition("=")
        out[key.strip()] = _parse_value(raw)
    return out


def parse_overrides(items: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as a nested dict: ``{"train": {"lr": 1e-4}}`` from command-line items
    (``override_items``) or from a mapping of dotted keys to values (the Python API's keyword
    arguments, tuneforge.api)."""
    out: dict[str, Any] = {}
    for key, value in (items if isinstance(items, Mapping) else override_items(items)).items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override '{key}={value}': '{p}' is not a section"])
        node[leaf] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def expand_auto(raw: dict) -> dict:
    """``auto: all|true|[knobs]`` and fields set to the string ``auto`` (``train.epochs=auto``)
    -> ``auto: [knobs]`` with those fields removed. ``all`` is every knob whose keys the config
    does not set: a value the user gives always wins. A knob listed by name beside a value
    for its key that differs from the default is refused (one of them would be dropped)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    spec = raw.pop("auto", None)
    knobs: list[str] = []
    for knob, keys in AUTO_KNOBS.items():
        for key in keys:
            section, field = key.split(".")
            if key in OWN_AUTO:  # its own "auto" is a value of the field, not a request for the knob
                continue
            if isinstance(raw.get(section), dict) and raw[section].get(field) == "auto":
                del raw[section][field]
                knobs.append(knob)
    if spec in (None, False, "none") or spec == []:
        pass
    elif spec is True or spec == "all":
        given = {f"{s}.{f}" for s, v in raw.items() if isinstance(v, dict) for f in v}
        knobs += [k for k, keys in AUTO_KNOBS.items() if not any(key in given for key in keys)]
    elif isinstance(spec, list) and all(isinstance(k, str) for k in spec):
        bad = [k for k in spec if k not in AUTO_KNOBS]
        if bad:
            raise ConfigError([f"auto: unknown {bad}; choose all, or from {', '.join(AUTO_KNOBS)}"])
        defaults = {"train": TrainConfig.model_fields, "data": DataConfig.model_fields,
                    "eval": EvalConfig.model_fields}
        clash = [f"{key} (auto: {k})" for k in spec for key in AUTO_KNOBS[k]
                 if key.split(".")[0] in defaults and key.split(".")[1] in (raw.get(key.split(".")[0]) or {})
                 and raw[key.split(".")[0]][key.split(".")[1]] != defaults[key.split(".")[0]][key.split(".")[1]].default]
        if clash:
            raise ConfigError([f"auto decides {', '.join(clash)} but the config sets it too: remove one"])
        knobs += spec
    else:
        raise ConfigError([f"auto: {spec!r}; use all, true, or a list of {', '.join(AUTO_KNOBS)}"])
    if knobs:
        raw["auto"] = list(dict.fromkeys(knobs))
    return raw


# Names users bring from peft, transformers' Trainer and LLaMA-Factory configs.
KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "use_rslora": "rslora", "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler", "max_seq_length": "max_length", "cutoff_len": "max_length",
    "model_name_or_path": "name", "warmup": "warmup_ratio", "bf16": "dtype", "fp16": "dtype",
}


def _closest(key: str, valid: list[str]) -> str | None:
    if KNOWN_ALIASES.get(key) in valid:
        return KNOWN_ALIASES[key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic class that owns the field at ``loc`` (to suggest sibling keys)."""
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return cls
    return cls


def format_errors(err: ValidationError, cls: type[BaseModel], prefix: tuple = (), owners=None) -> list[str]:
    """One line per problem. ``owners(key)`` names the plug-ins that do take an unknown key."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in prefix + loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(cls, loc[:-1]) or cls
            close = _closest(str(loc[-1]), list(owner.model_fields))
            hint = f"did you mean '{'.'.join(str(p) for p in prefix + loc[:-1] + (close,))}'?" if close else (
                f"valid keys here: {', '.join(owner.model_fields)}"
            )
            takers = owners(str(loc[-1])) if owners and len(loc) == 1 else []
            if takers:
                name = cls.model_fields["name"].default
                hint = f"method '{name}' has no option '{loc[-1]}'; it is an option of: {', '.join(takers)}"
            problems.append(f"unknown key '{where}': {hint}")
        elif e["type"] == "missing":
            problems.append(f"'{where}' is required")
        else:
            problems.append(f"'{where}': {e['msg']} (got {e.get('input')!r})")
    return problems


def read_yaml(path: Path) -> dict:
    """A YAML config file's top-level mapping ({} when empty), or a ConfigError naming the
    file and what is wrong: not UTF-8 (with the byte offset), not YAML, not a mapping."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"cannot read config file {path}: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        why = f"byte 0x{data[e.start]:02x} at byte offset {e.start} (line {line}); save the file as UTF-8"
        raise ConfigError([f"{path} is not UTF-8 text: {why}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must hold a mapping at the top level"])
    return raw


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
