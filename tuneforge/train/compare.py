"""``tuneforge compare``: which strategy for this task? Zero-shot, few-shot, RAG,
fine-tuning and fine-tuning + RAG on one test split, with accuracy (bootstrap intervals),
latency and tokens per request, measured effort (set-up seconds, rows needed), measured
update cost (re-index vs re-train seconds), total cost of ownership for N requests, and a
recommendation only where the paired difference is significant.

Recipe: setup -> data -> fine-tuned run (given or trained) -> retrieval index (and a timed
re-index) -> strategies, interleaved row chunk by row chunk -> costs -> recommendation ->
report. It lives in train/ because it trains the fine-tuning strategy it compares when no
run is given.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from tuneforge.data.load import DataError
from tuneforge.data.prepare import build_splits
from tuneforge.data.render import prompt_ids, with_system
from tuneforge.evaluate import report as rp
from tuneforge.evaluate.generate import generate_texts
from tuneforge.evaluate.incontext import (RETRIEVERS, doc_rag_convs, draw_shots, load_doc_chunks, query_text,
                                          rag_convs, with_examples)
from tuneforge.evaluate.measure import GenSettings
from tuneforge.evaluate.metrics import normalize, task_kind, task_metrics
from tuneforge.evaluate.stats import bootstrap_mean_ci, paired_bootstrap
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
    k: int = Field(3, gt=0, description="examples (or document chunks) in the prompt for few-shot and RAG")
    retriever: Literal["minilm", "bm25"] = "minilm"
    docs: str | None = Field(None, description="a folder of .txt/.md files: RAG retrieves their chunks instead of "
                             "training rows")
    limit: int | None = Field(None, gt=0)
    requests: int = Field(100_000, gt=0, description="N requests for the total cost of ownership")
    prices: Prices = Prices()
    tolerance: float = Field(0.0, ge=0, description="a strategy counts as worse than the best only when the paired "
                             "interval of the difference lies above this (0: the interval excludes 0)")
    confidence: float = Field(0.95, gt=0, lt=1)
    out: str | None = None
    seed: int = 0


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


def recommend(rows: list[dict], per_example: dict[str, list[float]], tolerance: float = 0.0,
              confidence: float = 0.95, seed: int = 0) -> dict:
    """The cheapest strategy among those not significantly worse than the best one; none when
    no strategy is significantly worse than the best (then more rows are needed).

    ``rows``: name, accuracy, tco (cost if priced, else compute seconds); ``per_example``: each
    strategy's per-row scores on the same rows. Significantly worse: the paired bootstrap
    interval of best - it lies above ``tolerance``."""
    best = max(rows, key=lambda r: r["accuracy"])
    n = len(per_example[best["name"]])
    diffs = {r["name"]: paired_bootstrap(per_example[r["name"]], per_example[best["name"]], confidence=confidence,
                                         seed=seed)
             for r in rows if r is not best}
    worse = [r for r in rows if r is not best and diffs[r["name"]]["low"] > tolerance]
    conf = f"{100 * confidence:.0f}% paired bootstrap"

    def gap(r):
        d = diffs[r["name"]]
        return (f"{r['name']} {100 * r['accuracy']:.1f}% ({100 * d['delta']:.1f} pts behind "
                f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}])")

    out = {"n": n, "confidence": confidence, "best": best["name"],
           "differences": {k: {x: d[x] for x in ("delta", "low", "high")} for k, d in diffs.items()}}
    if not worse:
        return out | {"strategy": None, "reasons": [
            f"no significant difference at {n} rows; run with more (a larger test split, or without --limit): "
            f"the best, {best['name']} at {100 * best['accuracy']:.1f}%, is not shown to beat "
            + ", ".join(gap(r) for r in rows if r is not best) + f" ({conf})"]}
    pick = min((r for r in rows if r not in worse), key=lambda r: r["tco"])
    reasons = [f"{best['name']} has the best accuracy ({100 * best['accuracy']:.1f}% on {n} rows)",
               f"significantly worse ({conf}): " + ", ".join(gap(r) for r in worse)]
    if pick is not best:
        reasons.append(f"{gap(pick)} is not significantly worse and costs {pick['tco']:.4g} vs {best['tco']:.4g} "
                       "for the requested volume")
    return out | {"strategy": pick["name"], "reasons": reasons}


def interleaved_schedule(n_rows: int, batch_size: int, names: list[str]) -> list[tuple[str, int, int]]:
    """(strategy, first row, end row) in the order they run: round robin over chunks of rows,
    each chunk run by every strategy, the starting strategy rotating chunk by chunk. Timed this
    way, a change of machine load hits every strategy alike instead of whichever ran then."""
    steps = []
    for c, start in enumerate(range(0, n_rows, batch_size)):
        rot = c % len(names)
        steps += [(name, start, min(start + batch_size, n_rows)) for name in names[rot:] + names[:rot]]
    return steps


@dataclass
class Strategy:
    name: str
    tuned: bool
    convs: list[list[dict]]
    extra_seconds_per_request: float = 0.0  # retrieval, done for all rows before generation


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
    corpus = rag_corpus(opts, train_convs)  # --docs problems surface before any training

    # --- the fine-tuned run: given, or trained now (its training time is measured) -------
    run_dir = fine_tuned_run(opts, cfg, splits.manifest_hash(), console)
    summary = run_dir / "summary.json"
    if not summary.exists():
        raise FileNotFoundError(f"{summary} is missing: the run has not finished (its training time is needed)")
    train_seconds = json.loads(summary.read_text())["train_seconds"]
    model, tok, _, device, dtype = load_for_inference(str(run_dir))
    gen = GenSettings(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, device=device,
                      dtype=str(dtype).replace("torch.", ""))
    out = Path(opts.out) if opts.out else run_dir / "compare"
    check_output(out, _compare_folder, what="compare folder")
    out.mkdir(parents=True, exist_ok=True)

    # --- retrieval index (timed), one changed fact re-indexed (timed), the prompts --------
    t0 = time.perf_counter()
    retriever = RETRIEVERS[opts.retriever](corpus["texts"])
    index_seconds = time.perf_counter() - t0
    reindex_seconds = time_reindex(opts.retriever, corpus["texts"])
    t0 = time.perf_counter()
    rag = (doc_rag_convs(convs, corpus["texts"], retriever, opts.k) if opts.docs
           else rag_convs(convs, train_convs, retriever, opts.k))
    retrieve = (time.perf_counter() - t0) / len(convs)
    shots = draw_shots(train_convs, opts.k, opts.seed)
    strategies = [Strategy("zero-shot", False, convs),
                  Strategy("few-shot", False, [with_examples(c, shots) for c in convs]),
                  Strategy("rag", False, rag, retrieve), Strategy("fine-tuned", True, convs),
                  Strategy("fine-tuned + rag", True, rag, retrieve)]

    # --- every strategy on every row, interleaved ---------------------------------------
    measured = measure_interleaved(model, tok, strategies, kind, labels, gen)
    rows = [strategy_row(st, measured[st.name], opts, index_seconds, train_seconds,
                         effort(st.name, opts.k, len(splits.train), corpus, index_seconds, train_seconds),
                         update_cost(st.name, reindex_seconds, train_seconds))
            for st in strategies]

    # --- recommendation: only on a significant difference ------------------------------
    unit = "cost" if opts.prices.given else "compute_seconds"
    rec = recommend([{"name": r["name"], "accuracy": r["accuracy"], "tco": r["tco"][unit]} for r in rows],
                    {name: m["per_example"][m["main"]] for name, m in measured.items()},
                    opts.tolerance, opts.confidence, opts.seed)

    # --- write -------------------------------------------------------------------------
    results = {"config": opts.config, "run": str(run_dir), "n": len(convs), "kind": kind, "k": opts.k,
               "retriever": opts.retriever, "rag_corpus": {k: v for k, v in corpus.items() if k != "texts"},
               "requests": opts.requests, "prices": opts.prices.model_dump(), "tco_unit": unit,
               "generation": gen.model_dump(),
               "timing": f"interleaved: round robin over chunks of {gen.batch_size} rows, the first strategy "
                         "rotating from chunk to chunk",
               "strategies": rows, "recommendation": rec, "data_manifest_sha256": splits.manifest_hash()}
    write_json(out / "compare.json", results)
    return write_report(results, opts, gen, out, console)


def _compare_folder(folder: Path) -> bool:
    return (folder / "compare.json").is_file()


def rag_corpus(opts: CompareOptions, train_convs: list[list[dict]]) -> dict:
    """What RAG retrieves from: --docs chunks, else the training rows (their user turns)."""
    if opts.docs:
        try:
            chunks, report = load_doc_chunks(opts.docs)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        return {"kind": "documents", "texts": chunks, **report}
    return {"kind": "training rows", "texts": [query_text(c) for c in train_convs], "rows": len(train_convs)}


def time_reindex(retriever: str, texts: list[str]) -> float:
    """Seconds to bring the index up to date after one fact changed. The retrievers here
    rebuild their index from the corpus (no incremental update), so that is what is timed."""
    changed = [texts[0] + " (updated)", *texts[1:]]
    t0 = time.perf_counter()
    RETRIEVERS[retriever](changed)
    return time.perf_counter() - t0


def effort(name: str, k: int, train_rows: int, corpus: dict, index_seconds: float, train_seconds: float) -> dict:
    """Measured set-up: seconds before the first answer (indexing, training) and the rows it needs."""
    n_corpus = len(corpus["texts"])
    docs = n_corpus if corpus["kind"] == "documents" else 0  # training rows as the index are already counted
    return {"zero-shot": {"setup_seconds": 0.0, "rows_needed": 0},
            "few-shot": {"setup_seconds": 0.0, "rows_needed": k},
            "rag": {"setup_seconds": index_seconds, "rows_needed": n_corpus},
            "fine-tuned": {"setup_seconds": train_seconds, "rows_needed": train_rows},
            "fine-tuned + rag": {"setup_seconds": train_seconds + index_seconds, "rows_needed": train_rows + docs},
            }[name]


def update_cost(name: str, reindex_seconds: float, train_seconds: float) -> dict:
    """Seconds to take in a changed fact: re-index (measured), re-train (the run's measured
    training time), or nothing to rebuild (the prompt or its examples are edited)."""
    return {"zero-shot": {"seconds": 0.0, "how": "edit the prompt"},
            "few-shot": {"seconds": 0.0, "how": "edit the examples"},
            "rag": {"seconds": reindex_seconds, "how": "re-index"},
            "fine-tuned": {"seconds": train_seconds, "how": "re-train"},
            "fine-tuned + rag": {"seconds": reindex_seconds, "how": "re-index (facts in the index)"}}[name]


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


def measure_interleaved(model, tok, strategies: list[Strategy], kind: str, labels, gen: GenSettings) -> dict:
    """Each strategy's answers, task metrics, seconds and tokens per request, generated in the
    order of ``interleaved_schedule``; the untuned ones with the adapter switched off."""
    n = len(strategies[0].convs)
    by_name = {st.name: st for st in strategies}
    preds = {name: [""] * n for name in by_name}
    seconds = dict.fromkeys(by_name, 0.0)
    prompt_tokens = dict.fromkeys(by_name, 0)
    for name, start, end in interleaved_schedule(n, gen.batch_size, list(by_name)):
        st = by_name[name]
        prompts = [prompt_ids(tok, c) for c in st.convs[start:end]]
        t0 = time.perf_counter()
        with contextlib.nullcontext() if st.tuned else model.disable_adapter():
            preds[name][start:end] = generate_texts(
                model, tok, prompts, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, device=gen.device,
                autocast_dtype=gen.autocast_dtype, label=f"{name}: rows {start + 1}-{end} of {n}")
        seconds[name] += time.perf_counter() - t0
        prompt_tokens[name] += sum(map(len, prompts))
    out = {}
    for name, st in by_name.items():
        output_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in preds[name])
        out[name] = task_metrics(kind, preds[name], [c[-1]["content"] for c in st.convs], labels) | {
            "seconds_per_request": seconds[name] / n, "prompt_tokens_per_request": prompt_tokens[name] / n,
            "output_tokens_per_request": output_tokens / n}
    return out


def strategy_row(st: Strategy, m: dict, opts: CompareOptions, index_seconds: float, train_seconds: float,
                 effort_: dict, update: dict) -> dict:
    """One strategy's line of compare.json: accuracy with its interval, latency, tokens, costs."""
    per = m["per_example"][m["main"]]
    lo, hi = bootstrap_mean_ci(per, seed=opts.seed, confidence=opts.confidence)
    row = {"name": st.name, "metric": m["main"], "accuracy": m["scores"][m["main"]], "ci": [lo, hi],
           "seconds_per_request": m["seconds_per_request"] + st.extra_seconds_per_request,
           "prompt_tokens_per_request": m["prompt_tokens_per_request"],
           "output_tokens_per_request": m["output_tokens_per_request"],
           "tokens_per_request": m["prompt_tokens_per_request"] + m["output_tokens_per_request"],
           "index_seconds": index_seconds if st.name.endswith("rag") else 0.0,
           "train_seconds": train_seconds if st.tuned else 0.0, "effort": effort_, "update": update}
    return row | {"tco": cost_of_ownership(row, opts.requests, opts.prices)}


