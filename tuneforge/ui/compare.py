"""Compare runs side by side (/ui/compare?run=A&run=B...): the config keys that differ, the
loss curves overlaid, held-out scores with deltas against the first run (a paired bootstrap
interval where both runs scored the same examples one by one), and summary figures. Also
the New run form's clone source (/ui/api/runs/{id}/form: a run's config as form fields).

Every run is resolved with app.find_run, so a key compares only runs it may see.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path

import yaml
from fastapi import APIRouter, Query, Request

from tuneforge.evaluate.stats import paired_bootstrap
from tuneforge.production.api.job_queue import metrics_rows
from tuneforge.production.http import ApiError
from tuneforge.ui import newrun, runview
from tuneforge.ui.charts import line_chart
from tuneforge.ui.web import authenticate, find_run, page_key, render

ABSENT = "(not set)"  # a key one run's config has and another's lacks
CONFIDENCE = 0.95  # paired_bootstrap's default, named on the page
NO_PER_EXAMPLE = "no interval: eval.json has no per-example scores"


def add_routes(router: APIRouter, runs_dir: Path) -> None:
    @router.get("/compare")
    async def compare_page(request: Request, run: list[str] = Query(default=[])):
        key, refused = page_key(request)
        if refused:
            return refused
        ids = list(dict.fromkeys(run))  # the same run twice compares nothing: once is enough
        if len(ids) < 2:
            chosen = f" (chosen: {', '.join(ids)})" if ids else ""
            return render("compare.html", 400, key=key, nav="runs",
                          message=f"Choose at least two different runs to compare{chosen}: tick them in the "
                                  "runs table, then press Compare.")
        try:
            runs = [find_run(request, runs_dir, key, i) for i in ids]
        except ApiError as e:
            return render("error.html", e.status, key=key, message=e.message)
        return render("compare.html", key=key, nav="runs", runs=runs, **await asyncio.to_thread(compare, runs))

    @router.get("/api/runs/{run_id}/form")
    async def clone_form(request: Request, run_id: str):
        run = find_run(request, runs_dir, authenticate(request), run_id)
        return {"ok": True, "run": run.id, "form": form_of(run)}


# --- configs ------------------------------------------------------------------------------

def flatten(cfg: dict, prefix: str = "") -> dict[str, object]:
    """Nested config -> dotted keys (train.lr, method.r); lists and empty mappings are values."""
    out: dict[str, object] = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_diff(configs: list[dict]) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """(keys whose values differ, with one shown value per run; keys equal in every run)."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    differ, same = [], []
    for k in keys:
        values = [shown(f[k]) if k in f else ABSENT for f in flat]
        if len(set(values)) > 1:
            differ.append((k, values))
        else:
            same.append((k, values[0]))
    return differ, same


# --- held-out scores ------------------------------------------------------------------------

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tuned_part(ev: dict) -> dict:
    """eval.json's numbers for the tuned model. Recipes write different shapes: generation
    eval {"tuned": {"scores": {...}, "per_example"?}}, perplexity and reward {"tuned": {"loss", ...}},
    classification heads the metrics at the top."""
    return ev["tuned"] if isinstance(ev.get("tuned"), dict) else ev


def scores_of(run_dir: Path) -> dict[str, float]:
    tuned = tuned_part(runview.read_json(run_dir / "eval.json"))
    scores = tuned["scores"] if isinstance(tuned.get("scores"), dict) else tuned
    return {k: float(v) for k, v in scores.items() if _number(v)}


def examples_of(run_dir: Path, scores: dict[str, float]) -> tuple[list | None, dict[str, list[float]]]:
    """(the scored examples, (prompt, reference) in order, None when unknown; metric -> one
    score per example). Per-example scores come from eval.json's "per_example" (tool evals),
    eval_samples.jsonl's "score" (the main metric: eval.json lists it first) and the reward
    eval's "examples"."""
    tuned = tuned_part(runview.read_json(run_dir / "eval.json"))
    per = {k: v for k, v in (tuned.get("per_example") or {}).items()
           if isinstance(v, list) and all(_number(x) for x in v)}
    samples = [r for r in metrics_rows(run_dir / "eval_samples.jsonl") if r.get("model") == "tuned"]
    keys = [(str(r.get("prompt")), str(r.get("reference"))) for r in samples] or None
    main = next(iter(scores), None)
    if samples and main and main not in per and all(_number(r.get("score")) for r in samples):
        per[main] = [r["score"] for r in samples]
    examples = tuned.get("examples")
    if isinstance(examples, list) and examples and all(_number(e.get("reward")) for e in examples):
        per["reward"] = [e["reward"] for e in examples]
        keys = keys or [(str(e.get("prompt")), "") for e in examples]
    return keys, per


