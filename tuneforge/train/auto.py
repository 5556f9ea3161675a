"""``auto`` hyper-parameters: decided from the data, the model and the memory plan, each
with its reason, before anything trains.

A config names what is decided here in ``auto`` (``auto: all``, a list, or a field set to
``auto``: ``train.epochs=auto``). ``resolve`` reads the training rows once (their count and
token lengths, whether they look like a classification task), the model's size from its
config (no weights) and the memory estimate of ``tuneforge plan``, and returns the config
with concrete values plus one ``Decision`` per value. The run then trains that config as
any other: config.yaml holds the values, auto.json the reasons.

The rules are small pure functions so that each can be tested alone:
- epochs: OpenAI's fine-tuning API's rule (3 passes, more for small files, fewer for large
  ones), counted here in optimizer steps, capped by a budget of trained tokens; early stopping
  on the validation loss ends it sooner.
- lr: LoRA-family 2e-4 scaled up for small models (their updates are smaller per step),
  full fine-tuning 1e-5..5e-5; a method with its own default (prompt tuning) keeps it.
- LoRA rank/targets: all linear layers (the QLoRA paper's finding), rank by model size.
- batch: enough rows per step for a smooth gradient, few enough for enough steps, and halved
  until the memory plan says it fits.
- max_length: the longest row (rounded up to 8), so nothing is truncated or dropped; above the
  model's context the row is dropped and counted as usual (data.overlength).
- early stopping: evaluate ~8 times a run (4 times a pass for a classification-shaped task),
  stop after 2 evaluations without a better validation loss, keep the best weights
  (train/loop.py's keep-best).
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneforge.config import ConfigError, RunConfig
from tuneforge.data.lengths import token_lengths
from tuneforge.data.prepare import build_splits
from tuneforge.hardware import pick_device, pick_dtype
from tuneforge.io import write_json
from tuneforge.models.load import load_config, load_tokenizer
from tuneforge.plan import CPU_FALLBACK, device_memory, estimate, fits, meta_model
from tuneforge.plugins import method_of, objective_of
from tuneforge.train.run_folder import claim_run_dir, claimed

LORA_FAMILY = ("lora", "dora", "qlora")
# Objectives trained by the token recipe on chat rows or text: the ones whose data auto reads.
AUTO_OBJECTIVES = ("sft", "cpt")

# Epochs: OpenAI's rule in optimizer steps rather than examples (a step is what moves the
# weights): aim at TARGET_EPOCHS, but at least MIN_STEPS steps and at most MAX_STEPS.
TARGET_EPOCHS, MIN_EPOCHS, MAX_EPOCHS = 3, 1, 25
CLASSIFY_EPOCHS = 3  # at most; a short fixed answer is often learnt within one pass: early stopping ends it
CLASSIFY_EVALS_PER_PASS = 4  # so a run that has learnt the labels stops within half a pass
MIN_STEPS, MAX_STEPS = 100, 5000
TOKEN_BUDGET = 20_000_000  # trained tokens a run may take before epochs are cut
EVALS_PER_RUN, PATIENCE = 8, 2


@dataclass
class Decision:
    key: str  # the config key, e.g. train.epochs
    value: object
    reason: str


@dataclass
class Shape:
    """Is the task classification-shaped (one short answer from a small label set)?"""

    classification: bool
    reason: str
    labels: dict[str, int]


# --- the rules (pure) -------------------------------------------------------------------


def size(n_params: int) -> str:
    """135M, 1.7B, 48K: a model's size as people say it."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n_params >= div:
            return f"{n_params / div:.3g}{unit}"
    return str(n_params)


