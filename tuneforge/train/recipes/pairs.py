"""The pair recipe (dpo, simpo, orpo): setup -> pairs -> model -> evaluate (before) ->
train (THE loop, tuneforge.train.loop) -> save -> evaluate (after).

The model, its reference (the policy with its adapter disabled) and the held-out scoring
are tuneforge.train.recipes.scoring's, shared with the unpaired recipe (kto).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from tuneforge.config import ConfigError, RunConfig
from tuneforge.data.render import pad_batch, render_chat, with_system
from tuneforge.io import write_json
from tuneforge.plugins import method_of, objective_of
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


def encode_pairs(tok, rows: list[dict], max_length: int, system_prompt: str | None) -> tuple[list[dict], Counter]:
    """Each pair -> chosen and rejected conversations rendered like SFT rows (labels on the
    answer and its end-of-turn token). Pairs with either side over max_length are dropped
    and counted: truncating one side would bias the comparison."""
    out, dropped = [], Counter()
    for row in rows:
        prompt = with_system(row["prompt"], system_prompt)
        # An answer is a string, or (from prepared folders) a list of assistant turns.
        sides = {k: render_chat(tok, [*prompt, *(row[k] if isinstance(row[k], list)
                                                  else [{"role": "assistant", "content": row[k]}])],
                                 row.get("tools"))
                 for k in ("chosen", "rejected")}
        if max(len(ids) for ids, _ in sides.values()) > max_length:
            dropped["longer than max_length"] += 1
            continue
        out.append({k: {"input_ids": ids, "labels": labels} for k, (ids, labels) in sides.items()})
    return out, dropped


def pair_batches(pairs: list[dict], batch_size: int, pad_id: int, seed: int, epoch: int, shuffle: bool = True):
    """Micro-batches of B pairs as one padded [2B, T] batch: chosen rows first, then rejected."""
    order = (torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
             if shuffle else range(len(pairs)))
    ordered = [pairs[i] for i in order]
    return [pad_batch([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk], pad_id)
            for chunk in (ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size))]


def pair_step(model, reference: Reference | None, objective, opts, batch: dict):
    """Loss and metrics for one pair batch (``reference`` is None for reference-free losses)."""
    logp, n = batch_logps(model, batch)
    half = logp.shape[0] // 2
    pc, pr, nc, nr = logp[:half], logp[half:], n[:half], n[half:]
    rc = rr = None
    if reference is not None:
        ref_logp, _ = reference.logps(batch)
        rc, rr = ref_logp[:half], ref_logp[half:]
    loss, r_chosen, r_rejected = objective.pair_loss(opts, pc, pr, nc, nr, rc, rr)
    metrics = {"reward_chosen": float(r_chosen.mean()), "reward_rejected": float(r_rejected.mean()),
               "reward_margin": float((r_chosen - r_rejected).mean()),
               "reward_accuracy": float((r_chosen > r_rejected).float().mean()),
               # Does the policy itself give the chosen answer more probability (per token)?
               "logp_accuracy": float((pc / nc > pr / nr).float().mean())}
    return loss.mean(), metrics


def evaluate_pairs(model, reference, objective, opts, batches: list[dict], device: str) -> dict:
    """Metrics averaged over held-out pairs (weighted by the pairs in each batch)."""
    totals: dict[str, float] = {}
    n_pairs = 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        loss, m = pair_step(model, reference, objective, opts, b)
        k = b["input_ids"].shape[0] // 2
        for name, v in {"val_loss": float(loss), **m}.items():
            totals[name] = totals.get(name, 0.0) + v * k
        n_pairs += k
    return {name: round(v / max(n_pairs, 1), 5) for name, v in totals.items()}


def train(cfg: RunConfig, resume: Path | None = None, console: Console | None = None,
          on_eval: Callable[[int, float], None] | None = None, force: bool = False, tracker=None) -> Path:
    console = console or Console()
    # --- setup and data ----------------------------------------------------------------
    run = start_run(cfg, resume, console)
    objective, opts = objective_of(cfg), cfg.objective
    tok = tokenizer_of(cfg)
    pairs, dropped = {}, {}
    for split in ("train", "validation", "test"):
        pairs[split], dropped[split] = encode_pairs(tok, getattr(run.splits, split), cfg.data.max_length,
                                                    cfg.data.system_prompt)
        for reason, n in dropped[split].items():
            console.print(f"  [yellow]{split}: dropped {n} pairs[/] ({reason})")
    if not pairs["train"]:
        raise ConfigError([f"every training pair is longer than data.max_length={cfg.data.max_length}"])

    # --- model -------------------------------------------------------------------------
    policy = load_policy(cfg, run, tok, objective.needs_reference, console)
    model, reference = policy.model, policy.reference
    t, pad = cfg.train, tok.pad_token_id
    held = {s: pair_batches(pairs[s], cfg.eval.batch_size, pad, t.seed, 0, shuffle=False)
            for s in ("validation", "test") if pairs[s]}

    def on_held(split):
        return lambda: evaluate_pairs(model, reference, objective, opts, held[split], run.device)

    # Before training the policy is the reference: the baseline.
    results = {"base": score_held_out(model, run, on_held("test"))} if "test" in held else {}

    # --- train -------------------------------------------------------------------------
    steps = MeanSteps(lambda epoch: pair_batches(pairs["train"], t.batch_size, pad, t.seed, epoch),
                      lambda b: pair_step(model, reference, objective, opts, b),
                      on_held("validation") if "validation" in held else None, len(pairs["train"]),
                      run.device, run.dtype)
    outcome = Loop(cfg, run.run_dir, model, steps, method_of(cfg), device=run.device, dtype=run.dtype,
                   console=console, resume=run.resume, on_eval=on_eval, tracker=tracker).run()

    # --- save and evaluate ---------------------------------------------------------------
    save_policy(cfg, run, model, tok)
    if "test" in held:
        results["tuned"] = score_held_out(model, run, on_held("test"))
        write_json(run.run_dir / "eval.json", results | {"pairs": len(pairs["test"])})
        console.print(f"held-out pairs ({len(pairs['test'])}): " + "  ".join(
            f"{m} {results['base'][m]:.3f} -> {results['tuned'][m]:.3f}"
            for m in ("logp_accuracy", "reward_accuracy", "reward_margin")))
    return finish(run, {"steps": outcome.steps, "trainable_params": policy.n_train, "total_params": policy.n_total,
                        "pairs": {k: len(v) for k, v in pairs.items()},
                        "dropped_pairs": {k: dict(v) for k, v in dropped.items() if v},
                        "validation": outcome.last_eval, **outcome.best, "eval": results}, console)
