"""The vision-language recipe (model.kind=vision): setup -> data -> model -> train -> save -> evaluate.

Rows with images (tuneforge.data.images) are rendered by the model's own processor: its chat
template writes the conversation, and it expands each image into the placeholder tokens the
model fills with image features. The loss falls on the assistant turns only, and never on an
image token (labels -100 there, tuneforge.models.vision.image_token_ids).

LoRA adapts the language model's linear layers only; the vision tower (and the projector) stay
frozen unless ``model.vision.train_vision_tower`` / ``train_projector`` make them trainable in
full, through peft's ``modules_to_save``: the adapter folder then holds them too, and
``PeftModel.from_pretrained`` puts them back. The run folder is the text recipe's: config.yaml,
environment.json, data_report.json, metrics.jsonl, loss.png, checkpoints/, adapter/ (peft
adapter + processor), eval.json, eval_samples.jsonl, summary.json.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console

from tuneforge.config import ConfigError, RunConfig, VisionOptions, to_yaml
from tuneforge.data.images import n_images, open_image, with_system
from tuneforge.data.load import DataError
from tuneforge.data.prepare import build_splits
from tuneforge.evaluate.plots import plot_losses
from tuneforge.evaluate.vision import evaluate_vision_rows, render, split_images
from tuneforge.hardware import autocast, environment, path_note, peak_memory, pick_device, pick_dtype
from tuneforge.io import atomic_write_text, write_json
from tuneforge.methods import count_trainable
from tuneforge.methods.base import check_target_modules
from tuneforge.models.vision import (
    find_parts,
    fix_vision_generation,
    image_token_ids,
    load_processor,
    load_vision_model,
    meta_vision_module_names,
)
from tuneforge.plugins import method_of
from tuneforge.train.loop import Loop, Window
from tuneforge.train.recipes.tokens import print_before_after
from tuneforge.train.run_folder import new_run_dir, writable
from tuneforge.train.tracking import missing_trackers


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False, tracker=None) -> Path:
    t_start = time.perf_counter()
    console = console or Console()
    vopts = cfg.model.vision or VisionOptions()
    # --- setup -------------------------------------------------------------------------
    parts = preflight(cfg)
    run_dir, device, dtype = setup(cfg, resume, console)
    method = method_of(cfg)

    # --- data --------------------------------------------------------------------------
    splits = build_splits(cfg.data, cfg.train.seed, "vision")
    proc = load_processor(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
    enc = {k: encode_rows(proc, prompted(getattr(splits, k), cfg.data.system_prompt), cfg.data.max_length,
                          cfg.data.overlength, vopts.max_images)
           for k in ("train", "validation")}
    report_data(run_dir, splits, enc, console)
    if not enc["train"].rows:
        raise ConfigError([f"no training row fits data.max_length={cfg.data.max_length} (with its image tokens) "
                           f"and model.vision.max_images={vopts.max_images}: raise them "
                           f"({next(iter(enc['train'].examples.values()), [''])[0]})"])

    # --- model -------------------------------------------------------------------------
    model = load_vision_model(cfg.model.name, dtype, device, cfg.model.attn_implementation, cfg.model.revision,
                              cfg.model.trust_remote_code)
    fix_vision_generation(proc, model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.method, parts, vopts)
    n_train, n_total = count_trainable(model)
    console.print(f"[bold]{cfg.method.name}[/] on the language model"
                  + (", projector trained" if vopts.train_projector else "")
                  + (", vision tower trained" if vopts.train_vision_tower else ", vision tower frozen")
                  + f": {n_train:,} trainable of {n_total:,} parameters ({100 * n_train / n_total:.3f}%)")
    steps = VisionSteps(cfg, model, proc, enc["train"].rows, enc["validation"].rows, device, dtype)

    # --- train -------------------------------------------------------------------------
    outcome = Loop(cfg, run_dir, model, steps, method, device=device, dtype=dtype, console=console,
                   resume=resume is not None, on_eval=on_eval, tracker=tracker).run()

    # --- save --------------------------------------------------------------------------
    summary = {"kind": "vision", "steps": outcome.steps, "train_seconds": round(outcome.train_seconds, 1),
               "tokens_per_s": round(outcome.tokens_per_s, 1), **peak_memory(device), "trainable_params": n_train,
               "total_params": n_total, "data_manifest_sha256": splits.manifest_hash(), "world_size": 1,
               **outcome.best}
    method.save(model, run_dir / "adapter")
    proc.save_pretrained(run_dir / "adapter")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")

    # --- evaluate ----------------------------------------------------------------------
    if cfg.eval.metric != "none" and splits.test:
        summary["eval"] = evaluate(cfg, model, proc, prompted(splits.test, cfg.data.system_prompt), device, dtype,
                                   run_dir, console)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(run_dir / "summary.json", summary)
    console.print(f"[bold green]done[/] in {summary['total_seconds']:.0f}s: {run_dir}")
    return run_dir


# --- setup ------------------------------------------------------------------------------------


def preflight(cfg: RunConfig):
    """Checks that need the model's config (not its weights), all problems at once; returns the
    model's parts (vision tower, projector, language model)."""
    try:
        names = meta_vision_module_names(cfg.model.name, revision=cfg.model.revision,
                                         trust_remote_code=cfg.model.trust_remote_code)
        parts = find_parts(names)
    except Exception as e:  # noqa: BLE001 - reported as a config problem, with the loader's message
        raise ConfigError([f"model.name: {e}"]) from None
    lm = [n for n in names if n.startswith(parts.language + ".")]
    problems = check_target_modules(cfg.method.target_modules, lm, "method.target_modules (in the language model)")
    vopts = cfg.model.vision or VisionOptions()
    if vopts.train_projector and parts.projector is None:
        problems.append(f"model.vision.train_projector: no projector module found in {cfg.model.name} "
                        f"(looked for {', '.join(('multi_modal_projector', 'connector', 'merger'))})")
    for spec in (*cfg.data.train, *cfg.data.validation, *cfg.data.test):
        if not Path(spec).exists():
            problems.append(f"data: '{spec}' does not exist (working directory: {Path.cwd()})")
    problems += missing_trackers(cfg)
    if problems:
        raise ConfigError(problems)
    return parts


