"""The promotion gate: a candidate version against the version an alias points at, decided on
a paired comparison on the same test rows.

``gated_promote`` reads top to bottom:
  rows      both versions' per-example scores on the same rows: the stored training-time
            evals when both scored the same rows (same rows hash, or the same prompts and
            references in order) with the same main metric; otherwise both are scored now on
            the candidate's test split, with the candidate's eval settings
  checks    a sequence of refusals (``CHECKS``): too few rows (says how many are needed),
            then the paired bootstrap interval of new - old (refused when it cannot show the
            candidate is no worse than ``margin``)
  promote   Registry.promote with the verdict, which it records (forced or not) in the
            alias history
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import Field
from rich.console import Console

from tuneforge.config import Strict
from tuneforge.evaluate.stats import paired_bootstrap
from tuneforge.registry.store import Registry, VersionInfo, parse_ref


class GateOptions(Strict):
    min_rows: int = Field(30, ge=1, description="rows both versions must be scored on before the gate decides")
    margin: float = Field(0.0, ge=0, description="the candidate passes when the interval's lower end of "
                          "new - old is at or above -margin (it is shown to be no worse by more than this)")
    confidence: float = Field(0.95, gt=0, lt=1)
    n_resamples: int = Field(2000, gt=0)
    seed: int = 0


@dataclass
class Scored:
    """One version's per-example main-metric scores on a list of rows."""
    metric: str
    scores: list[float]
    keys: list[tuple[str, str]] | None = None  # (prompt, reference) per row, when known
    rows_sha256: str | None = None


@dataclass
class Verdict:
    ok: bool
    summary: str  # one line with the numbers: printed, and recorded in the alias history
    numbers: dict = field(default_factory=dict)
    old_number: int | None = None  # the version the alias pointed at when the gate ran


# (new - old) a version may not be promoted over; None: this check passes.
Check = Callable[[Scored, Scored, GateOptions, dict], str | None]
# Scores a run folder on chat rows: (run_dir, rows, label, eval settings) -> Scored.
Scorer = Callable[[str, list[dict], str, object], Scored]


def stored_scores(run_dir: str | Path) -> Scored | None:
    """The tuned model's per-example main-metric scores from the run's training-time eval:
    eval.json's per_example (or eval_samples.jsonl's score), or None without them."""
    run_dir = Path(run_dir)
    if not (run_dir / "eval.json").is_file():
        return None
    tuned = json.loads((run_dir / "eval.json").read_text()).get("tuned")
    if not isinstance(tuned, dict) or not isinstance(tuned.get("scores"), dict) or not tuned["scores"]:
        return None
    metric = next(iter(tuned["scores"]))  # evaluate.metrics puts the main metric first
    samples_file = run_dir / "eval_samples.jsonl"
    samples = [s for s in map(json.loads, samples_file.read_text().splitlines())
               if s.get("model") == "tuned"] if samples_file.is_file() else []
    scores = (tuned.get("per_example") or {}).get(metric) or [s.get("score") for s in samples]
    if not scores or not all(isinstance(x, (int, float)) for x in scores):
        return None
    keys = [(str(s.get("prompt")), str(s.get("reference"))) for s in samples] or None
    return Scored(metric, [float(x) for x in scores], keys, tuned.get("rows_sha256"))


def same_rows(a: Scored, b: Scored) -> bool:
    """Scored on the same rows in the same order, with the same metric."""
    if a.metric != b.metric or len(a.scores) != len(b.scores):
        return False
    if a.rows_sha256 and b.rows_sha256:
        return a.rows_sha256 == b.rows_sha256
    return a.keys is not None and a.keys == b.keys and len(a.keys) == len(a.scores)


def score_run_on_rows(run_dir: str, rows: list[dict], label: str, ev) -> Scored:
    """The default scorer: ``run_dir``'s model on ``rows`` (greedy answers, a progress bar per
    version) under the eval settings ``ev`` (an EvalConfig: the same for both versions)."""
    import gc  # deferred with the model stack: promote without re-scoring loads no weights

    from tuneforge.evaluate.task import evaluate_rows
    from tuneforge.runs import load_for_inference

    model, tok, system_prompt, device, dtype = load_for_inference(run_dir)
    r = evaluate_rows(model, tok, rows, ev, device=device, system_prompt=system_prompt, label=label,
                      autocast_dtype=None if str(dtype) == "torch.float32" else dtype)
    del model
    gc.collect()
    metric = next(iter(r["per_example"]))
    return Scored(metric, r["per_example"][metric], None, r["rows_sha256"])


