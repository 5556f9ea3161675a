"""``tuneforge compare``: which strategy for this task? Zero-shot, few-shot, RAG,
fine-tuning and fine-tuning + RAG on one test split, with accuracy, latency, prompt size,
training time, total cost of ownership for N requests, and a recommendation.

Recipe: setup -> data -> fine-tuned run (given or trained) -> retrieval index ->
strategies -> costs -> recommendation -> report. It lives in train/ because it trains the
fine-tuning strategy it compares when no run is given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from tuneforge.data.load import DataError
from tuneforge.data.prepare import build_splits
from tuneforge.data.render import with_system
from tuneforge.evaluate import report as rp
from tuneforge.evaluate.incontext import RETRIEVERS, draw_shots, query_text, rag_convs, with_examples
from tuneforge.evaluate.measure import GenSettings, measure
from tuneforge.evaluate.metrics import normalize, task_kind
from tuneforge.evaluate.stats import bootstrap_mean_ci
from tuneforge.io import check_output, write_json
from tuneforge.plugins import load_config
from tuneforge.runs import load_for_inference
from tuneforge.train.run import train


class Prices(BaseModel):
    """User-supplied prices; without any, cost is measured local compute seconds."""

    input_per_1m: float = Field(0.0, ge=0, description="per million prompt tokens (API-style pricing)")
    output_per_1m: float = Field(0.0, ge=0, description="per million generated tokens")
    compute_per_hour: float = Field(0.0, ge=0, description="per hour of the machine (training, indexing, serving)")

    @property
    def given(self) -> bool:
        return any((self.input_per_1m, self.output_per_1m, self.compute_per_hour))


class CompareOptions(BaseModel):
    config: str
    overrides: list[str] = []
    run: str | None = Field(None, description="an existing fine-tuning run of this config (else one is trained)")
    k: int = Field(3, gt=0, description="examples in the prompt for few-shot and RAG")
    retriever: Literal["minilm", "bm25"] = "minilm"
    limit: int | None = Field(None, gt=0)
    requests: int = Field(100_000, gt=0, description="N requests for the total cost of ownership")
    prices: Prices = Prices()
    tolerance: float = Field(0.02, ge=0, description="accuracy within this of the best counts as a tie")
    out: str | None = None
    seed: int = 0


# Qualitative dimensions: what the numbers do not show (same wording in every report).
QUALITATIVE = {
    "zero-shot": ("lowest: a prompt", "minutes", "edit the prompt; no knowledge beyond the base model"),
    "few-shot": ("low: pick examples", "hours", "swap the examples; limited by context length"),
    "rag": ("medium: index, retriever, prompt assembly", "days", "easiest: add or edit documents, no retraining"),
    "fine-tuned": ("medium: data, training, evaluation, adapter serving", "days",
                   "retrain on new data (minutes to hours); knowledge baked into weights"),
    "fine-tuned + rag": ("highest: both pipelines", "days to weeks",
                         "format learned once; facts updated through the index"),
}


def cost_of_ownership(row: dict, requests: int, prices: Prices) -> dict:
    """Total compute seconds (one-off training and indexing + N requests) and, when prices
    are given, money: machine time at compute_per_hour plus tokens at the token prices."""
    one_off = row["train_seconds"] + row["index_seconds"]
    seconds = one_off + requests * row["seconds_per_request"]
    out = {"compute_seconds": seconds, "compute_hours": seconds / 3600}
    if prices.given:
        tokens = requests * (row["prompt_tokens_per_request"] * prices.input_per_1m
                             + row["output_tokens_per_request"] * prices.output_per_1m) / 1e6
        out["cost"] = seconds / 3600 * prices.compute_per_hour + tokens
    return out


def recommend(rows: list[dict], tolerance: float) -> dict:
    """The cheapest strategy among those within ``tolerance`` of the best accuracy.
    Rows need: name, accuracy, tco (cost if priced, else compute seconds)."""
    best = max(rows, key=lambda r: r["accuracy"])
    close = [r for r in rows if r["accuracy"] >= best["accuracy"] - tolerance]
    pick = min(close, key=lambda r: r["tco"])
    reasons = [f"{best['name']} has the best accuracy ({100 * best['accuracy']:.1f}%)"]
    if pick is not best:
        reasons.append(f"{pick['name']} is within {100 * tolerance:.0f} points "
                       f"({100 * pick['accuracy']:.1f}%) and costs {pick['tco']:.4g} vs {best['tco']:.4g} "
                       "for the requested volume")
    others = [r for r in rows if r not in close]
    if others:
        worst = min(others, key=lambda r: r["accuracy"])
        reasons.append(f"{', '.join(r['name'] for r in others)} fall short by more than {100 * tolerance:.0f} "
                       f"points (down to {100 * worst['accuracy']:.1f}% for {worst['name']})")
    cheaper = [r for r in rows if r["tco"] < pick["tco"]]
    if cheaper:
        reasons.append(f"cheaper options ({', '.join(r['name'] for r in cheaper)}) lose too much accuracy")
    return {"strategy": pick["name"], "reasons": reasons}


def run_compare(opts: CompareOptions, console: Console | None = None) -> Path:
    console = console or Console()
    if opts.out:  # before minutes of training: a folder of someone else's is never written into
        check_output(Path(opts.out), _compare_folder, what="compare folder")

    # --- setup and data ----------------------------------------------------------------
    cfg = load_config(opts.config, opts.overrides)
    splits = build_splits(cfg.data, cfg.train.seed)
    if not splits.test:
        raise DataError("compare needs a test split: set data.test_size > 0 or data.test files")
    train_convs = [with_system(r["messages"], cfg.data.system_prompt) for r in splits.train]
    convs = [with_system(r["messages"], cfg.data.system_prompt) for r in splits.test][: opts.limit]
    refs = [c[-1]["content"] for c in convs]
    kind = task_kind(refs)
    labels = sorted({normalize(c[-1]["content"]) for c in train_convs} | {normalize(r) for r in refs}) \
        if kind == "classification" else None

    # --- the fine-tuned run: given, or trained now (its training time is measured) -------
    run_dir = fine_tuned_run(opts, cfg, splits.manifest_hash(), console)
    model, tok, _, device, dtype = load_for_inference(str(run_dir))
    gen = GenSettings(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, device=device,
                      dtype=str(dtype).replace("torch.", ""))
    out = Path(opts.out) if opts.out else run_dir / "compare"
    check_output(out, _compare_folder, what="compare folder")
    out.mkdir(parents=True, exist_ok=True)

    # --- retrieval index over the training examples, then every strategy ------------------
    t0 = time.perf_counter()
    retriever = RETRIEVERS[opts.retriever]([query_text(c) for c in train_convs])
    index_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    rag = rag_convs(convs, train_convs, retriever, opts.k)
    retrieve_per_request = (time.perf_counter() - t0) / len(convs)
    shots = draw_shots(train_convs, opts.k, opts.seed)
    strategies = [("zero-shot", False, convs, 0.0),
                  ("few-shot", False, [with_examples(c, shots) for c in convs], 0.0),
                  ("rag", False, rag, retrieve_per_request), ("fine-tuned", True, convs, 0.0),
                  ("fine-tuned + rag", True, rag, retrieve_per_request)]
    rows = [measure_strategy(model, tok, name, tuned, cs, extra, index_seconds if name.endswith("rag") else 0.0,
                             kind, labels, gen, opts.seed)
            for name, tuned, cs, extra in strategies]

    # --- costs: training time as the run recorded it ------------------------------------
    summary = run_dir / "summary.json"
    if not summary.exists():
        raise FileNotFoundError(f"{summary} is missing: the run has not finished (its training time is needed)")
    train_seconds = json.loads(summary.read_text())["train_seconds"]
    for row in rows:
        row["train_seconds"] = train_seconds if row.pop("tuned") else 0.0
        row["tco"] = cost_of_ownership(row, opts.requests, opts.prices)
    unit = "cost" if opts.prices.given else "compute_seconds"
    rec = recommend([{"name": r["name"], "accuracy": r["accuracy"], "tco": r["tco"][unit]} for r in rows],
                    opts.tolerance)

    # --- write -------------------------------------------------------------------------
    results = {"config": opts.config, "run": str(run_dir), "n": len(convs), "kind": kind, "k": opts.k,
               "retriever": opts.retriever, "requests": opts.requests, "prices": opts.prices.model_dump(),
               "tco_unit": unit, "generation": gen.model_dump(), "strategies": rows, "recommendation": rec,
               "data_manifest_sha256": splits.manifest_hash()}
    write_json(out / "compare.json", results)
    return write_report(results, opts, gen, out, console)


def _compare_folder(folder: Path) -> bool:
    return (folder / "compare.json").is_file()


def fine_tuned_run(opts: CompareOptions, cfg, manifest_hash: str, console: Console) -> Path:
    """--run, checked to be trained on the same data; else a run of the config trained now."""
    if not opts.run:
        return train(cfg, console=console)
    run_dir = Path(opts.run)
    recorded = json.loads((run_dir / "data_report.json").read_text())["manifest_sha256"]
    if recorded != manifest_hash:
        raise DataError(f"--run {run_dir} was trained on other data than {opts.config} describes "
                        f"(manifest {recorded[:12]} vs {manifest_hash[:12]})")
    return run_dir


def measure_strategy(model, tok, name: str, tuned: bool, convs, extra_seconds: float, index_seconds: float,
                     kind: str, labels, gen: GenSettings, seed: int) -> dict:
    """One strategy's accuracy (with a bootstrap CI), latency and tokens; the untuned ones run
    with the adapter switched off."""
    if tuned:
        m = measure(model, tok, convs, kind=kind, labels=labels, gen=gen, label=name, with_loss=False)
    else:
        with model.disable_adapter():
            m = measure(model, tok, convs, kind=kind, labels=labels, gen=gen, label=name, with_loss=False)
    lo, hi = bootstrap_mean_ci(m["per_example"][m["main"]], seed=seed)
    return {"name": name, "metric": m["main"], "accuracy": m["scores"][m["main"]], "ci": [lo, hi],
            "seconds_per_request": m["seconds_per_request"] + extra_seconds,
            "prompt_tokens_per_request": m["prompt_tokens_per_request"],
            "output_tokens_per_request": m["output_tokens_per_request"],
            "tuned": tuned, "index_seconds": index_seconds}


def write_report(results: dict, opts: CompareOptions, gen: GenSettings, out: Path, console: Console) -> Path:
    """The table on the console, and report.md / report.html in ``out``."""
    rec, n, kind = results["recommendation"], results["n"], results["kind"]
    header, table_rows = compare_table(results)
    t = Table(title=f"strategies on {n} test rows ({kind}; TCO for {opts.requests:,} requests)")
    for h in header:
        t.add_column(h, justify="left" if h == "strategy" else "right")
    for r in table_rows:
        t.add_row(*r)
    console.print(t)
    console.print(f"[bold]recommendation: {rec['strategy']}[/] - " + "; ".join(rec["reasons"]))
    blocks = [rp.text(f"Config {opts.config}; run {results['run']}; data manifest "
                      f"{results['data_manifest_sha256'][:16]}; {n} test rows; k={opts.k}; retriever "
                      f"{opts.retriever}; latency measured with batches of {gen.batch_size} on {gen.device} "
                      f"({gen.dtype})."),
              rp.heading("Measured"), rp.table(header, table_rows),
              rp.heading("Qualitative"),
              rp.table(["strategy", "implementation complexity", "effort", "updating knowledge"],
                       [[n, *q] for n, q in QUALITATIVE.items()]),
              rp.heading("Recommendation"), rp.text(f"{rec['strategy']}: " + "; ".join(rec["reasons"]) + ".")]
    md, page = rp.write_report(blocks, out, f"Strategy comparison: {opts.config}")
    console.print(f"[bold green]report[/]: {md} and {page}")
    return out


def compare_table(results: dict) -> tuple[list[str], list[list[str]]]:
    unit = results["tco_unit"]
    header = ["strategy", "accuracy (95% CI)", "latency s/request", "prompt tokens/request", "training s",
              f"TCO ({'cost' if unit == 'cost' else 'compute hours'}) for {results['requests']:,}"]
    rows = []
    for r in results["strategies"]:
        tco = r["tco"]["cost"] if unit == "cost" else r["tco"]["compute_hours"]
        rows.append([r["name"], f"{100 * r['accuracy']:.1f}% [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}]",
                     f"{r['seconds_per_request']:.3f}", f"{r['prompt_tokens_per_request']:.0f}",
                     f"{r['train_seconds']:.0f}", f"{tco:.4g}"])
    return header, rows