def prompted(rows: list[dict], system_prompt: str | None) -> list[dict]:
    """The rows with data.system_prompt where they have no system turn (the split's rows, and so
    its manifest hash, stay as loaded)."""
    return [{**r, "messages": with_system(r["messages"], system_prompt)} for r in rows] if system_prompt else rows


def setup(cfg: RunConfig, resume: Path | None, console: Console):
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    run_dir = resume or new_run_dir(cfg)
    if resume:
        writable(run_dir)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    write_json(run_dir / "environment.json", environment(device, dtype) | {"world_size": 1})
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    console.print(f"[bold]run[/] {run_dir}  kind=vision device={device} dtype={str(dtype).replace('torch.', '')}")
    return run_dir, device, dtype


# --- data: rows -> token ids and labels ---------------------------------------------------


class Encoded:
    """One split's encoded rows and what was dropped (every row accounted: read = kept + dropped)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.dropped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(detail)


def _ids(proc, text: str, images: list) -> list[int]:
    out = proc(text=[text], images=[images] if images else None, return_tensors="pt", add_special_tokens=False)
    return out["input_ids"][0].tolist()


def encode_row(proc, messages: list[dict], image_ids: set[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: labels copy the ids of every assistant turn
    (through its end-of-turn token) and are -100 elsewhere, and always on image tokens.

    Each assistant turn's span is found by rendering the conversation up to it (with the
    generation prompt) and through it: the template writes both as prefixes of the whole."""
    images = [open_image(p["image"]) for m in messages for p in m["content"] if p.get("type") == "image"]
    ids = _ids(proc, render(proc, messages), images)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = messages[:i]
        k = n_images(before)
        start = _ids(proc, render(proc, before, generation_prompt=True), images[:k])
        end = len(_ids(proc, render(proc, messages[: i + 1]), images[:k]))
        if ids[: len(start)] != start or end > len(ids):
            raise DataError("the processor's chat template does not render a conversation's beginning as a "
                            "prefix of the whole, so the assistant turns cannot be found in the tokens")
        labels[len(start):end] = ids[len(start):end]
    return ids, [-100 if t in image_ids else y for t, y in zip(ids, labels)]


