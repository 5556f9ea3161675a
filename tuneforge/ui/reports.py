"""A run's Data and Evaluation pages, read from the files its stages wrote.

Data: data_report.json (rows per split, each load / render drop and truncation, token
lengths as trained) and, when the run trained on a `tuneforge data prepare` folder, that
folder's manifest.json (every stage's drops and changes, leakage, PII, lengths) and rows.
Evaluation: eval.json / eval_samples.jsonl (the trainer's held-out base vs tuned),
eval/eval_results.json (`tuneforge eval`: baselines, bootstrap intervals, forgetting,
diagnosis) and compare/compare.json (`tuneforge compare`: prompt vs RAG vs fine-tune).

Only files a run folder holds (or the prepared folder its data report names) are read:
the pages are reached through runs the key may see (find_run), never through a path from
the URL. A part that was not recorded says why and how to get it, never a blank.
"""

from __future__ import annotations

import asyncio
import json
import math
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Request

from tuneforge.config import DataConfig, RunConfig
from tuneforge.data.manifest import MANIFEST, SPLITS
from tuneforge.data.prepare import build_splits
from tuneforge.evaluate.command import LOWER_IS_BETTER, score_rows
from tuneforge.evaluate.diagnose import diagnose, read_curves
from tuneforge.io import sha256_file
from tuneforge.plugins import objective_of
from tuneforge.production.http import ApiError
from tuneforge.runs import load_run_config
from tuneforge.train.compare import compare_table, effort_table
from tuneforge.ui.charts import bar_chart
from tuneforge.ui.web import find_run, page_key, render
from tuneforge.ui.runview import RunRow, read_json

CLIP = 400  # characters of an example shown before its "show all"
EXAMPLES = 3  # rows per split
REREAD_LIMIT = 50 * 2**20  # data files re-read for examples only up to this size (a page, not a job)


def add_routes(router: APIRouter, runs_dir: Path) -> None:
    async def run_or_error(request: Request, run_id: str):
        key, refused = page_key(request)
        if refused:
            return None, None, refused
        try:
            return key, await asyncio.to_thread(find_run, request, runs_dir, key, run_id), None
        except ApiError as e:
            return None, None, render("error.html", e.status, message=e.message)

    @router.get("/runs/{run_id}/data")
    async def data_page(request: Request, run_id: str):
        key, run, refused = await run_or_error(request, run_id)
        if refused:
            return refused
        view = await asyncio.to_thread(data_view, run)
        return render("data.html", run=run, key=key, nav="runs", tab="data", view=view, parts=row_parts)

    @router.get("/runs/{run_id}/evaluation")
    async def evaluation_page(request: Request, run_id: str):
        key, run, refused = await run_or_error(request, run_id)
        if refused:
            return refused
        view = await asyncio.to_thread(evaluation_view, run)
        return render("evaluation.html", run=run, key=key, nav="runs", tab="evaluation", view=view)


# --- data ---------------------------------------------------------------------------------

def data_view(run: RunRow) -> dict:
    report = read_json(run.run_dir / "data_report.json")
    if not report:
        return {"missing": "this run has no data report (data_report.json) yet: the trainer writes it once it "
                           "has loaded and split the data" if run.status in ("queued", "new", "running") else
                           "this run's folder has no data_report.json: it stopped before its data was loaded, or "
                           "was not written by `tuneforge train`"}
    tasks = report["tasks"] if "tasks" in report else {"": report}
    return {"tasks": [task_view(run, name, rep, len(tasks) > 1) for name, rep in tasks.items()],
            "mixture": report.get("mixture")}


def task_view(run: RunRow, name: str, rep: dict, multitask: bool) -> dict:
    manifest, manifest_note = prepared_manifest(rep)
    max_length = ((run.config.get("data") or {}).get("max_length")
                  or DataConfig.model_fields["max_length"].default)
    view = {"name": name, "rows": rep.get("rows", {}), "earlier": rep.get("earlier"), "manifest": manifest,
            "manifest_note": manifest_note, "prepared": rep.get("prepared"), "max_length": max_length,
            "formats": {split: f"{load['format']} ({load.get('format_reason')})"
                        for split, load in rep.get("load", {}).items() if load.get("format")},
            "reasons": reasons(rep, manifest), "accounting": (manifest or {}).get("accounting", {})}
    view["histograms"], view["histogram_note"] = histograms(rep, manifest, max_length, run)
    view["leakage"], view["leakage_note"] = leakage(manifest, manifest_note)
    view["pii"], view["pii_note"] = pii(manifest, manifest_note)
    view["examples"], view["examples_note"] = examples(run, rep, manifest, multitask)
    return view


