"""``tuneforge eval``: a run (or any model) on a held-out split, against baselines on the
same rows, with bootstrap intervals, a forgetting probe, curve diagnosis and a report.

Recipe: setup -> data -> systems (baselines, then the model under test) -> compare ->
forgetting -> diagnosis -> harness -> write results and report.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml
from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from tuneforge.data.load import DataError, load_rows
from tuneforge.data.prepare import build_splits
from tuneforge.data.render import with_system
from tuneforge.evaluate import report as rp
from tuneforge.evaluate.diagnose import diagnose, read_curves
from tuneforge.evaluate.fairness.report import fairness_blocks, print_fairness
from tuneforge.evaluate.fairness.run import TERMS_PREFIX, Boot, FairnessSystem, check_fairness, run_fairness
from tuneforge.evaluate.fairness.spec import parse_spec
from tuneforge.evaluate.forgetting import ProbeUnavailable, forgetting_verdict, general_texts
from tuneforge.evaluate.incontext import draw_shots, with_examples
from tuneforge.evaluate.intervals import LOWER_IS_BETTER, paired_intervals, system_intervals
from tuneforge.evaluate.measure import GenSettings, measure
from tuneforge.evaluate.metrics import normalize, task_kind
from tuneforge.evaluate.perplexity import nll_per_row, summarize, text_rows
from tuneforge.evaluate.plots import plot_losses
from tuneforge.evaluate.tool_metrics import is_tool_row
from tuneforge.io import write_json
from tuneforge.runs import load_for_inference, load_run_config


class EvalOptions(BaseModel):
    target: str = Field(description="a run folder, or any model spec (alias, local folder, hub id)")
    data: str = Field("test", description="'test' (the run's own test split) or a data file")
    baseline: str | None = Field(None, description="another model to compare with, on the same rows")
    few_shot: int = Field(0, ge=0, description="also evaluate the base model with k in-context examples")
    out: str | None = None
    limit: int | None = Field(None, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="default: the run's eval.max_new_tokens, else 64")
    batch_size: int | None = Field(None, gt=0)
    device: str = "auto"
    seed: int = 0
    n_resamples: int = Field(2000, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    forgetting_texts: int = Field(100, ge=0, description="general-domain texts for the forgetting probe (0: skip)")
    forgetting_threshold: float = Field(0.10, gt=0, description="flag a relative perplexity rise above this")
    harness: str | None = Field(None, description="comma-separated lm-evaluation-harness tasks")
    harness_include: Path | None = Field(None, description="a folder of lm-evaluation-harness task YAMLs")
    fairness: str | None = Field(None, description="fairness SPEC (evaluate/fairness/spec.py; 'none': off), "
                                 "over the run's eval.fairness")


def run_eval(opts: EvalOptions, console: Console | None = None) -> Path:
    console = console or Console()

    # --- setup -------------------------------------------------------------------------
    target = Path(opts.target)
    cfg = load_run_config(target) if (target / "config.yaml").exists() else None
    is_run = cfg is not None
    fair = parse_spec(opts.fairness, cfg.eval.fairness if cfg else None) if opts.fairness else \
        (cfg.eval.fairness if cfg else None)
    if fair is not None and is_run and cfg.model.kind == "vision":
        raise DataError("the fairness evaluation is not written for vision runs (rows with images); "
                        "drop --fairness (or set it to none)")
    if is_run and cfg.model.kind == "vision":  # rows with images: base vs tuned generations (evaluate/vision.py)
        from tuneforge.evaluate.vision import run_vision_eval

        return run_vision_eval(opts, cfg, target, console)
    # Data problems surface before any weights load.
    group_columns = [g for g in fair.groups if not g.startswith(TERMS_PREFIX)] if fair else []
    rows, train_rows, lineage, columns = load_eval_rows(opts.data, cfg, target, group_columns)
    rows = rows[: opts.limit] if opts.limit else rows
    term_lists = check_fairness(fair, rows, columns) if fair else None
    if opts.few_shot and not train_rows:
        raise DataError("--few-shot draws its examples from a run's train split: pass a run folder")
    if opts.harness_include is not None and not opts.harness_include.is_dir():
        raise DataError(f"--harness-include {opts.harness_include}: not a folder of lm-evaluation-harness task YAMLs")
    model, tok, system_prompt, device, dtype = load_for_inference(opts.target, opts.device)
    gen = GenSettings(max_new_tokens=opts.max_new_tokens or (cfg.eval.max_new_tokens if cfg else 64),
                      batch_size=opts.batch_size or (cfg.eval.batch_size if cfg else 16), device=device,
                      dtype=str(dtype).replace("torch.", ""))
    out = Path(opts.out) if opts.out else (target / "eval" if is_run else
                                           Path("runs") / f"eval-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)

    # --- rows as the model sees them (the run's system prompt added) --------------------
    convs = [with_system(r["messages"], system_prompt) for r in rows]
    refs = [c[-1]["content"] for c in convs]
    # Rows about tools are scored as tool calling (the first assistant turn: call or not).
    kind = "tools" if any(is_tool_row(r) for r in rows) else task_kind(refs)
    labels = sorted({normalize(r["messages"][-1]["content"]) for r in train_rows} | {normalize(r) for r in refs}) \
        if kind == "classification" else None
    console.print(f"[bold]eval[/] {opts.target} on {opts.data}: {len(convs)} rows, task kind {kind}")
    if kind == "tools" and opts.few_shot:
        console.print("[yellow]--few-shot skipped[/]: in-context examples are not written for tool rows")
        opts = opts.model_copy(update={"few_shot": 0})

    # --- systems: baselines first, the model under test last ---------------------------
    shots = draw_shots([r["messages"] for r in train_rows], opts.few_shot, opts.seed)
    task = _Task(convs, [with_examples(c, shots) for c in convs], kind, labels, gen,
                 [r.get("tools") or [] for r in rows])
    other = load_for_inference(opts.baseline, opts.device)[:2] if opts.baseline else None
    under_test = "tuned" if is_run else opts.target
    systems = measure_systems(model, tok, is_run, other, under_test, task, opts, console)
    for s in systems.values():
        s["intervals"] = system_intervals(s, n_resamples=opts.n_resamples, confidence=opts.confidence, seed=opts.seed)

    # --- compare: paired bootstrap of the model under test against each baseline --------
    comparisons = {name: compare_systems(systems[name], systems[under_test], opts)
                   for name in systems if name != under_test}
    forgetting = forgetting_probe(model, tok, is_run, other, gen, opts, console)
    # --- diagnosis from the training curves --------------------------------------------
    findings = []
    if is_run and (target / "metrics.jsonl").exists():
        findings = [f.model_dump() for f in diagnose(*read_curves(target / "metrics.jsonl"))]
    harness = run_harness(model, tok, opts.harness, opts.harness_include, console) if opts.harness else None
    fairness = None
    if fair is not None:  # slices, counterfactual swaps and probe sets (evaluate/fairness)
        fsystems = [FairnessSystem(under_test, model, tok)]
        if is_run:
            fsystems.append(FairnessSystem("base zero-shot", model, tok, model.disable_adapter))
        elif other is not None:
            fsystems.append(FairnessSystem(f"{opts.baseline} zero-shot", *other))
        fairness = run_fairness(fair, term_lists, rows=rows, convs=convs, measured=systems, systems=fsystems,
                                kind=kind, labels=labels, gen=gen, tools=task.tools, system_prompt=system_prompt,
                                boot=Boot(opts.n_resamples, opts.confidence, opts.seed), console=console)

    # --- write -------------------------------------------------------------------------
    results = {"target": opts.target, "data": opts.data, "n": len(convs), "kind": kind, "labels": labels,
               "generation": gen.model_dump(), "lineage": lineage,
               "systems": {k: {f: v[f] for f in ("main", "scores", "seconds_per_request", "prompt_tokens_per_request",
                                                  "output_tokens_per_request", "confusion", "intervals") if f in v}
                           for k, v in systems.items()},
               "comparisons": comparisons, "forgetting": forgetting, "diagnosis": findings, "harness": harness,
               "fairness": fairness,
               "bootstrap": {"resamples": opts.n_resamples, "confidence": opts.confidence, "seed": opts.seed}}
    write_results(results, systems, out)
    print_table(results, under_test, console)
    if fairness:
        print_fairness(fairness, console)
    md, page = rp.write_report(eval_blocks(results, systems, under_test, target if is_run else None, out), out,
                               f"Evaluation of {opts.target}")
    console.print(f"[bold green]report[/]: {md} and {page}")
    return out


@dataclass
class _Task:
    """The rows every system answers: as they are, and with the few-shot examples in front."""
    convs: list[list[dict]]
    shot_convs: list[list[dict]]
    kind: str
    labels: list[str] | None
    gen: GenSettings
    tools: list[list[dict]] | None = None  # each row's tool schemas (kind "tools")


def measure_systems(model, tok, is_run: bool, other, under_test: str, task: _Task, opts: EvalOptions,
                    console: Console) -> dict[str, dict]:
    """Each system's answers and scores: the run's base (zero- and few-shot), ``other`` =
    (model, tokenizer) of --baseline, and the model under test last."""
    systems: dict[str, dict] = {}

    def run_system(name, m, t, cs, with_loss=True, label=None):
        systems[name] = measure(m, t, cs, kind=task.kind, labels=task.labels, gen=task.gen, label=label or name,
                                with_loss=with_loss, tools=task.tools)

    if is_run:
        with model.disable_adapter():
            run_system("base zero-shot", model, tok, task.convs)
            if opts.few_shot:
                run_system(f"base {opts.few_shot}-shot", model, tok, task.shot_convs, with_loss=False)
    if other is not None:
        other_model, other_tok = other
        if other_tok.get_vocab() != tok.get_vocab():
            console.print(f"[yellow]note[/]: {opts.baseline} has another tokenizer: prompt tokens differ")
        run_system(f"{opts.baseline} zero-shot", other_model, other_tok, task.convs, label=opts.baseline)
        if opts.few_shot:
            run_system(f"{opts.baseline} {opts.few_shot}-shot", other_model, other_tok, task.shot_convs,
                       with_loss=False, label=opts.baseline)
    run_system(under_test, model, tok, task.convs)
    return systems


def forgetting_probe(model, tok, is_run: bool, other, gen: GenSettings, opts: EvalOptions,
                     console: Console) -> dict | None:
    """Perplexity on general-domain text before (the run's base, or --baseline) and after."""
    if not opts.forgetting_texts or not (is_run or other is not None):
        return None
    try:
        texts = general_texts(opts.forgetting_texts)
    except ProbeUnavailable as e:
        console.print(f"[yellow]forgetting probe skipped[/]: {e}")
        return None

    def ppl(m, t):
        return summarize(nll_per_row(m, text_rows(t, texts, 128), t.pad_token_id, batch_size=gen.batch_size,
                                     device=gen.device, autocast_dtype=gen.autocast_dtype))["perplexity"]

    if is_run:
        with model.disable_adapter():
            before = ppl(model, tok)
    else:
        before = ppl(*other)
    verdict = forgetting_verdict(before, ppl(model, tok), opts.forgetting_threshold)
    return verdict | {"texts": len(texts), "source": "chatterbot-corpus (english)"}


def write_results(results: dict, systems: dict[str, dict], out: Path) -> None:
    """eval_results.json and one eval_samples.jsonl row per system and example."""
    write_json(out / "eval_results.json", results)
    with open(out / "eval_samples.jsonl", "w") as f:
        for name, s in systems.items():
            main = s["per_example"][s["main"]]
            for p, r, q, sc in zip(s["preds"], s["refs"], s["prompts"], main):
                f.write(json.dumps({"system": name, "prompt": q, "reference": r, "prediction": p, "score": sc}) + "\n")


def load_eval_rows(data: str, cfg, target: Path, keep_columns: list[str] = ()
                   ) -> tuple[list[dict], list[dict], dict, set[str]]:
    """(rows to evaluate, train rows for in-context examples, lineage, the row fields no format
    reads: the columns a fairness slice may name). ``keep_columns`` travel in each row's ``_columns``."""
    lineage: dict = {}
    train_rows: list[dict] = []
    if cfg is not None:
        splits = build_splits(cfg.data, cfg.train.seed, keep_columns=keep_columns)
        train_rows = splits.train
        lineage = {"base_model": cfg.model.name, "method": cfg.method.name,
                   "data_manifest_sha256": splits.manifest_hash(), "config": yaml.safe_load((target / "config.yaml").read_text())}
        report = target / "data_report.json"
        if report.exists():
            recorded = json.loads(report.read_text())["manifest_sha256"]
            lineage["manifest_matches_run"] = recorded == lineage["data_manifest_sha256"]
            if not lineage["manifest_matches_run"]:
                # The split is re-derived from the config: changed data files give other rows.
                raise DataError(f"the data behind {target} changed since training (manifest {recorded[:12]} -> "
                                f"{lineage['data_manifest_sha256'][:12]}): its test split is not the one held out")
    if data == "test":
        if cfg is None:
            raise DataError("--data test needs a run folder (its test split); for a model, pass a data file")
        if not splits.test:
            raise DataError(f"{target} has no test split (data.test_size=0 and no data.test files)")
        columns = {c for r in splits.reports.values() for c in r.unknown_fields}
        return splits.test, train_rows, lineage | {"data": "the run's test split"}, columns
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data {data}: no such file (or use 'test' for a run's test split)")
    rows, report = load_rows([data], cfg.data.format if cfg else "auto", cfg.data.columns if cfg else {},
                             keep_columns=keep_columns)
    return rows, train_rows, lineage | {"data": data}, set(report.unknown_fields)


def compare_systems(base: dict, tuned: dict, opts: EvalOptions) -> dict:
    """Per metric: tuned - base, with a paired bootstrap CI (corpus metrics recomputed per
    resample) where both systems have what it takes to resample the metric."""
    ci = paired_intervals(base, tuned, n_resamples=opts.n_resamples, confidence=opts.confidence, seed=opts.seed)
    return {name: {"base": b_val, "tuned": tuned["scores"][name], "delta": tuned["scores"][name] - b_val}
            | ci.get(name, {})
            for name, b_val in base["scores"].items() if name in tuned["scores"]}


def run_harness(model, tok, tasks: str, include: Path | None, console: Console) -> dict:
    """lm-evaluation-harness on the in-memory model, when installed (it is not a dependency).

    A harness failure (unknown task, task data not reachable offline) is reported and the
    rest of the evaluation is kept: the harness is an extra, not the evaluation itself."""
    if importlib.util.find_spec("lm_eval") is None:
        console.print("[yellow]--harness skipped[/]: lm-evaluation-harness is not installed "
                      "(pip install 'tuneforge[harness]'; its tasks download their data from the Hugging Face hub)")
        return {"skipped": "lm_eval is not installed"}
    import lm_eval  # deferred: optional extra (tuneforge[harness])
    from lm_eval.models.huggingface import HFLM  # deferred: optional extra (tuneforge[harness])
    from lm_eval.tasks import TaskManager  # deferred: optional extra (tuneforge[harness])

    manager = TaskManager(include_path=str(include) if include else None)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        console.print(f"[yellow]--harness skipped[/]: unknown lm-evaluation-harness task(s) {', '.join(unknown)} "
                      f"(`lm-eval ls tasks` lists them; local task YAMLs go in a folder given to --harness-include)")
        return {"skipped": f"unknown tasks: {', '.join(unknown)}"}
    # HFLM takes a transformers PreTrainedModel; a peft model's base model still holds the
    # (enabled) LoRA layers, so it scores the tuned model without merging anything.
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        res = lm_eval.simple_evaluate(model=HFLM(pretrained=hf_model, tokenizer=tok), tasks=names,
                                      task_manager=manager)
    except (ConnectionError, OSError) as e:  # hub unreachable: datasets/huggingface_hub raise OSError subclasses
        console.print(f"[yellow]--harness skipped[/]: the data of {', '.join(names)} is not available locally and the "
                      f"Hugging Face hub cannot be reached ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                      f"Run once with the hub reachable (it caches), or give a local task with --harness-include")
        return {"skipped": f"task data not available: {type(e).__name__}"}
    results = res.get("results", {})
    for task, scores in results.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float))
        console.print(f"lm-evaluation-harness {task}: {shown}")
    return {"tasks": names, "results": results}


def fmt(name: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if name in LOWER_IS_BETTER else f"{100 * v:.1f}%"


def fmt_ci(name: str, system: dict) -> str:
    """The value with its own interval, when eval_results.json has one."""
    ci = system.get("intervals", {}).get(name)
    if ci is None:
        return fmt(name, system["scores"].get(name))
    if name in LOWER_IS_BETTER:
        return f"{fmt(name, system['scores'][name])} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{fmt(name, system['scores'][name])} [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def fmt_delta(name: str, c: dict) -> str:
    scale, unit = (1, "") if name in LOWER_IS_BETTER else (100, " pts")
    d = f"{scale * c['delta']:+.{3 if not unit else 1}f}{unit}"
    if "low" in c:
        d += f" [{scale * c['low']:+.{3 if not unit else 1}f}, {scale * c['high']:+.{3 if not unit else 1}f}]"
    return d


def score_rows(results: dict, under_test: str) -> tuple[list[str], list[list[str]]]:
    """One row per metric: each system's value with its own interval, then the delta of the
    model under test against each baseline with its paired bootstrap CI."""
    names = list(results["systems"])
    baselines = [n for n in names if n != under_test]
    header = ["metric", *names, *(f"{under_test} - {b} ({int(100 * results['bootstrap']['confidence'])}% CI)"
                                  for b in baselines)]
    metrics = list(results["systems"][under_test]["scores"])
    rows = []
    for m in metrics:
        cells = [fmt_ci(m, results["systems"][n]) if m in results["systems"][n]["scores"] else "-" for n in names]
        cells += [fmt_delta(m, results["comparisons"][b][m]) if m in results["comparisons"][b] else "-"
                  for b in baselines]
        rows.append([m, *cells])
    return header, rows


def print_table(results: dict, under_test: str, console: Console) -> None:
    header, rows = score_rows(results, under_test)
    t = Table(title=f"{results['data']} ({results['n']} rows, {results['kind']})")
    for h in header:
        t.add_column(h, justify="left" if h == "metric" else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    f = results["forgetting"]
    if f:
        colour = "red" if f["flagged"] else "green"
        console.print(f"forgetting probe: general-text perplexity {f['perplexity_before']:.2f} -> "
                      f"{f['perplexity_after']:.2f} ([{colour}]{100 * f['relative_change']:+.1f}%[/], "
                      f"threshold +{100 * f['threshold']:.0f}%)")
    for d in results["diagnosis"]:
        console.print(f"diagnosis [bold]{d['kind']}[/]: {d['evidence']}. Suggestion: {d['suggestion']}")


TOOL_METRICS_TEXT = (
    "Tool rows: the first assistant turn after the user is generated with the row's tools in the prompt and "
    "scored as a call or not. tool_call_rate_when_needed and the argument metrics: rows whose reference calls "
    "(arguments_valid_json: parsed and valid against the function's JSON schema; arguments_exact: equal to the "
    "reference, numbers by value; argument_accuracy: share of arguments right); no_call_when_not_needed: rows "
    "whose reference answers directly; first_turn_correct: the right decision and exactly the right calls (all "
    "rows). answer_after_tool: token F1 of the final answer, prompted with the reference call and result.")


def eval_blocks(results: dict, systems: dict, under_test: str, run_dir: Path | None, out: Path) -> list:
    header, rows = score_rows(results, under_test)
    blocks = [rp.heading("Results"),
              rp.text(f"Data: {results['data']} ({results['n']} rows); task kind: {results['kind']}; "
                      f"main metric: {systems[under_test]['main']}. Intervals: paired bootstrap over examples "
                      f"({results['bootstrap']['resamples']} resamples); corpus-level metrics (BLEU, chrF, macro/micro "
                      "scores) and perplexity are recomputed on each resample. Each system's own interval is in "
                      "eval_results.json (systems.NAME.intervals). Loss and perplexity: lower is better."),
              rp.table(header, rows),
              rp.text(TOOL_METRICS_TEXT) if results["kind"] == "tools" else None,
              rp.table(["system", "seconds / request", "prompt tokens / request", "output tokens / request"],
                       [[n, f"{s['seconds_per_request']:.3f}", f"{s['prompt_tokens_per_request']:.0f}",
                         f"{s['output_tokens_per_request']:.1f}"] for n, s in systems.items()]),
              rp.heading("Generation settings"),
              rp.table(["setting", "value"], [[k, v] for k, v in results["generation"].items()])]
    for name, s in systems.items():
        if "confusion" in s:
            png = rp.confusion_png(s["confusion"], out / f"confusion-{slug(name)}.png", name)
            blocks += [rp.heading(f"Confusion matrix: {name}", 3), rp.image(png)]
    f = results["forgetting"]
    if f:
        blocks += [rp.heading("Forgetting probe"),
                   rp.text(f"Perplexity on {f['texts']} general-domain texts ({f['source']}): "
                           f"{f['perplexity_before']:.2f} before, {f['perplexity_after']:.2f} after "
                           f"({100 * f['relative_change']:+.1f}%; threshold +{100 * f['threshold']:.0f}%): "
                           + ("FLAGGED: the tuning hurt general language modelling." if f["flagged"] else "not flagged."))]
    if run_dir is not None:
        curve = plot_losses(run_dir / "metrics.jsonl", out / "loss.png") if (run_dir / "metrics.jsonl").exists() else None
        blocks += [rp.heading("Training curves"), rp.image(curve)]
    if results["diagnosis"]:
        blocks += [rp.heading("Diagnosis"),
                   rp.table(["finding", "evidence", "suggestion"],
                            [[d["kind"], d["evidence"], d["suggestion"]] for d in results["diagnosis"]])]
    s = systems[under_test]
    order = sorted(range(s["n"]), key=lambda i: s["per_example"][s["main"]][i])
    for title, idx in (("Best samples", order[::-1][:3]), ("Worst samples", order[:3])):
        blocks += [rp.heading(f"{title} ({under_test}, by {s['main']})", 3),
                   rp.table(["prompt", "reference", "prediction", s["main"]],
                            [[s["prompts"][i][:300], s["refs"][i], s["preds"][i],
                              f"{s['per_example'][s['main']][i]:.2f}"] for i in idx])]
    if results.get("fairness"):
        blocks += fairness_blocks(results["fairness"])
    if results.get("harness"):
        blocks += [rp.heading("lm-evaluation-harness"), rp.code(json.dumps(results["harness"], indent=2, default=str))]
    lin = results["lineage"]
    if lin:
        blocks += [rp.heading("Lineage"),
                   rp.table(["item", "value"], [[k, v] for k, v in lin.items() if k != "config"]),
                   rp.code(yaml.safe_dump(lin.get("config"), sort_keys=False))]
    return blocks


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