def encode_rows(proc, rows: list[dict], max_length: int, overlength: str, max_images: int) -> Encoded:
    """Token ids and labels of each row; rows over data.max_length (image tokens included) or
    with more than max_images images are dropped and counted (truncation would cut images)."""
    out, image_ids = Encoded(), image_token_ids(proc)
    for row in rows:
        where = row.get("_where", "?")
        if n_images(row["messages"]) > max_images:
            out.drop("too many images", f"{where}: {n_images(row['messages'])} images > model.vision.max_images="
                                        f"{max_images}")
            continue
        ids, labels = encode_row(proc, row["messages"], image_ids)
        if len(ids) > max_length:
            detail = f"{where}: {len(ids)} tokens (image tokens included) > data.max_length={max_length}"
            if overlength == "error":
                raise DataError(detail + " (data.overlength=error)")
            out.drop("longer than max_length", detail)
            continue
        if not any(y != -100 for y in labels):
            out.drop("no trained token", f"{where}: the assistant answer rendered to no token")
            continue
        out.rows.append({"messages": row["messages"], "input_ids": ids, "labels": labels, "_where": where})
    return out


def report_data(run_dir: Path, splits, enc: dict[str, Encoded], console: Console) -> None:
    write_json(run_dir / "data_report.json", {
        "manifest_sha256": splits.manifest_hash(), "prepared": splits.prepared,
        "rows": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        "load": {k: v.as_dict() for k, v in splits.reports.items()},
        "render": {k: {"kept": len(e.rows), "dropped": dict(e.dropped), "examples": e.examples}
                   for k, e in enc.items()},
        "images": {k: sum(n_images(r["messages"]) for r in getattr(splits, k))
                   for k in ("train", "validation", "test")}})
    for k, r in splits.reports.items():
        console.print(f"data {k}: {r.read} rows read, {r.kept} kept; format {r.format} ({r.format_reason})")
        for reason, n in r.dropped.items():
            console.print(f"  [yellow]dropped {n}[/] ({reason}), e.g. {r.examples[reason][0]}")
    for k, e in enc.items():
        for reason, n in e.dropped.items():
            console.print(f"  [yellow]{k}: dropped {n}[/] ({reason}), e.g. {e.examples[reason][0]}")
    console.print(f"splits: train {len(enc['train'].rows)}, validation {len(enc['validation'].rows)}, "
                  f"test {len(splits.test)}")