def prepared_manifest(rep: dict) -> tuple[dict | None, str]:
    """The manifest of the prepared folder the run trained on (the path the run recorded),
    or why there is none."""
    prepared = rep.get("prepared")
    if not prepared:
        return None, ("the run read its data files directly, not a `tuneforge data prepare` folder: only prepare "
                      "records per-stage cleaning, de-duplication, PII and leakage results")
    path = Path(prepared["path"]) / MANIFEST
    if not path.is_file():
        return None, (f"the run trained on the prepared folder {prepared['path']}, whose manifest.json the dashboard "
                      "cannot read (moved, deleted, or a path relative to another working directory)")
    manifest = read_json(path)
    note = "" if sha256_file(path) == prepared.get("manifest_sha256") else (
        f"the prepared folder {prepared['path']} changed since this run trained on it (its manifest.json has "
        "another sha256): what follows describes the folder as it is now")
    return manifest, note


def reasons(rep: dict, manifest: dict | None) -> list[dict]:
    """Every drop, change, truncation, skipped file and unread field either report records,
    each with its count and the examples recorded for it."""
    out = []
    for split, load in rep.get("load", {}).items():
        out += [{"where": split, "stage": "load", "what": "dropped", "reason": reason, "count": n,
                 "examples": (load.get("examples") or {}).get(reason, [])} for reason, n in load.get("dropped", {}).items()]
        out += [{"where": split, "stage": "load", "what": "skipped file", "reason": f"{f}: {why}", "count": 1,
                 "examples": []} for f, why in (load.get("skipped_files") or {}).items()]
        for field, label in (("unknown_fields", "unknown field (not trained on)"),
                             ("ignored_fields", "ignored field (data.ignore_fields)")):
            out += [{"where": split, "stage": "load", "what": label, "reason": k, "count": n, "examples": []}
                    for k, n in (load.get(field) or {}).items()]
        if load.get("split_pairs"):
            out.append({"where": split, "stage": "load", "what": "added", "count": load["split_pairs"],
                        "reason": "preference pairs split into unpaired rows", "examples": []})
    for split, enc in rep.get("render", {}).items():
        # the renderer keeps up to 3 examples for all its reasons together
        out += [{"where": split, "stage": "render", "what": "dropped", "reason": reason, "count": n,
                 "examples": enc.get("examples", [])} for reason, n in enc.get("dropped", {}).items()]
        if enc.get("truncated"):
            out.append({"where": split, "stage": "render", "what": "truncated", "count": enc["truncated"],
                        "reason": "longer than data.max_length: cut to max_length for training",
                        "examples": enc.get("examples", [])})
    for st in (manifest or {}).get("stages", []):
        pool = (st.get("info") or {}).get("pool", "")
        for what, counts in (("dropped", st.get("dropped", {})), ("changed", st.get("changed", {}))):
            out += [{"where": f"prepare: {pool}", "stage": st["name"], "what": what, "reason": reason, "count": n,
                     "examples": (st.get("examples") or {}).get(reason, [])} for reason, n in counts.items()]
    out += [{"where": "prepare", "stage": "load", "what": "skipped file", "reason": f"{f}: {why}", "count": 1,
             "examples": []} for f, why in ((manifest or {}).get("skipped_files") or {}).items()]
    return out


