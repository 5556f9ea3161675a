"""The head recipe (classify, reward): setup -> data -> model with a new head -> train (THE
loop, tuneforge.train.loop) -> save (adapter + head + label names) -> evaluate.

Works on causal LMs (the head reads the last non-pad token) and on encoders such as the
embedded all-MiniLM-L6-v2 (the head reads the pooled [CLS] token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console

from tuneforge.config import ConfigError, RunConfig
from tuneforge.hardware import autocast
from tuneforge.io import write_json
from tuneforge.methods import count_trainable
from tuneforge.models.load import load_sequence_classifier, load_tokenizer
from tuneforge.objectives.classify import balanced_class_weights, classification_metrics
from tuneforge.objectives.reward import bradley_terry_loss, pairwise_accuracy
from tuneforge.plugins import method_of
from tuneforge.train.continual import init_from
from tuneforge.train.loop import Loop, MeanSteps
from tuneforge.train.recipes.pairs import encode_pairs
from tuneforge.train.run_folder import RunStart, finish, start_run


def pad_ids(seqs: list[list[int]], pad_id: int) -> dict:
    """Right-padded input ids [B, T] and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask}


def chunks(items: list, size: int, seed: int | None = None, epoch: int = 0) -> list[list]:
    """Batches of ``size`` items, shuffled by (seed, epoch) when a seed is given."""
    if seed is not None:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        items = [items[i] for i in order]
    return [items[i : i + size] for i in range(0, len(items), size)]


def scores(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# --- classification ----------------------------------------------------------------------


def label_names(opts, splits) -> list[str]:
    seen = {r["label"] for s in (splits.train, splits.validation, splits.test) for r in s}
    names = opts.labels or sorted({r["label"] for r in splits.train})
    unknown = sorted(seen - set(names))
    if unknown:
        raise ConfigError([f"labels {unknown} occur in the data but not in "
                           f"{'objective.labels' if opts.labels else 'the training split'}: "
                           "add them to objective.labels or to the training data"])
    if len(names) < 2:
        raise ConfigError([f"classification needs at least two labels; the data has {names}"])
    return names


def encode_texts(tok, rows, label_ids: dict[str, int], max_length: int) -> tuple[list[tuple], int]:
    """(ids, label id) per row, truncated to max_length (the count is returned and reported)."""
    out, truncated = [], 0
    for r in rows:
        ids = tok(r["text"], truncation=False)["input_ids"]
        truncated += len(ids) > max_length
        out.append((ids[:max_length], label_ids[r["label"]]))
    return out, truncated


def class_batch(items: list[tuple], pad_id: int) -> dict:
    return pad_ids([ids for ids, _ in items], pad_id) | {"labels": torch.tensor([y for _, y in items])}


def classify_step(model, batch, weight: torch.Tensor | None = None):
    """Cross-entropy (class-weighted when ``weight`` is given: a weighted mean over the batch)."""
    logits = scores(model, batch)
    loss = F.cross_entropy(logits, batch["labels"], weight=None if weight is None else weight.to(logits.device))
    return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}


def predict(model, batches, device) -> tuple[list[int], list[int], float]:
    y_true, y_pred, loss_sum = [], [], 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = scores(model, b)
        loss_sum += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
        y_true += b["labels"].tolist()
        y_pred += logits.argmax(-1).tolist()
    return y_true, y_pred, loss_sum / max(len(y_true), 1)


# --- reward model ------------------------------------------------------------------------


def reward_batch(pairs: list[dict], pad_id: int) -> dict:
    """[2B, T]: chosen conversations first, then rejected."""
    return pad_ids([p["chosen"]["input_ids"] for p in pairs] + [p["rejected"]["input_ids"] for p in pairs], pad_id)


def reward_step(model, batch, center_coef: float):
    r = scores(model, batch)[:, 0]
    half = r.shape[0] // 2
    rc, rr = r[:half], r[half:]
    return bradley_terry_loss(rc, rr, center_coef), {"accuracy": pairwise_accuracy(rc, rr),
                                                      "margin": float((rc - rr).detach().mean())}