def recommendation_line(rec: dict) -> str:
    return f"{rec['strategy'] or 'none'}: " + "; ".join(rec["reasons"])


def write_report(results: dict, opts: CompareOptions, gen: GenSettings, out: Path, console: Console) -> Path:
    """The tables on the console, and report.md / report.html in ``out``."""
    rec, n, kind = results["recommendation"], results["n"], results["kind"]
    header, table_rows = compare_table(results)
    t = Table(title=f"strategies on {n} test rows ({kind}; TCO for {opts.requests:,} requests)")
    for h in header:
        t.add_column(h, justify="left" if h == "strategy" else "right")
    for r in table_rows:
        t.add_row(*r)
    console.print(t)
    e_header, e_rows = effort_table(results)
    t = Table(title="effort and updating a fact (measured)")
    for h in e_header:
        t.add_column(h, justify="left" if h == "strategy" else "right")
    for r in e_rows:
        t.add_row(*r)
    console.print(t)
    console.print(f"[bold]recommendation: {recommendation_line(rec)}[/]")
    corpus = results["rag_corpus"]
    source = (f"{corpus['chunks']} chunks of {corpus['files']} documents in {corpus['dir']}"
              + (f" ({len(corpus['skipped_files'])} other files skipped)" if corpus["skipped_files"] else "")
              if corpus["kind"] == "documents" else f"{corpus['rows']} training rows")
    blocks = [rp.text(f"Config {opts.config}; run {results['run']}; data manifest "
                      f"{results['data_manifest_sha256'][:16]}; {n} test rows; k={opts.k}; retriever "
                      f"{opts.retriever} over {source}; latency measured with batches of {gen.batch_size} on "
                      f"{gen.device} ({gen.dtype}), {results['timing']}."),
              rp.heading("Measured"), rp.table(header, table_rows),
              rp.heading("Effort and updating a fact"),
              rp.text("Set-up: seconds before the first answer (training, indexing) and the rows it needs. "
                      "Update: seconds to take in one changed fact: re-indexing is timed here (the index is "
                      "rebuilt), re-training is the run's measured training time."),
              rp.table(e_header, e_rows),
              rp.heading("Recommendation"), rp.text(recommendation_line(rec) + ".")]
    md, page = rp.write_report(blocks, out, f"Strategy comparison: {opts.config}")
    console.print(f"[bold green]report[/]: {md} and {page}")
    return out