def collate(proc, rows: list[dict]) -> dict:
    """A micro-batch: the processor's tensors for the rows (right padded) and their labels."""
    texts = [render(proc, r["messages"]) for r in rows]
    images = [[open_image(ref) for ref in split_images(r["messages"])] for r in rows]
    tok = proc.tokenizer
    side, tok.padding_side = tok.padding_side, "right"
    try:
        batch = dict(proc(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt",
                          add_special_tokens=False))
    finally:
        tok.padding_side = side
    labels = torch.full_like(batch["input_ids"], -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        if batch["input_ids"][i, :n].tolist() != r["input_ids"]:
            raise DataError(f"{r['_where']}: the processor encodes this row differently in a batch than alone")
        labels[i, :n] = torch.tensor(r["labels"])
    batch["labels"] = labels
    return batch


# --- model ------------------------------------------------------------------------------------


def lora_targets(model, targets, language: str) -> list[str]:
    """Full names of the language model's linear layers to adapt (all-linear, or those whose
    last name part is listed); never a layer of the vision tower or projector, nor the lm_head."""
    names = []
    for n, m in model.named_modules():
        if not n.startswith(language + ".") or not isinstance(m, torch.nn.Linear):
            continue
        if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets:
            names.append(n)
    return names


def apply_lora(model, opts, parts, vopts: VisionOptions):
    # deferred: peft imports transformers; config validation and --help stay quick
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, opts.target_modules, parts.language)
    if not targets:
        raise ConfigError([f"method.target_modules={opts.target_modules}: no linear layer of the language model "
                           f"({parts.language}) matches"])
    full = [parts.vision] if vopts.train_vision_tower else []
    if vopts.train_projector and parts.projector and not (full and parts.projector.startswith(parts.vision + ".")):
        full.append(parts.projector)
    config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                        use_rslora=opts.rslora, modules_to_save=full or None)
    model = get_peft_model(model, config)
    for p in model.parameters():  # weights trained in full are updated in fp32 (a bf16 base stays bf16 elsewhere)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


# --- the loop's view ----------------------------------------------------------------------------


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the trained tokens, and their count."""
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((target != -100).sum())


class VisionSteps:
    """Seeded micro-batches of encoded rows; a window's loss is its token-sum over its trained tokens."""

    def __init__(self, cfg: RunConfig, model, proc, rows: list[dict], val_rows: list[dict], device: str,
                 dtype: torch.dtype):
        self.cfg, self.model, self.proc, self.rows, self.val_rows = cfg, model, proc, rows, val_rows
        self.device, self.dtype, self.n_rows = device, dtype, len(rows)

    def batches(self, epoch: int) -> list[dict]:
        order = list(range(len(self.rows)))
        random.Random(self.cfg.train.seed * 1000 + epoch).shuffle(order)
        bs = self.cfg.train.batch_size
        return [{"rows": order[i : i + bs]} for i in range(0, len(order), bs)]

    def _to(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def backward(self, window: list[dict]) -> Window:
        batches = [collate(self.proc, [self.rows[i] for i in b["rows"]]) for b in window]
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            with autocast(self.device, self.dtype):
                loss_sum, _ = token_loss_sum(self.model, self._to(b))
            (loss_sum / max(n_tok, 1)).backward()
            total += loss_sum.item()
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return Window(total / max(n_tok, 1), tokens=tokens, extra={"trained_tokens": n_tok})

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if not self.val_rows:
            return None
        was = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        bs = self.cfg.train.batch_size
        for i in range(0, len(self.val_rows), bs):
            with autocast(self.device, self.dtype):
                loss_sum, k = token_loss_sum(self.model, self._to(collate(self.proc, self.val_rows[i : i + bs])))
            total, n = total + loss_sum.item(), n + k
        self.model.train(was)
        return {"val_loss": total / max(n, 1)}


# --- held-out evaluation ------------------------------------------------------------------------


def evaluate(cfg: RunConfig, model, proc, test_rows: list[dict], device, dtype, run_dir: Path, console) -> dict:
    """Base (adapter off) vs tuned generations on the test rows -> eval.json, eval_samples.jsonl."""
    import json

    kw = dict(device=device, autocast_dtype=None if dtype == torch.float32 else dtype)
    results = {}
    if cfg.eval.baseline:
        with model.disable_adapter():
            results["base"] = evaluate_vision_rows(model, proc, test_rows, cfg.eval, label="base model", **kw)
    results["tuned"] = evaluate_vision_rows(model, proc, test_rows, cfg.eval, label="tuned model", **kw)
    with open(run_dir / "eval_samples.jsonl", "w") as f:
        for who, r in results.items():
            for s in r.pop("samples"):
                f.write(json.dumps({"model": who, **s}) + "\n")
    write_json(run_dir / "eval.json", results)
    print_before_after(results, console, caption=path_note(device, dtype))
    return {who: r["scores"] for who, r in results.items()}