def reward_eval(model, batches, device, center_coef: float) -> dict:
    rc, rr = [], []
    for b in batches:
        r = scores(model, {k: v.to(device) for k, v in b.items()})[:, 0]
        rc.append(r[: r.shape[0] // 2])
        rr.append(r[r.shape[0] // 2 :])
    rc, rr = torch.cat(rc), torch.cat(rr)
    return {"val_loss": round(float(bradley_terry_loss(rc, rr, center_coef)), 5),
            "pairwise_accuracy": round(pairwise_accuracy(rc, rr), 5), "margin": round(float((rc - rr).mean()), 5),
            "reward_mean": round(float(torch.cat([rc, rr]).mean()), 5)}


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False, tracker=None) -> Path:
    console = console or Console()
    # --- setup and data ----------------------------------------------------------------
    run = start_run(cfg, resume, console)
    method, opts, t = method_of(cfg), cfg.objective, cfg.train
    is_reward = opts.name == "reward"
    tok = load_tokenizer(cfg.model.name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data, names, notes, weight, class_weights = encode_splits(cfg, tok, run, console)
    make_batch = reward_batch if is_reward else class_batch

    # --- model -------------------------------------------------------------------------
    model = load_sequence_classifier(cfg.model.name, dict(enumerate(names)),
                                     method.base_dtype(cfg.method, run.dtype), run.device, pad,
                                     cfg.model.revision, cfg.model.trust_remote_code)
    model = method.apply(model, cfg.method)
    if t.init_from:
        console.print(f"continuing from {t.init_from} ({init_from(model, t.init_from)} tensors)")
    n_train, n_total = count_trainable(model)
    console.print(f"[bold]{cfg.method.name}[/] + {opts.name} head ({len(names)} output"
                  f"{'s' if len(names) > 1 else ''}): {n_train:,} trainable of {n_total:,}")
    held = {k: [make_batch(c, pad) for c in chunks(data[k], cfg.eval.batch_size)] for k in ("validation", "test")
            if data[k]}
    if is_reward:
        step = lambda b: reward_step(model, b, opts.center_coef)  # noqa: E731
        evaluate = lambda k: reward_eval(model, held[k], run.device, opts.center_coef)  # noqa: E731
    else:
        step = lambda b: classify_step(model, b, weight)  # noqa: E731
        evaluate = lambda k: classify_eval(model, held[k], run.device, names)  # noqa: E731

    # --- train -------------------------------------------------------------------------
    steps = MeanSteps(lambda epoch: [make_batch(c, pad) for c in chunks(data["train"], t.batch_size, t.seed, epoch)],
                      step, (lambda: evaluate("validation")) if "validation" in held else None, len(data["train"]),
                      run.device, run.dtype)
    outcome = Loop(cfg, run.run_dir, model, steps, method, device=run.device, dtype=run.dtype, console=console,
                   resume=run.resume, on_eval=on_eval, tracker=tracker).run()

    # --- save ----------------------------------------------------------------------------
    method.save(model, run.run_dir / "adapter")
    tok.save_pretrained(run.run_dir / "adapter")
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    hf.config.save_pretrained(run.run_dir / "head")  # num_labels, id2label, pad id: what load_head needs

    # --- evaluate ------------------------------------------------------------------------
    results: dict = {}
    if "test" in held:
        model.eval()
        with torch.no_grad(), autocast(run.device, run.dtype):
            results = held_out_scores(model, held["test"], data, names, is_reward, opts, run.device, console)
        write_json(run.run_dir / "eval.json", results)
    summary_eval = results.get("tuned") or {k: results[k] for k in ("accuracy", "macro", "majority_baseline_accuracy")
                                            if k in results}
    return finish(run, {"steps": outcome.steps, "trainable_params": n_train, "total_params": n_total,
                        "labels": names, "data_notes": notes,
                        **({"class_weights": class_weights} if class_weights else {}),
                        "validation": outcome.last_eval, **outcome.best, "eval": summary_eval}, console)


def encode_splits(cfg: RunConfig, tok, run: RunStart, console: Console):
    """Every split encoded for the head: reward pairs, or (text ids, label id) with the label
    names. Returns (data, names, notes, class weight tensor or None, class weights by name or None)."""
    opts, s = cfg.objective, run.splits
    data, notes = {}, {}
    weight, class_weights = None, None  # classify with class_weights: balanced
    if opts.name == "reward":
        names = ["reward"]
        for split in ("train", "validation", "test"):
            data[split], dropped = encode_pairs(tok, getattr(s, split), cfg.data.max_length, cfg.data.system_prompt)
            if dropped:
                notes[f"{split}_dropped_pairs"] = dict(dropped)
    else:
        names = label_names(opts, s)
        label_ids = {n: i for i, n in enumerate(names)}
        for split in ("train", "validation", "test"):
            data[split], truncated = encode_texts(tok, getattr(s, split), label_ids, cfg.data.max_length)
            if truncated:
                notes[f"{split}_truncated"] = truncated
        if opts.class_weights == "balanced":
            w = balanced_class_weights([y for _, y in data["train"]], len(names))
            weight, class_weights = torch.tensor(w, dtype=torch.float32), {n: round(x, 4) for n, x in zip(names, w)}
            console.print(f"class weights (balanced): {class_weights}")
    for k, v in notes.items():
        console.print(f"  [yellow]{k}[/]: {v}")
    if not data["train"]:
        raise ConfigError([f"no training rows left within data.max_length={cfg.data.max_length}"])
    return data, names, notes, weight, class_weights


def classify_eval(model, batches, device, names: list[str]) -> dict:
    y_true, y_pred, loss = predict(model, batches, device)
    m = classification_metrics(y_true, y_pred, names)
    return {"val_loss": round(loss, 5), "accuracy": round(m["accuracy"], 5), "macro_f1": round(m["macro"]["f1"], 5)}


def held_out_scores(model, batches, data: dict, names: list[str], is_reward: bool, opts, device, console) -> dict:
    """The tuned head on the test split: pairwise accuracy (reward), or classification metrics
    next to the majority-class baseline."""
    if is_reward:
        results = {"tuned": reward_eval(model, batches, device, opts.center_coef)}
        console.print(f"held-out pairs ({len(data['test'])}): pairwise accuracy "
                      f"{results['tuned']['pairwise_accuracy']:.3f} (chance 0.5)")
        return results
    y_true, y_pred, _ = predict(model, batches, device)
    results = classification_metrics(y_true, y_pred, names)
    majority = max(range(len(names)), key=[y for _, y in data["train"]].count)
    results["majority_baseline_accuracy"] = sum(y == majority for y in y_true) / len(y_true)
    console.print(f"held-out ({len(y_true)}): accuracy {results['accuracy']:.3f} "
                  f"(majority class {results['majority_baseline_accuracy']:.3f}), "
                  f"macro F1 {results['macro']['f1']:.3f}")
    return results