def paired(first: tuple, other: tuple, metric: str, other_id: str, first_id: str) -> dict:
    """Paired bootstrap interval of other - first on ``metric``, or why there is none."""
    (keys_a, per_a), (keys_b, per_b) = first, other
    lacking = [rid for rid, per in ((first_id, per_a), (other_id, per_b)) if metric not in per]
    if lacking:
        return {"note": f"{NO_PER_EXAMPLE} ({' and '.join(lacking)})"}
    a, b = per_a[metric], per_b[metric]
    if keys_a is None or keys_b is None:
        return {"note": "no interval: the scored examples are not listed (eval_samples.jsonl), so they cannot "
                        "be paired"}
    if len(keys_a) != len(a) or len(keys_b) != len(b):
        return {"note": "no interval: eval.json's per-example scores and eval_samples.jsonl's examples differ "
                        "in number"}
    if keys_a != keys_b:
        # The same examples in another order pair up by (prompt, reference); anything else is not paired.
        if len(set(keys_a)) != len(keys_a) or set(keys_a) != set(keys_b):
            return {"note": "no interval: the runs were scored on different examples"}
        at = {k: i for i, k in enumerate(keys_b)}
        b = [b[at[k]] for k in keys_a]
    r = paired_bootstrap(a, b, confidence=CONFIDENCE)
    return {"low": r["low"], "high": r["high"], "n": len(a)}


def eval_table(runs: list[runview.RunRow]) -> list[dict]:
    """One row per metric of any run: values per run, delta of each later run vs the first."""
    scores = [scores_of(r.run_dir) for r in runs]
    examples = [examples_of(r.run_dir, s) for r, s in zip(runs, scores)]
    metrics = list(dict.fromkeys(m for s in scores for m in s))
    rows = []
    for m in metrics:
        values = [s.get(m) for s in scores]
        deltas = []
        for run, value, ex in zip(runs[1:], values[1:], examples[1:]):
            if values[0] is None or value is None:
                deltas.append({"delta": None, "note": "not measured in both runs"})
                continue
            deltas.append({"delta": value - values[0], **paired(examples[0], ex, m, run.id, runs[0].id)})
        rows.append({"metric": m, "values": values, "deltas": deltas})
    return rows


# --- curves and figures ------------------------------------------------------------------------

def summary_figures(run: runview.RunRow) -> dict:
    """summary.json's figures (finished runs), else the last metrics rows (runs still going)."""
    s = runview.read_json(run.run_dir / "summary.json")
    rows = metrics_rows(run.run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    losses = [r["loss"] for r in train if _number(r.get("loss"))]
    val = [r["val_loss"] for r in rows if r.get("kind") == "eval" and _number(r.get("val_loss"))]
    return {"status": run.status, "steps": s.get("steps", train[-1].get("step") if train else None),
            "train seconds": s.get("train_seconds"),
            "tokens/s": s.get("tokens_per_s", train[-1].get("tokens_per_s") if train else None),
            "final loss": losses[-1] if losses else None, "final val loss": val[-1] if val else None}


def compare(runs: list[runview.RunRow]) -> dict:
    curves = [runview.curves(r.run_dir) for r in runs]
    charts = {name: line_chart({r.id: c[name] for r, c in zip(runs, curves)}, name, width=570)
              for name in ("train loss", "validation loss")}
    differ, same = config_diff([r.config for r in runs])
    figures = [summary_figures(r) for r in runs]
    return {"charts": charts, "differ": differ, "same": same, "scores": eval_table(runs),
            "figures": {k: [f[k] for f in figures] for k in figures[0]}, "confidence": CONFIDENCE}


# --- clone into the New run form ---------------------------------------------------------------

def next_name(name: str) -> str:
    """alpha -> alpha-2, alpha-2 -> alpha-3: a clone never takes its source's run name."""
    m = re.fullmatch(r"(.*)-(\d+)", name)
    return f"{m[1]}-{int(m[2]) + 1}" if m else f"{name}-2"


def form_of(run: runview.RunRow) -> dict[str, str]:
    """The New run form's fields (newrun.FIELDS) from a run's config; every other key,
    and any value a field cannot hold as text (null, a mapping), goes into the YAML box."""
    rest = copy.deepcopy(run.config)  # keys are taken out below
    form: dict[str, str] = {}
    for name, (_, kind) in newrun.FIELDS.items():
        *path, last = name.split(".")
        chain = [rest]  # the mappings from the top down to the field's parent
        for p in path:
            chain.append(chain[-1].get(p) if isinstance(chain[-1], dict) else None)
        parent = chain[-1]
        if not isinstance(parent, dict) or last not in parent:
            continue
        value = parent[last]
        if kind is list and isinstance(value, list) and all(isinstance(x, str) for x in value):
            form[name] = "\n".join(value)
        elif kind is not list and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            form[name] = str(value)
        else:
            continue  # left in the YAML box, as written
        del parent[last]
        for up, p in zip(reversed(chain[:-1]), reversed(path)):  # method: {} once its name moved out
            if up[p]:
                break
            del up[p]
    form["run_name"] = next_name(form.get("run_name") or run.id)
    form[newrun.EXTRA] = yaml.safe_dump(rest, sort_keys=False) if rest else ""
    return form