def histograms(rep: dict, manifest: dict | None, max_length: int, run: RunRow) -> tuple[list[dict], str]:
    """The charts, and a note: what they leave out, or why there are none."""
    charts, facts = [], []
    for split, enc in rep.get("render", {}).items():
        hist = enc.get("lengths")
        if hist and hist.get("counts"):
            charts.append({"source": "as trained (after truncation)", "split": split, "truncated": enc.get("truncated", 0),
                           "svg": _hist_svg(hist, f"{split}: {sum(hist['counts'])} rows, {enc.get('truncated', 0)} "
                                                  "truncated", "tokens", (max_length, f"max_length {max_length}"))})
        elif enc.get("kept"):
            facts.append(f"{split}: no token lengths in this run's data report (written before tuneforge recorded them)")
    if manifest:
        unit = manifest.get("length_unit", "tokens")
        over = {(st.get("info") or {}).get("pool"): st for st in manifest.get("stages", []) if st["name"] == "token_length"}
        limit = (manifest.get("options") or {}).get("max_length") if unit == "tokens" and over else None
        over_n = sum(sum(st.get("dropped", {}).values()) + sum(st.get("changed", {}).values()) for st in over.values())
        for split, sp in manifest.get("splits", {}).items():
            hist = sp.get("histogram")
            if hist and hist.get("counts"):
                charts.append({"source": "prepared folder (before training)", "split": split, "truncated": None,
                               "svg": _hist_svg(hist, f"{split}: {sum(hist['counts'])} rows ({unit})", unit,
                                                (limit, f"max_length {limit}") if limit else None)})
        if limit:
            facts.append(f"prepare: {over_n} row{'s' * (over_n != 1)} outside its token limits (max_length {limit}, "
                         f"action {next(iter(over.values()))['info'].get('action')}; counted before the split)")
    if charts:
        return charts, "; ".join(facts)
    if rep.get("render"):
        why = ("it was written before tuneforge recorded token lengths in data_report.json; train again, or "
               "prepare the data with `tuneforge data prepare --tokenizer MODEL`")
    elif run.status in ("queued", "running", "new"):
        why = "the trainer records token lengths once it has tokenized the data"
    else:
        why = (f"the {(run.config.get('objective') or {}).get('name', '?')} recipe records no token lengths in "
               "data_report.json (only the token-level recipes do); `tuneforge data prepare --tokenizer MODEL` "
               "records them for any data")
    return [], f"this run's data report has no length histogram: {why}"


def _hist_svg(hist: dict, title: str, unit: str, marker) -> str:
    edges, counts = hist["edges"], hist["counts"]
    return bar_chart([(edges[i], edges[i + 1], n) for i, n in enumerate(counts)], title, f"length ({unit})",
                     marker, width=560, height=220)


def leakage(manifest: dict | None, manifest_note: str) -> tuple[list[dict], str]:
    if manifest is None:
        return [], (f"this run's data report has no leakage check: {manifest_note}. The run's own split keeps rows "
                    "with equal prompts on one side; near-equal prompts and given validation/test files are not "
                    "checked")
    found = [{"pool": (st.get("info") or {}).get("pool", ""), "found": (st.get("info") or {}).get("found", 0),
              "action": (st.get("info") or {}).get("action"), "threshold": (st.get("info") or {}).get("threshold"),
              "counts": {**st.get("dropped", {}), **st.get("changed", {})},
              "examples": [e for ex in (st.get("examples") or {}).values() for e in ex]}
             for st in manifest.get("stages", []) if st["name"] == "leakage"]
    return found, "" if found else "the prepared folder's manifest records no leakage stage"


def pii(manifest: dict | None, manifest_note: str) -> tuple[list[dict], str]:
    if manifest is None:
        return [], f"this run's data report has no PII scan: {manifest_note}"
    scans = [{"pool": (st.get("info") or {}).get("pool", ""), "action": (st.get("info") or {}).get("action"),
              "types": (st.get("info") or {}).get("types", []), "found": (st.get("info") or {}).get("found", {}),
              "rows": {**st.get("dropped", {}), **st.get("changed", {})}}
             for st in manifest.get("stages", []) if st["name"] == "pii"]
    return scans, "" if scans else "no PII scan: the data was prepared with --pii off"


