"""The unpaired recipe (kto): setup -> unpaired rows -> model -> evaluate (before) -> train
(THE loop, tuneforge.train.loop) -> save -> evaluate (after).

Each row is one completion with a desirable/undesirable label. A batch of B rows also carries
B *mismatched* rows (completion i after prompt i+1 mod B, as TRL's KTOTrainer builds them):
their policy-minus-reference log-ratio estimates KL(π ‖ π_ref), KTO's reference point z
(tuneforge.objectives.kto). The model, its reference (the policy with its adapter disabled)
and the held-out scoring are tuneforge.train.recipes.scoring's, shared with the pair recipe.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from tuneforge.config import ConfigError, RunConfig
from tuneforge.data.render import IGNORE, pad_batch, prompt_ids, render_chat, with_system
from tuneforge.hardware import to_device
from tuneforge.io import write_json
from tuneforge.objectives.kto import kl_reference_point, kto_unpaired_loss, kto_weight_advice
from tuneforge.plugins import method_of
from tuneforge.train.loop import Loop, MeanSteps
from tuneforge.train.recipes.scoring import (
    Reference,
    batch_logps,
    load_policy,
    save_policy,
    score_held_out,
    tokenizer_of,
)
from tuneforge.train.run_folder import finish, start_run

# What eval.json's numbers are, written beside them.
MEASURED = {
    "reward": "β (log π(y|x) - log π_ref(y|x)) of each held-out completion, averaged per label",
    "kl": "the reference point z: policy minus reference log-prob of mismatched completions (completion i "
          "after prompt i+1 within each eval batch of eval.batch_size rows), averaged, clamped at 0",
    "accuracy": "share of held-out rows on their label's side of z: desirable rows with r > z and "
                "undesirable rows with r < z (r = log π/π_ref); 0 before training, where r = z = 0",
    "val_loss": "the KTO loss (weighted by desirable_weight/undesirable_weight), mean per row",
}


def encode_unpaired(tok, rows: list[dict], max_length: int, system_prompt: str | None) -> tuple[list[dict], Counter]:
    """Each row -> prompt ids, completion ids and labels, rendered as one conversation with
    the chat template (render_chat); labels only on the completion's assistant tokens (an
    assistant turn inside the prompt is context, not trained). Rows over max_length are
    dropped and counted."""
    out, dropped = [], Counter()
    for row in rows:
        prompt = with_system(row["prompt"], system_prompt)
        ids, labels = render_chat(tok, [*prompt, *row["completion"]], row.get("tools"))
        if len(ids) > max_length:
            dropped["longer than max_length"] += 1
            continue
        cut = len(prompt_ids(tok, [*prompt, row["completion"][0]], row.get("tools")))  # the prompt and the answer header
        out.append({"prompt_ids": ids[:cut], "completion_ids": ids[cut:], "completion_labels": labels[cut:],
                    "label": bool(row["label"])})
    return out, dropped


def _rendered(prompt: dict, answer: dict, max_length: int) -> dict:
    ids = (prompt["prompt_ids"] + answer["completion_ids"])[:max_length]
    labels = ([IGNORE] * len(prompt["prompt_ids"]) + answer["completion_labels"])[:max_length]
    return {"input_ids": ids, "labels": labels}


def unpaired_batch(rows: list[dict], pad_id: int, max_length: int) -> dict:
    """B rows as one padded batch, the B mismatched rows of the KL estimate under ``kl_*``
    keys (completion i after prompt i+1 mod B; cut to max_length), and ``label`` [B] bool."""
    batch = pad_batch([_rendered(r, r, max_length) for r in rows], pad_id)
    mismatched = pad_batch([_rendered(p, r, max_length) for r, p in zip(rows, rows[1:] + rows[:1])], pad_id)
    return batch | {f"kl_{k}": v for k, v in mismatched.items()} | {"label": torch.tensor([r["label"] for r in rows])}


def unpaired_batches(rows: list[dict], batch_size: int, pad_id: int, max_length: int, seed: int, epoch: int,
                     shuffle: bool = True) -> list[dict]:
    order = (torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
             if shuffle else range(len(rows)))
    ordered = [rows[i] for i in order]
    return [unpaired_batch(ordered[i : i + batch_size], pad_id, max_length) for i in range(0, len(ordered), batch_size)]


def score_batch(model, reference: Reference, opts, batch: dict):
    """(loss [B], log-ratio r [B], reference point z) for one batch. The policy's pass over
    the mismatched rows runs without gradients: z is a detached estimate (as in TRL)."""
    mismatched = {k: batch[f"kl_{k}"] for k in ("input_ids", "attention_mask", "labels")}
    logp, _ = batch_logps(model, batch)
    with torch.no_grad():
        kl_logp, _ = batch_logps(model, mismatched)
    ref_logp, _ = reference.logps(batch)
    ref_kl_logp, _ = reference.logps(mismatched)
    z = kl_reference_point(kl_logp, ref_kl_logp)
    loss, _ = kto_unpaired_loss(logp, ref_logp, batch["label"], z, opts.beta, opts.desirable_weight,
                                opts.undesirable_weight)
    return loss, (logp - ref_logp).detach(), z


def on_their_side(r: torch.Tensor, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per row: desirable with r > z, or undesirable with r < z (bool [B])."""
    return torch.where(label.bool(), r > z, r < z)


