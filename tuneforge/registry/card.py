"""Hugging Face model cards (README.md) for registry versions and exports, generated from the
run folder: YAML front matter (base_model, library_name, license, datasets, tags, model-index)
built with huggingface_hub's ModelCardData, then sections for the data (sources, rows, drops by
reason, PII counts), the method and hyper-parameters, the evaluation with intervals against the
base model, forgetting, fairness, known limitations and the command that reproduces the run.

A card tuneforge wrote carries MARK; a README.md without it is the user's and is never replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneforge.io import atomic_write_text
from tuneforge.models.zoo import EMBEDDED

MARK = "<!-- tuneforge model card: generated from the run folder; delete this line to keep your edits -->"
CARD = "README.md"


def owned_card(path: Path) -> bool:
    """A README.md tuneforge may replace: none yet, or one carrying MARK."""
    try:
        return MARK in Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError):
        return False


def write_card(folder: str | Path, run_dir: str | Path, **kw) -> Path | None:
    """folder/README.md from ``run_dir`` (see ``card_text`` for ``kw``); None, and nothing
    written, when folder holds a README.md that tuneforge did not write."""
    path = Path(folder) / CARD
    if not owned_card(path):
        return None
    atomic_write_text(path, card_text(Path(run_dir), **kw))
    return path


def run_library(run_dir: Path) -> str:
    """How a run folder's trained weights load: a peft adapter, a full transformers model, or
    tuneforge's own tensors (freeze/hft/adapters)."""
    adapter = Path(run_dir) / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return "peft"
    return "transformers" if (adapter / "config.json").is_file() else "tuneforge"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def card_text(run_dir: Path, *, title: str, library: str = "peft", tags: tuple[str, ...] = (),
              command: str | None = None, export: dict | None = None) -> str:
    """The card of the run in ``run_dir``. ``library``: how the folder loads (peft adapter,
    transformers, gguf); ``command``: what made the folder (else the run's own training
    command); ``export``: the export manifest (format, files, pruning table)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData  # deferred: only cards need it

    run_dir = Path(run_dir).resolve()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    report, summary = _read(run_dir / "data_report.json"), _read(run_dir / "summary.json")
    results, scores = _read(run_dir / "eval" / "eval_results.json"), _read(run_dir / "eval.json")
    # Older runs' configs lack sections: every field is read with a default.
    base, method = cfg["model"]["name"], (cfg.get("method") or {}).get("name", "?")
    objective = (cfg.get("objective") or {}).get("name", "sft")
    embedded = EMBEDDED.get(base)
    specs = list((cfg.get("data") or {}).get("train") or [])
    tuned = (scores.get("tuned") or {}).get("scores", {})
    rows = f"{(scores.get('tuned') or {}).get('n')} rows" + (", the run before export" if export else "")
    pruning = (export or {}).get("pruning")
    if pruning:  # a pruned folder is another model: its own scores from the pruning table
        tuned = next(r["scores"] for r in pruning["table"] if r["model"] == pruning["model"])
        rows = f"{pruning['metric_rows']} rows, this {pruning['model']} model"
    data = ModelCardData(
        base_model=embedded.hub_id if embedded else base,
        library_name=library,
        license=embedded.license.lower() if embedded else None,
        # Hub dataset ids only; builtin tasks and local files are described in the Data section.
        datasets=[s for s in specs if _hub_id(s)] or None,
        tags=["tuneforge", method, objective, *tags],
        metrics=list(tuned) or None,
        model_name=title,
        eval_results=[EvalResult(task_type="text-generation", dataset_type="tuneforge-test-split",
                                 dataset_name=f"held-out test split ({rows})", metric_type=k,
                                 metric_name=k, metric_value=v) for k, v in tuned.items()] or None,
    )
    body = [MARK, f"# {title}", "",
            f"`{base}` fine-tuned with tuneforge ({method} x {objective}); generated from the run folder "
            f"`{run_dir}`.", "",
            *_data(report, specs), *_method(cfg, summary), *_evaluation(results, scores),
            *_forgetting(results), *_fairness(results)]
    if export:
        body += _export(export)
    body += _limitations(cfg, report, results, export)
    body += ["## How to reproduce", "", "```bash", command or f"tuneforge train {run_dir / 'config.yaml'}",
             "```", "", f"The run's resolved config is `{run_dir / 'config.yaml'}`; data manifest sha256 "
             f"`{report.get('manifest_sha256', 'n/a')}`.", ""]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                       body="\n".join(body)))


def _hub_id(spec: str) -> bool:
    return ("/" in spec and ":" not in spec and not Path(spec).exists() and spec.count("/") == 1
            and not spec.endswith((".json", ".jsonl", ".csv", ".parquet", ".txt")))


def _data(report: dict, specs: list[str]) -> list[str]:
    out = ["## Data", ""]
    if not report:
        return out + ["No data report in the run folder.", ""]
    reports = report.get("tasks", {"": report})  # a multi-task run has one report per task
    for task, r in reports.items():
        rows = r.get("rows", {})
        out.append((f"**{task}**: " if task else "") + "rows " + ", ".join(f"{k} {v}" for k, v in rows.items()) + ".")
        for split, load in (r.get("load") or {}).items():
            for src, s in (load.get("sources") or {}).items():
                out.append(f"- {split} source `{src}`: {s.get('read')} read, {s.get('kept')} kept"
                           + (" (synthetic)" if s.get("synthetic") else ""))
            for reason, n in (load.get("dropped") or {}).items():
                out.append(f"- {split}: {n} rows dropped at loading ({reason})")
        for split, rend in (r.get("render") or {}).items():
            for reason, n in (rend.get("dropped") or {}).items():
                out.append(f"- {split}: {n} rows dropped at tokenisation ({reason})")
            if rend.get("truncated"):
                out.append(f"- {split}: {rend['truncated']} rows truncated to data.max_length")
        for split, stage in (r.get("pii") or {}).items():
            if not isinstance(stage, dict) or "info" not in stage:
                continue
            found = stage["info"].get("found") or {}
            out.append(f"- {split}: personal data " + (", ".join(f"{t} {n}" for t, n in found.items()) or "none found")
                       + f" (data.pii={stage['info'].get('action')}; {sum(stage.get('dropped', {}).values())} rows "
                         f"dropped, {stage.get('changed', {}).get('rows redacted', 0)} redacted)")
    return out + [""]


def _method(cfg: dict, summary: dict) -> list[str]:
    t, data = cfg.get("train") or {}, cfg.get("data") or {}
    method = ", ".join(f"{k}={v}" for k, v in (cfg.get("method") or {}).items() if v not in (None, [], {}))
    out = ["## Method and hyper-parameters", "", f"- method: {method}",
           f"- objective: {(cfg.get('objective') or {}).get('name', 'sft')}"]
    keys = ("lr", "scheduler", "batch_size", "grad_accum", "max_steps", "epochs", "weight_decay", "seed")
    if t:
        out.append("- train: " + ", ".join(f"{k} {t[k]}" for k in keys if k in t))
    if "max_length" in data:
        out.append(f"- data.max_length {data['max_length']}, system prompt: {data.get('system_prompt')!r}")
    if summary:
        out.append(f"- trained {summary.get('steps')} steps in {summary.get('train_seconds')} s; "
                   f"{summary.get('trainable_params')} of {summary.get('total_params')} parameters trained")
    return out + [""]


def _evaluation(results: dict, scores: dict) -> list[str]:
    out = ["## Evaluation", ""]
    if results.get("comparisons"):
        b = results.get("bootstrap", {})
        out += [f"`tuneforge eval` on {results.get('n')} rows ({results.get('data')}); paired bootstrap "
                f"{b.get('confidence')} intervals ({b.get('resamples')} resamples) of tuned - baseline.", "",
                "| baseline | metric | baseline | tuned | delta | interval |", "|---|---|---|---|---|---|"]
        for name, comp in results["comparisons"].items():
            for metric, c in comp.items():
                ci = f"[{c['low']:+.4f}, {c['high']:+.4f}]" if "low" in c else "n/a"
                out.append(f"| {name} | {metric} | {c['base']:.4f} | {c['tuned']:.4f} | {c['delta']:+.4f} | {ci} |")
        return out + [""]
    if scores:
        tuned, base = (scores.get("tuned") or {}), (scores.get("base") or {})
        out += [f"Held-out test split ({tuned.get('n')} rows), at the end of training (no intervals: run "
                f"`tuneforge eval RUN` for bootstrap intervals).", "", "| metric | base | tuned |", "|---|---|---|"]
        for k, v in tuned.get("scores", {}).items():
            b = base.get("scores", {}).get(k)
            out.append(f"| {k} | {'n/a' if b is None else f'{b:.4f}'} | {v:.4f} |")
        return out + [""]
    return out + ["Not evaluated.", ""]


def _forgetting(results: dict) -> list[str]:
    f = results.get("forgetting")
    if not f:
        return ["## Forgetting", "", "Not evaluated (`tuneforge eval RUN` measures it).", ""]
    shown = {k: v for k, v in f.items() if not isinstance(v, (dict, list))}
    return ["## Forgetting", "", *(f"- {k}: {v}" for k, v in shown.items()), ""]


def _fairness(results: dict) -> list[str]:
    f = results.get("fairness")
    if not f:
        return ["## Fairness", "", "Not evaluated (`tuneforge eval RUN --fairness SPEC`).", ""]
    out = ["## Fairness", ""]
    gap = f.get("max_gap") or {}
    if gap:
        ci = gap.get("ci")
        out.append(f"- largest gap between groups: {gap.get('metric')} {gap.get('value')}"
                   + (f", interval {ci}" if ci is not None else "")
                   + (" — FLAGGED (the interval excludes 0)" if gap.get("flagged") else " — not flagged"))
    for key in ("slices", "counterfactual", "probes"):
        if f.get(key) is not None:
            out.append(f"- {key}: see eval/eval_results.json (\"fairness\".\"{key}\")")
    return out + [""]


def _export(m: dict) -> list[str]:
    out = ["## This export", "", f"- format: {m.get('format')}" + (f", dtype {m['dtype']}" if m.get("dtype") else ""),
           *(f"- `{name}`: {size / 2**20:.1f} MiB" for name, size in (m.get("files") or {}).items())]
    p = m.get("pruning")
    if p:
        out += ["", f"Structured pruning: sparsity {p['sparsity']} of {', '.join(p['structures'])}, ranked on "
                f"{p['calibration_rows']} calibration rows of the train split"
                + (f"; LoRA recovery {p['recovery']['steps']} steps" if p.get("recovery") else "") + ".", "",
                "| model | size on disk | parameters | CPU tokens/s | metric |", "|---|---|---|---|---|"]
        for r in p["table"]:
            out.append(f"| {r['model']} | {r['size_bytes'] / 2**20:.1f} MiB | {r['parameters']:,} | "
                       f"{r['cpu_tokens_per_s']:.1f} | {r['metric']} {r['score']:.4f} |")
        mc = p.get("machine") or {}
        out.append(f"\nMeasured on {mc.get('cpu')} ({mc.get('torch_threads')} threads, load average "
                   f"{mc.get('load_average')}); metric on {p['metric_rows']} test rows.")
    return out + [""]


def _limitations(cfg: dict, report: dict, results: dict, export: dict | None) -> list[str]:
    out = ["## Known limitations", "",
           "- The scores come from held-out rows of the same data the model was tuned on; they say little about "
           "other inputs.",
           f"- The base model's own limitations and biases (`{cfg['model']['name']}`) carry over."]
    sources = [s for r in (report.get("tasks", {"": report}).values()) for ld in (r.get("load") or {}).values()
               for s in (ld.get("sources") or {}).values()]
    if any(s.get("synthetic") for s in sources):
        out.append("- Trained on generated (synthetic) rows: real user text may differ.")
    for finding in results.get("diagnosis") or []:
        out.append(f"- Training diagnosis: {finding.get('message') or finding.get('kind') or finding}")
    if not results.get("fairness"):
        out.append("- Fairness across groups was not measured.")
    if export and export.get("pruning"):
        out.append("- Pruned: parts of the network were removed; check the metric table above before relying on it.")
    return out + [""]