def choose_epochs(n_rows: int, batch: int, tokens_per_epoch: int, classification: bool) -> tuple[float, str]:
    steps_per_epoch = max(1, math.ceil(n_rows / batch))
    target = CLASSIFY_EPOCHS if classification else TARGET_EPOCHS
    why = (f"up to {target} passes for a classification-shaped task" if classification
           else f"{target} passes (OpenAI's default)")
    epochs = target
    if steps_per_epoch * epochs < MIN_STEPS:
        epochs = min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))
        why = f"a small file: {n_rows} rows give {steps_per_epoch} steps a pass; {epochs} passes reach ~{MIN_STEPS} steps"
    elif steps_per_epoch * epochs > MAX_STEPS:
        epochs = max(MIN_EPOCHS, MAX_STEPS // steps_per_epoch)
        why = f"a large file: {steps_per_epoch} steps a pass; {epochs} pass(es) keep it under {MAX_STEPS} steps"
    if tokens_per_epoch * epochs > TOKEN_BUDGET:
        epochs = max(MIN_EPOCHS, TOKEN_BUDGET // max(tokens_per_epoch, 1))
        why += f"; cut to {epochs} so the run trains at most {TOKEN_BUDGET:,} tokens"
    if epochs > 1:
        why += "; early stopping on the validation loss ends it sooner when that stops improving"
    return float(epochs), why


def choose_lr(method: str, n_params: int, method_default: float | None) -> tuple[float, str]:
    if method_default is not None:
        return method_default, f"method {method}'s own default"
    if method in LORA_FAMILY:
        # Small models take larger LoRA steps (their updates are smaller per step): 2e-4 at
        # 1B parameters, scaled by sqrt(1B / size), within [1e-4, 1e-3].
        lr = min(1e-3, max(1e-4, 2e-4 * math.sqrt(1e9 / n_params)))
        lr = float(f"{lr:.1g}")
        return lr, f"LoRA-family on a {size(n_params)}-parameter model: 2e-4 x sqrt(1B/size), rounded"
    lr = 5e-5 if n_params < 1e9 else 1e-5
    return lr, f"{method} updates every weight: {lr:g} for a {size(n_params)}-parameter model"


def choose_lora(n_params: int) -> tuple[int, str]:
    r = 16 if n_params < 3e9 else 32
    return r, (f"rank {r} (alpha {2 * r}) on every linear layer for a {size(n_params)}-parameter model: "
               "adapters on all linear layers match full fine-tuning more closely than attention-only ones")


def desired_batch(n_rows: int) -> int:
    """Rows per step before the memory check: 8 (a steadier gradient) when the file gives at
    least ~25 such steps a pass, fewer for small files (they need the steps)."""
    for b in (8, 4, 2):
        if n_rows >= 25 * b:
            return b
    return 1


def choose_max_length(lengths: list[int], model_max: int | None) -> tuple[int, str, int]:
    """(max_length, reason, rows it leaves out). Covers the longest row, rounded up to 8."""
    longest = max(lengths)
    p99 = sorted(lengths)[min(len(lengths) - 1, int(0.99 * len(lengths)))]
    value = max(16, -(-longest // 8) * 8)
    if model_max and value > model_max:
        over = sum(n > model_max for n in lengths)
        return model_max, (f"the longest row has {longest} tokens (p99 {p99}), beyond the model's context "
                           f"{model_max}: {over} row(s) longer are dropped and counted"), over
    return value, f"covers the longest row ({longest} tokens; p99 {p99}, {len(lengths)} rows): nothing is cut", 0


def choose_early_stopping(total_steps: int, has_validation: bool, steps_per_pass: int = 0,
                          classification: bool = False) -> tuple[int | None, int, str]:
    """(patience, eval_every, reason). A classification-shaped task is validated a few times a
    pass: its labels are often learnt within the first pass, and the passes after that are
    the time a CPU run can save."""
    if not has_validation:
        return None, 0, "no validation rows: no early stopping, one validation at the end"
    every = max(1, math.ceil(total_steps / EVALS_PER_RUN))
    when = f"validation loss every {every} steps (~{EVALS_PER_RUN} times in {total_steps} steps)"
    if classification and steps_per_pass and math.ceil(steps_per_pass / CLASSIFY_EVALS_PER_PASS) < every:
        every = math.ceil(steps_per_pass / CLASSIFY_EVALS_PER_PASS)
        when = f"validation loss every {every} steps (~{CLASSIFY_EVALS_PER_PASS} times a pass of {steps_per_pass} steps)"
    return PATIENCE, every, f"{when}; stop after {PATIENCE} without improvement and keep the best weights"


def task_shape(rows: list[dict], max_labels: int = 20, max_words: int = 4) -> Shape:
    """Classification-shaped chat rows: each ends in its one assistant turn, the answers are
    short (<= ``max_words`` words) and come from a small set (2..``max_labels`` distinct,
    each seen at least twice, far fewer than the rows)."""
    if not rows or any("messages" not in r for r in rows):
        return Shape(False, "not chat rows", {})
    answers = []
    for r in rows:
        turns = [m for m in r["messages"] if m["role"] == "assistant"]
        if len(turns) != 1 or r["messages"][-1]["role"] != "assistant" or not isinstance(turns[0]["content"], str):
            return Shape(False, "rows with several or no final assistant answers", {})
        answers.append(turns[0]["content"].strip())
    labels = Counter(answers)
    longest = max(len(a.split()) for a in answers)
    if longest > max_words:
        return Shape(False, f"free-text answers (up to {longest} words)", {})
    if not 2 <= len(labels) <= min(max_labels, len(rows) // 4) or min(labels.values()) < 2:
        return Shape(False, f"{len(labels)} distinct short answers over {len(rows)} rows: not a small label set", {})
    shares = ", ".join(f"'{a}' {100 * n / len(rows):.0f}%" for a, n in labels.most_common(5))
    return Shape(True, f"{len(labels)} distinct answers of at most {longest} word(s) over {len(rows)} rows "
                       f"({shares}{', ...' if len(labels) > 5 else ''})", dict(labels))


# --- the config -------------------------------------------------------------------------


def refusals(cfg: RunConfig, auto: list[str]) -> list[str]:
    """What auto cannot decide for this config, with the reason."""
    problems = []
    if cfg.objective.name not in AUTO_OBJECTIVES:
        problems.append(f"auto with objective '{cfg.objective.name}': auto reads chat rows or text for the "
                        f"token objectives ({', '.join(AUTO_OBJECTIVES)}); set the values instead")
    if cfg.data.tasks:
        problems.append("auto with data.tasks: several datasets mixed are not sized by auto; set the values")
    if cfg.model.kind != "text":
        problems.append("auto with model.kind=vision: not supported; set the values")
    return problems


# --- resolve ----------------------------------------------------------------------------


def resolve(cfg: RunConfig, auto: list[str], device: str = "cpu") -> tuple[RunConfig, list[Decision], Shape]:
    """The config with every knob in ``auto`` decided, and the decisions with their reasons."""
    problems = refusals(cfg, auto)
    if problems:
        raise ConfigError(problems)
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    mc = load_config(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    kind = objective_of(cfg).data_kind
    splits = build_splits(cfg.data, cfg.train.seed, kind)
    if not splits.train:
        raise ConfigError(["auto: the training data has no rows to decide from"])
    train_len = token_lengths(tok, splits.train).tolist()
    held_len = token_lengths(tok, splits.validation + splits.test).tolist() if splits.validation + splits.test else []
    dtype = pick_dtype(cfg.train.dtype, device)
    n_params = sum(p.numel() for p in meta_model(mc, dtype).parameters())
    shape = task_shape(splits.train) if kind == "sft" else Shape(False, "not chat rows", {})
    out: list[Decision] = []
    t, d, m, e = {}, {}, {}, {}

    if "max_length" in auto:
        d["max_length"], why, _ = choose_max_length(train_len + held_len, getattr(mc, "max_position_embeddings", None))
        out.append(Decision("data.max_length", d["max_length"], why))
    max_length = d.get("max_length", cfg.data.max_length)
    kept = [n for n in train_len if n <= max_length]
    if "lora" in auto and cfg.method.name not in LORA_FAMILY:
        out.append(Decision("method.r", None, f"method {cfg.method.name} has no LoRA rank: nothing to decide"))
    elif "lora" in auto:
        r, why = choose_lora(n_params)
        m |= {"r": r, "alpha": 2 * r, "target_modules": "all-linear"}
        out.append(Decision("method.r", r, why))
    if "lr" in auto:
        method = method_of(cfg)
        t["lr"], why = choose_lr(cfg.method.name, n_params, method.default_lr)
        out.append(Decision("train.lr", t["lr"], why))
    method_opts = cfg.method.model_copy(update=m) if m else cfg.method
    if "batch_size" in auto:
        t["batch_size"], why = choose_batch(mc, method_opts, len(kept), max_length, dtype, device)
        out.append(Decision("train.batch_size", t["batch_size"], why))
    batch = t.get("batch_size", cfg.train.batch_size) * cfg.train.grad_accum
    if "epochs" in auto:
        t["epochs"], why = choose_epochs(len(kept), batch, sum(kept), shape.classification)
        out.append(Decision("train.epochs", t["epochs"], why))
    if "early_stopping" in auto:
        epochs = t.get("epochs", cfg.train.epochs)
        per_pass = math.ceil(len(kept) / batch)
        total = cfg.train.max_steps or max(1, math.ceil(epochs * per_pass))
        patience, every, why = choose_early_stopping(total, bool(splits.validation), per_pass, shape.classification)
        t |= {"early_stopping_patience": patience, "eval_every": every}
        out.append(Decision("train.early_stopping_patience", patience, why))
    if kind == "sft":  # the task's shape decides epochs (and, with task_shape, the eval's settings)
        out.insert(0, Decision("task", "classification" if shape.classification else "free text", shape.reason))
    if "task_shape" in auto:
        if shape.classification:
            longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in shape.labels)
            e = {"max_new_tokens": longest + 2, "metric": "exact_match"}
            out.append(Decision("eval.max_new_tokens", e["max_new_tokens"],
                                f"the longest label has {longest} tokens: generating more is wasted time"))
    new = cfg.model_copy(update={
        "train": cfg.train.model_copy(update=t), "data": cfg.data.model_copy(update=d),
        "method": method_opts, "eval": cfg.eval.model_copy(update=e)})
    return new, out, shape


def choose_batch(mc, method_opts, n_rows: int, max_length: int, dtype, device: str) -> tuple[int, str]:
    """The data's batch (desired_batch), halved until the memory plan says a step fits."""
    memory = device_memory(device)
    free = min(x.free for x in memory)
    batch = desired_batch(n_rows)
    why = f"{batch} rows a step: {n_rows} training rows give {math.ceil(n_rows / batch)} steps a pass"
    while batch > 1:
        est = estimate(mc, method_opts, batch, max_length, dtype, device, overhead=CPU_FALLBACK)
        if fits(est, memory, False):
            return batch, why + f"; the plan's peak at {batch} x {max_length} tokens is {est.peak(False) / 2**30:.1f} GB " \
                                f"of {free / 2**30:.1f} GB free"
        batch //= 2
        why = f"{batch} rows a step: a larger batch of {max_length}-token rows does not fit {free / 2**30:.1f} GB free"
    return batch, why


def report(decisions: list[Decision], shape: Shape) -> dict:
    return {"decisions": [asdict(x) for x in decisions], "task_shape": asdict(shape)}


def write(run_dir: Path, decisions: list[Decision], shape: Shape) -> None:
    write_json(Path(run_dir) / "auto.json", report(decisions, shape))


def show(decisions: list[Decision], console: Console) -> None:
    table = Table(title="auto: decided from the data")
    for col in ("setting", "value", "why"):
        table.add_column(col, overflow="fold")
    for x in decisions:
        table.add_row(x.key, str(x.value), x.reason)
    console.print(table)


def apply(cfg: RunConfig, console: Console) -> RunConfig:
    """Decide ``cfg.auto``'s settings, print them, and write auto.json into the run folder
    (made and claimed here, so the run trains in it): the config returned is concrete
    (``auto: []``), so config.yaml holds the values and a resumed run re-decides nothing."""
    console.print(f"[bold]auto[/]: deciding {', '.join(cfg.auto)} from the data")
    new, decisions, shape = resolve(cfg, list(cfg.auto), pick_device(cfg.train.device))
    name = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.name}"
    new = new.model_copy(update={"auto": [], "run_name": name})
    show(decisions, console)
    run_dir = Path(cfg.output_dir) / name
    # Only one process writes (--nproc: every rank decides the same from the same data).
    if os.environ.get("RANK", "0") == "0":
        if not claimed(run_dir):
            claim_run_dir(run_dir)
        write(run_dir, decisions, shape)
    return new