def examples(run: RunRow, rep: dict, manifest: dict | None, multitask: bool) -> tuple[dict, str]:
    """The first rows of each split: from the prepared folder, else the run's data read and
    split again as the trainer did (checked against the recorded manifest hash)."""
    if manifest is not None:
        folder = Path(rep["prepared"]["path"])
        return {split: _head(folder / f"{split}.jsonl") for split in SPLITS}, ""
    if multitask:
        return {}, "examples of a multi-task run are shown when its tasks train on prepared folders"
    try:
        cfg = load_run_config(run.run_dir)
    except ValueError as e:  # ConfigError, RunError: the config the run recorded, checked as training checks it
        return {}, f"no examples: the run's config.yaml does not validate any more ({str(e).splitlines()[0]})"
    specs = [s for s in (*cfg.data.train, *cfg.data.validation, *cfg.data.test) if not s.startswith("builtin:")]
    size = sum(_size(Path(s.split("#", 1)[0])) for s in specs)
    if size > REREAD_LIMIT:
        return {}, (f"no examples: the run's data files hold {size / 2**20:.0f} MiB, more than this page re-reads "
                    f"({REREAD_LIMIT // 2**20} MiB); `tuneforge data prepare` keeps its splits in a folder")
    try:
        rows, sha = _reread(cfg.model_dump_json(), objective_of(cfg).data_kind)
    except (OSError, ValueError) as e:  # data moved or unreadable now: say so, the rest of the page stands
        return {}, f"no examples: the run's data cannot be read again ({type(e).__name__}: {e})"
    if sha != rep.get("manifest_sha256"):
        return {}, ("no examples: the run's data changed since training (its rows hash to another manifest "
                    "sha256), so re-reading it would show other rows than the run trained on")
    return rows, ""