def compare_table(results: dict) -> tuple[list[str], list[list[str]]]:
    unit = results["tco_unit"]
    header = ["strategy", "accuracy (95% CI)", "latency s/request", "tokens/request (prompt + generated)",
              "training s", f"TCO ({'cost' if unit == 'cost' else 'compute hours'}) for {results['requests']:,}"]
    rows = []
    for r in results["strategies"]:
        tco = r["tco"]["cost"] if unit == "cost" else r["tco"]["compute_hours"]
        rows.append([r["name"], f"{100 * r['accuracy']:.1f}% [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}]",
                     f"{r['seconds_per_request']:.3f}",
                     f"{r['prompt_tokens_per_request'] + r['output_tokens_per_request']:.0f} "
                     f"({r['prompt_tokens_per_request']:.0f} + {r['output_tokens_per_request']:.0f})",
                     f"{r['train_seconds']:.0f}", f"{tco:.4g}"])
    return header, rows


def effort_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Measured effort and update cost per strategy (no rows for a compare.json written before
    they were measured)."""
    header = ["strategy", "set-up s", "rows needed", "update a fact", "update s"]
    return header, [[r["name"], f"{r['effort']['setup_seconds']:.1f}", str(r["effort"]["rows_needed"]),
                     r["update"]["how"], f"{r['update']['seconds']:.2f}"]
                    for r in results["strategies"] if "effort" in r]