def unpaired_step(model, reference: Reference, opts, batch: dict):
    """Mean loss and the step's metrics (z and the share of rows on their side of it)."""
    loss, r, z = score_batch(model, reference, opts, batch)
    return loss.mean(), {"kl": float(z), "accuracy": float(on_their_side(r, z, batch["label"]).float().mean())}


def evaluate_unpaired(model, reference: Reference, opts, batches: list[dict], device: str) -> dict:
    """Held-out metrics (MEASURED says what each is): sums over batches, then divided by
    the rows of each label, so a batch without one label weighs nothing for its means."""
    t = Counter()
    for b in batches:
        b = to_device(b, device)
        loss, r, z = score_batch(model, reference, opts, b)
        good, right = b["label"].bool(), on_their_side(r, z, b["label"])
        t["rows"] += len(r)
        t["loss"] += float(loss.detach().sum())
        t["kl"] += float(z) * len(r)
        for name, rows in (("desirable", good), ("undesirable", ~good)):
            t[f"n_{name}"] += int(rows.sum())
            t[f"reward_{name}"] += float(opts.beta * r[rows].sum())
            t[f"right_{name}"] += int(right[rows].sum())
    out = {"val_loss": t["loss"] / max(t["rows"], 1), "kl": t["kl"] / max(t["rows"], 1),
           "accuracy": (t["right_desirable"] + t["right_undesirable"]) / max(t["rows"], 1)}
    for name in ("desirable", "undesirable"):
        if t[f"n_{name}"]:  # a split without one label has no mean for it
            out[f"reward_{name}"] = t[f"reward_{name}"] / t[f"n_{name}"]
            out[f"accuracy_{name}"] = t[f"right_{name}"] / t[f"n_{name}"]
    return {k: round(v, 5) for k, v in out.items()}


def label_balance(rows: list[dict], opts, console: Console) -> dict:
    """The training split's label counts, and TRL's weight advice when it does not hold
    (a warning: the run goes on)."""
    n_d = sum(r["label"] for r in rows)
    advice = kto_weight_advice(n_d, len(rows) - n_d, opts.desirable_weight, opts.undesirable_weight)
    if advice:
        console.print(f"[yellow]warning:[/] {advice}")
    return {"n_desirable": n_d, "n_undesirable": len(rows) - n_d, "advice": advice}


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False, tracker=None) -> Path:
    console = console or Console()
    # --- setup and data ----------------------------------------------------------------
    run = start_run(cfg, resume, console)
    opts, d = cfg.objective, cfg.data
    tok = tokenizer_of(cfg)
    rows, dropped = {}, {}
    for split in ("train", "validation", "test"):
        rows[split], dropped[split] = encode_unpaired(tok, getattr(run.splits, split), d.max_length, d.system_prompt)
        for reason, n in dropped[split].items():
            console.print(f"  [yellow]{split}: dropped {n} rows[/] ({reason})")
    if not rows["train"]:
        raise ConfigError([f"every training row is longer than data.max_length={d.max_length}"])
    balance = label_balance(rows["train"], opts, console)

    # --- model -------------------------------------------------------------------------
    policy = load_policy(cfg, run, tok, True, console)
    model, reference = policy.model, policy.reference
    t, pad = cfg.train, tok.pad_token_id
    held = {s: unpaired_batches(rows[s], cfg.eval.batch_size, pad, d.max_length, t.seed, 0, shuffle=False)
            for s in ("validation", "test") if rows[s]}

    def on_held(split):
        return lambda: evaluate_unpaired(model, reference, opts, held[split], run.device)

    # Before training the policy is the reference: the baseline.
    results = {"base": score_held_out(model, run, on_held("test"))} if "test" in held else {}

    # --- train -------------------------------------------------------------------------
    steps = MeanSteps(lambda epoch: unpaired_batches(rows["train"], t.batch_size, pad, d.max_length, t.seed, epoch),
                      lambda b: unpaired_step(model, reference, opts, b),
                      on_held("validation") if "validation" in held else None, len(rows["train"]),
                      run.device, run.dtype)
    outcome = Loop(cfg, run.run_dir, model, steps, method_of(cfg), device=run.device, dtype=run.dtype,
                   console=console, resume=run.resume, on_eval=on_eval, tracker=tracker).run()

    # --- save and evaluate ---------------------------------------------------------------
    save_policy(cfg, run, model, tok)
    if "test" in held:
        results["tuned"] = score_held_out(model, run, on_held("test"))
        write_json(run.run_dir / "eval.json", results | {"rows": len(rows["test"]), "measured": MEASURED})
        console.print(f"held-out unpaired rows ({len(rows['test'])}): " + "  ".join(
            f"{m} {results['base'][m]:.3f} -> {results['tuned'][m]:.3f}"
            for m in ("accuracy", "reward_desirable", "reward_undesirable", "kl") if m in results["base"]))
    return finish(run, {"steps": outcome.steps, "trainable_params": policy.n_train, "total_params": policy.n_total,
                        "rows": {k: len(v) for k, v in rows.items()}, "labels_train": balance,
                        "dropped_rows": {k: dict(v) for k, v in dropped.items() if v},
                        "validation": outcome.last_eval, **outcome.best, "eval": results,
                        "measured": MEASURED}, console)