@lru_cache(maxsize=32)
def _reread(config_json: str, kind: str) -> tuple[dict, str]:
    """Cached per config: the rows do not change while the hash still matches."""
    cfg = RunConfig.model_validate_json(config_json)
    splits = build_splits(cfg.data, cfg.train.seed, kind)
    return {s: getattr(splits, s)[:EXAMPLES] for s in SPLITS}, splits.manifest_hash()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _head(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
                if len(out) == EXAMPLES:
                    break
    return out


def row_parts(row: dict) -> list[tuple[str, str]]:
    """A row as (label, text) pairs: chat turns by role (the last assistant turn is the answer),
    other fields by name; bookkeeping fields (``_where``) left out."""
    parts = []
    for key, value in row.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            last = max((i for i, m in enumerate(value) if m["role"] == "assistant"), default=-1)
            for i, m in enumerate(value):
                label = ("answer" if key == "messages" and i == last else m["role"]) if key == "messages" \
                    else f"{key} · {m['role']}"
                parts.append((label, _text(m)))
        else:
            parts.append((key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    return parts


def _text(message: dict) -> str:
    content = message.get("content")
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False) if content else ""
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    return text + (("\n" if text else "") + json.dumps(extra, ensure_ascii=False) if extra else "")


# --- evaluation ---------------------------------------------------------------------------

def evaluation_view(run: RunRow) -> dict:
    d = run.run_dir
    ended = [train_eval(p, d) for p in sorted(d.glob("eval*.json")) if p.name == "eval.json" or p.stem.startswith("eval-")]
    view = {"trained": ended, "report": eval_report(d / "eval"), "compare": compare(d / "compare")}
    if not ended:
        view["trained_note"] = (
            f"this run has no held-out evaluation from training (eval.json): its status is {run.status}"
            if run.status in ("queued", "running", "new", "stopped") else
            "this run has no eval.json: eval.metric was none, or the run had no test split")
    report = view["report"]
    if report is None:
        view["report_note"] = (f"no `tuneforge eval` report in {d / 'eval'}: `tuneforge eval {d}` measures the base "
                               "model and the tuned one on the test split with bootstrap intervals, a forgetting probe "
                               "and a diagnosis of the training curves")
    if report is None or not report["results"].get("diagnosis"):
        view["diagnosis"] = [f.model_dump() for f in diagnose(*read_curves(d / "metrics.jsonl"))] \
            if (d / "metrics.jsonl").is_file() else []
        view["diagnosis_note"] = ("diagnosed now from this run's metrics.jsonl (no `tuneforge eval` report recorded one)"
                                  if view["diagnosis"] else "no diagnosis: this run has no training curve (metrics.jsonl)")
    if view["compare"] is None:
        view["compare_note"] = (f"no strategy comparison in {d / 'compare'}: `tuneforge compare CONFIG --run {d}` "
                                "measures zero-shot, few-shot, RAG, fine-tuned and fine-tuned + RAG on the test split")
    return view


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested figures as "a.b" -> value (numbers as they are, the rest as short text)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
        elif v is not None:
            out[f"{prefix}{k}"] = json.dumps(v, ensure_ascii=False)[:300]
    return out


def train_eval(path: Path, run_dir: Path) -> dict:
    """eval.json (eval-TASK.json per task): base vs tuned, whichever shape the recipe wrote
    (scores under "scores", or the figures themselves); what is neither, as other figures."""
    ev = read_json(path)
    task = path.stem[len("eval-"):] if path.stem.startswith("eval-") else ""
    who = {w: ev[w] for w in ("base", "tuned") if isinstance(ev.get(w), dict)}
    flat = {w: _flat(v["scores"] if isinstance(v.get("scores"), dict) else v) for w, v in who.items()}
    rows = [score_row(m, flat.get("base", {}).get(m), t) for m, t in flat.get("tuned", {}).items()]
    other = _flat({k: v for k, v in ev.items() if k not in who})
    other |= {f"{w}.{k}": v for w, vs in who.items() for k, v in vs.items()
              if k not in ("scores", "per_example") and isinstance(vs.get("scores"), dict) and not isinstance(v, dict)}
    samples = [json.loads(line) for line in _lines(run_dir / f"eval_samples{'-' + task if task else ''}.jsonl")]
    return {"file": path.name, "task": task, "rows": rows, "other": other,
            **wins_losses([s for s in samples if s.get("model") == "base"],
                          [s for s in samples if s.get("model") == "tuned"])}


def score_row(metric: str, base, tuned) -> dict:
    numbers = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (base, tuned))
    delta = tuned - base if numbers else None
    better = None if delta is None or delta == 0 else (delta < 0) == (metric.split(".")[-1] in LOWER_IS_BETTER)
    return {"metric": metric, "base": base, "tuned": tuned, "delta": delta, "better": better}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def wins_losses(base: list[dict], tuned: list[dict]) -> dict:
    """Examples where the tuned answer scored higher / lower than the base one on the same
    row (both answered the same rows in the same order); best and worst without a base."""
    if base and len(base) == len(tuned):
        pairs = [(t.get("score", 0) - b.get("score", 0), b, t) for b, t in zip(base, tuned)]
        wins = sorted((p for p in pairs if p[0] > 0), key=lambda p: -p[0])[:EXAMPLES]
        losses = sorted((p for p in pairs if p[0] < 0), key=lambda p: p[0])[:EXAMPLES]
        return {"wins": [{"base": b, "tuned": t} for _, b, t in wins],
                "losses": [{"base": b, "tuned": t} for _, b, t in losses], "n_samples": len(tuned),
                "paired": {"better": sum(p[0] > 0 for p in pairs), "worse": sum(p[0] < 0 for p in pairs),
                           "same": sum(p[0] == 0 for p in pairs)}}
    order = sorted(tuned, key=lambda s: s.get("score", 0))
    return {"wins": [{"tuned": t} for t in order[::-1][:EXAMPLES]], "losses": [{"tuned": t} for t in order[:EXAMPLES]],
            "n_samples": len(tuned), "paired": None}


def eval_report(folder: Path) -> dict | None:
    """`tuneforge eval`'s eval_results.json in the run's eval/ folder (its default --out)."""
    results = read_json(folder / "eval_results.json")
    if not results.get("systems"):
        return None
    systems = results["systems"]
    under_test = "tuned" if "tuned" in systems else list(systems)[-1]
    header, rows = score_rows(results, under_test)
    samples = [json.loads(line) for line in _lines(folder / "eval_samples.jsonl")]
    base = next((n for n in systems if n != under_test and n.endswith("zero-shot")), None)
    return {"results": results, "under_test": under_test, "header": header, "rows": rows, "base_name": base,
            "files": [p.name for p in sorted(folder.iterdir()) if p.is_file()],
            **wins_losses([s for s in samples if s.get("system") == base] if base else [],
                          [s for s in samples if s.get("system") == under_test])}


def compare(folder: Path) -> dict | None:
    """`tuneforge compare`'s compare.json in the run's compare/ folder (its default --out)."""
    results = read_json(folder / "compare.json")
    if not results.get("strategies"):
        return None
    header, rows = compare_table(results)
    e_header, e_rows = effort_table(results)
    return {"results": results, "header": header, "rows": rows, "effort_header": e_header, "effort_rows": e_rows}