def candidate_test_rows(run_dir: str) -> tuple[list[dict], object]:
    """The candidate's held-out test split, re-derived from its config (refused if its data
    changed), and its eval settings: every row, and a metric even where eval.metric is none."""
    from tuneforge.evaluate.command import load_eval_rows  # deferred: the evaluation stack
    from tuneforge.runs import load_run_config

    cfg = load_run_config(Path(run_dir))
    rows, *_ = load_eval_rows("test", cfg, Path(run_dir))
    ev = cfg.eval.model_copy(update={"limit": None, "metric": "auto" if cfg.eval.metric == "none" else cfg.eval.metric})
    return rows, ev


def paired_scores(new: VersionInfo, old: VersionInfo, scorer: Scorer | None,
                  console: Console) -> tuple[Scored, Scored, str]:
    """(old, new, how): the stored scores when they pair up, else both scored now."""
    a, b = stored_scores(old.run_dir), stored_scores(new.run_dir)
    if a is not None and b is not None and same_rows(a, b):
        return a, b, "stored training-time evals (same rows)"
    why = ("a version has no per-example eval scores" if a is None or b is None else
           f"different main metrics ({a.metric} vs {b.metric})" if a.metric != b.metric else
           "their stored evals are on different rows")
    rows, ev = candidate_test_rows(new.run_dir)
    console.print(f"gate: {why}; scoring {old.ref} and {new.ref} now on {new.ref}'s test split ({len(rows)} rows)")
    scorer = scorer or score_run_on_rows
    a, b = scorer(old.run_dir, rows, old.ref, ev), scorer(new.run_dir, rows, new.ref, ev)
    return a, b, f"scored now on {new.ref}'s test split ({why})"


# --- the checks, in order: the first refusal decides -------------------------------------------


def enough_rows(old: Scored, new: Scored, opts: GateOptions, numbers: dict) -> str | None:
    if numbers["n"] < opts.min_rows:
        return (f"too few rows to decide: {numbers['n']} scored, {opts.min_rows} needed (--min-rows); evaluate on "
                f"at least {opts.min_rows} test rows (a larger data.test_size or data.test file)")
    return None


def no_worse(old: Scored, new: Scored, opts: GateOptions, numbers: dict) -> str | None:
    numbers |= paired_bootstrap(old.scores, new.scores, n_resamples=opts.n_resamples,
                                confidence=opts.confidence, seed=opts.seed)
    if numbers["low"] < -opts.margin:
        return f"it is not shown to be no worse (lower end {numbers['low']:+.4f} < -{opts.margin:g})"
    return None


CHECKS: list[Check] = [enough_rows, no_worse]


def decide(new: VersionInfo, old: VersionInfo, opts: GateOptions, scorer: Scorer | None = None,
           console: Console | None = None) -> Verdict:
    console = console or Console()
    a, b, how = paired_scores(new, old, scorer, console)
    numbers = {"metric": b.metric, "n": len(b.scores), "old": sum(a.scores) / len(a.scores),
               "new": sum(b.scores) / len(b.scores), "scored": how, "min_rows": opts.min_rows,
               "margin": opts.margin, "confidence": opts.confidence}
    problem = next((p for check in CHECKS if (p := check(a, b, opts, numbers))), None)
    figures = (f"{b.metric} {numbers['new']:.4f} vs {numbers['old']:.4f} on {numbers['n']} rows"
               + (f", difference {numbers['delta']:+.4f} [{numbers['low']:+.4f}, {numbers['high']:+.4f}] "
                  f"({100 * opts.confidence:.0f}% paired bootstrap)" if "low" in numbers else "")
               + f"; {how}")
    summary = (f"{problem}; " if problem else f"passed against {old.ref}: ") + figures
    return Verdict(problem is None, summary, numbers, old.number)


def gated_promote(reg: Registry, ref: str, alias: str, opts: GateOptions, force: bool = False,
                  scorer: Scorer | None = None, console: Console | None = None,
                  max_fairness_gap: float | None = None) -> str:
    """Point NAME@alias at ``ref`` when the paired gate passes (or ``force``, recorded);
    ``max_fairness_gap``: the store's fairness check as well (Registry.promote)."""
    console = console or Console()
    name, _, _ = parse_ref(ref)
    new = reg.resolve(ref)
    old = reg.resolve(f"{name}@{alias}") if alias in reg.aliases(name) else None
    verdict = decide(new, old, opts, scorer, console) if old is not None and old.number != new.number else None
    return reg.promote(ref, alias, force=force, verdict=verdict, max_fairness_gap=max_fairness_gap)
