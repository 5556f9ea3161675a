"""The run's Data and Evaluation pages, against files written by the project's own writers.

Data: a folder made by `tuneforge data prepare`'s own function (data.prepare.prepare) from
builtin:orders plus a small file with a duplicate, an unreadable line, an empty answer, an
email address, a script tag and a long answer, and a test file whose prompt leaks from
train; the run's data_report.json is train.run_folder.data_report over that folder's splits
encoded by data.render.encode_rows with the tiny tokenizer (what the token recipes write).

Evaluation: eval/eval_results.json, eval_samples.jsonl and report.md/html are written by
evaluate.command's own write_results / eval_blocks (comparisons by its compare_systems:
paired bootstrap; forgetting_verdict; diagnose over a metrics.jsonl curve), from systems in
evaluate.measure.measure's result shape (main, scores, per_example, preds, refs, prompts,
per-request figures): generating with a model is not what these pages test. eval.json and
eval_samples.jsonl of the run are in the shape train.recipes.tokens.evaluate_run writes
(evaluate.task.evaluate_rows: n, scores, seconds, generation; samples with model, prompt,
reference, prediction, score); compare/compare.json in train.compare.run_compare's shape,
its costs and recommendation by that module's cost_of_ownership and recommend.
"""

from __future__ import annotations

import html
import json
import re

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.unit.ui.conftest import make_run
from tuneforge.config import DataConfig
from tuneforge.data.manifest import read_manifest
from tuneforge.data.prepare import PrepareOptions, build_splits, prepare
from tuneforge.data.render import encode_rows
from tuneforge.data.split import SplitOptions
from tuneforge.evaluate.command import EvalOptions, eval_blocks, write_results
from tuneforge.evaluate.diagnose import diagnose, read_curves
from tuneforge.evaluate.forgetting import forgetting_verdict
from tuneforge.evaluate import report as rp
from tuneforge.evaluate.command import compare_systems
from tuneforge.models.load import load_tokenizer
from tuneforge.runs import load_run_config
from tuneforge.train.compare import Prices, cost_of_ownership, recommend
from tuneforge.train.run_folder import data_report

MAX_LENGTH = 160


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def prepared_run(root, tmp_path, tiny_model_dir):
    """runs/prep: trained (as far as its data report goes) on a prepared folder."""
    extra, test = tmp_path / "extra.jsonl", tmp_path / "test.jsonl"
    rows = [chat("What is the refund policy for order 7?", "Refunds within 30 days."),
            chat("What is the refund policy for order 7?", "Refunds within 30 days."),  # exact duplicate
            chat("Mail me at jane.doe@example.com please", "Sure, I will write to you."),  # PII
            chat("Show <script>alert('x')</script> now", "Long answer: " + "lorem ipsum dolor " * 60),
            chat("Empty answer here", "   ")]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    test.write_text(json.dumps(chat("What is the refund policy for order 7?", "Within 30 days.")) + "\n"
                    + json.dumps(chat("Where is my parcel 55?", "It ships tomorrow.")) + "\n")
    prepared = tmp_path / "prepared"
    # the small file first: its rows lead the train split, so the page's examples include them
    prepare(PrepareOptions(inputs=[str(extra), "builtin:orders?n=60"], test_inputs=[str(test)],
                           tokenizer=tiny_model_dir, max_length=MAX_LENGTH, overlength="truncate",
                           split=SplitOptions(validation=0, test=0)), prepared)
    data = DataConfig(train=[str(prepared)], max_length=MAX_LENGTH, overlength="truncate")
    splits = build_splits(data, 0)
    tok = load_tokenizer(tiny_model_dir)
    enc = {k: encode_rows(tok, getattr(splits, k), MAX_LENGTH, "truncate") for k in ("train", "validation")}
    run = make_run(root, "prep")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"] = {"train": [str(prepared)], "max_length": MAX_LENGTH, "overlength": "truncate"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "data_report.json").write_text(json.dumps(data_report(splits, enc)))
    return run, prepared


def reason_rows(page: str) -> list[list[str]]:
    rows = re.findall(r'<tr class="reason">(.*?)</tr>', page, re.S)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
            for r in rows]


@pytest.fixture
def prep(runs_dir, tmp_path, tiny_model_dir):
    return prepared_run(runs_dir, tmp_path, tiny_model_dir)


def test_data_page_shows_every_reason_lengths_leakage_pii_and_escaped_examples(ui_app, prep):
    run, prepared = prep
    manifest, report = read_manifest(prepared), json.loads((run / "data_report.json").read_text())
    with TestClient(ui_app) as c:
        r = c.get("/ui/runs/prep/data")
    assert r.status_code == 200
    page = r.text
    # every drop / change the manifest and the run's report record, each with its count
    shown = {(cells[1], cells[3], cells[4]) for cells in reason_rows(page)}
    expected = {(st["name"], reason, str(n)) for st in manifest["stages"]
                for counts in (st["dropped"], st["changed"]) for reason, n in counts.items()}
    expected |= {("load", reason, str(n)) for load in report["load"].values() for reason, n in load["dropped"].items()}
    expected |= {("render", "longer than data.max_length: cut to max_length for training", str(e["truncated"]))
                 for e in report["render"].values() if e["truncated"]}
    names = {(s, reason) for s, reason, _ in expected}
    assert {("exact_dedup", "exact duplicate"), ("pii", "rows redacted"), ("leakage", "prompt also in train"),
            ("load", "messages: empty response")} <= names and len({s for s, _ in names if s == "load"}) == 1, names
    assert expected <= shown, expected - shown
    # the token-length histograms: bars, their counts, max_length marked, truncated rows counted
    filled = [n for n, sp in manifest["splits"].items() if sp["rows"]]
    assert filled == ["train", "test"] and page.count('<svg class="chart bars"') == 1 + len(filled)
    assert page.count('<rect class="bar"') >= 4 and f"max_length {MAX_LENGTH}" in page
    train = report["render"]["train"]
    assert f"train: {train['kept']} rows, {train['truncated']} truncated" in page and train["truncated"] >= 1
    assert all(f'class="bar-value">{n}</text>' in page for n in train["lengths"]["counts"] if n)
    # leakage found by prepare, PII counts per kind
    leak = next(st for st in manifest["stages"] if st["name"] == "leakage")
    assert re.search(r'<table class="grid" id="leakage">.*?<td class="count">' + str(leak["info"]["found"]), page, re.S)
    pii = next(st for st in manifest["stages"] if st["name"] == "pii")["info"]["found"]
    assert pii["EMAIL"] == 1 and re.search(r'data-kind="EMAIL"><td>EMAIL</td><td class="count">1</td>'
                                           r'<td class="count">0</td></tr>', page)  # inputs, then the test file
    # examples: from the prepared folder's splits, autoescaped, long ones clipped with "show all"
    assert 'class="example" data-split="train"' in page and 'class="example" data-split="test"' in page
    main = page.split("<main>")[1]
    assert "<script>" not in main and "Show &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; now" in main
    assert "show all (" in main and "Mail me at &lt;EMAIL&gt; please" in main  # the redacted row as trained
    assert "Where is my parcel 55?" in page  # the test file's kept row


def test_long_and_hostile_example_text_is_escaped_and_clipped(ui_app, runs_dir):
    run = make_run(runs_dir, "hostile")
    folder = runs_dir.parent / "hostile-prepared"
    folder.mkdir()
    long = "<script>alert('x')</script> " + "word " * 200
    (folder / "train.jsonl").write_text(json.dumps(chat("Say <b>hi</b>", long) | {"_where": "f:1"}) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"stages": [], "splits": {}, "accounting": {}}))
    from tuneforge.io import sha256_file

    (run / "data_report.json").write_text(json.dumps({
        "manifest_sha256": "x", "prepared": {"path": str(folder), "manifest_sha256": sha256_file(folder / "manifest.json")},
        "rows": {"train": 1, "validation": 0, "test": 0}, "load": {}, "render": {}}))
    with TestClient(ui_app) as c:
        page = c.get("/ui/runs/hostile/data").text
    main = page.split("<main>")[1]
    assert "<script>" not in main and "<b>hi</b>" not in main and "Say &lt;b&gt;hi&lt;/b&gt;" in main
    assert f"show all ({len(long)} characters)" in main
    assert main.count("&lt;script&gt;alert") == 2  # the clipped start and the full text behind "show all"


def test_a_run_without_data_report_or_histogram_says_why(ui_app, runs_dir):
    with TestClient(ui_app) as c:
        page = c.get("/ui/runs/alpha/data").text
        assert 'id="data-missing"' in page and "has no data_report.json" in page
        # a one-task recipe's report (train.run_folder.start_run: rows and load only), data read directly
        run = runs_dir / "alpha"
        cfg = load_run_config(run)
        splits = build_splits(cfg.data, cfg.train.seed)
        report = {"manifest_sha256": splits.manifest_hash(),
                  "rows": {k: len(getattr(splits, k)) for k in ("train", "validation", "test")},
                  "load": {k: v.as_dict() for k, v in splits.reports.items()}}
        (run / "data_report.json").write_text(json.dumps(report | {"manifest_sha256": "0" * 64}))
        changed = c.get("/ui/runs/alpha/data").text
        (run / "data_report.json").write_text(json.dumps(report))
        page = c.get("/ui/runs/alpha/data").text
    assert "no examples: the run&#39;s data changed since training" in changed and 'class="example"' not in changed
    assert "this run&#39;s data report has no length histogram: the sft recipe records no token lengths" in page
    assert 'id="leakage-missing"' in page and "has no leakage check: the run read its data files directly" in page
    assert 'id="pii-missing"' in page and "has no PII scan" in page
    # examples re-read as the trainer split them (the recorded manifest hash matches)
    assert page.count('class="example" data-split="train"') == 3
    assert splits.train[0]["messages"][0]["content"][:30] in html.unescape(page)


def eval_folder(run):
    """eval/ as `tuneforge eval RUN` writes it (see the module docstring)."""
    per_base, per_tuned = [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]
    prompts = [f"order {i}?" for i in range(4)]

    def system(per, preds, loss):
        return {"main": "exact_match", "scores": {"exact_match": sum(per) / 4, "loss": loss, "perplexity": 2.718 ** loss},
                "per_example": {"exact_match": per}, "preds": preds, "refs": [f"answer {i}" for i in range(4)],
                "prompts": prompts, "n": 4, "seconds_per_request": 0.01, "prompt_tokens_per_request": 12.0,
                "output_tokens_per_request": 3.0}

    systems = {"base zero-shot": system(per_base, ["nope", "nah", "answer 2", "?"], 2.0),
               "tuned": system(per_tuned, ["answer 0", "answer 1", "<i>bad</i>", "?"], 1.2)}
    opts = EvalOptions(target=str(run), n_resamples=200)
    findings = [f.model_dump() for f in diagnose(*read_curves(run / "metrics.jsonl"))]
    results = {"target": str(run), "data": "test", "n": 4, "kind": "short_answer", "labels": None,
               "generation": {"max_new_tokens": 8}, "lineage": {},
               "systems": {k: {f: v[f] for f in ("main", "scores", "seconds_per_request", "prompt_tokens_per_request",
                                                  "output_tokens_per_request") if f in v} for k, v in systems.items()},
               "comparisons": {"base zero-shot": compare_systems(systems["base zero-shot"], systems["tuned"], opts)},
               "forgetting": forgetting_verdict(10.0, 12.5, 0.10) | {"texts": 100, "source": "chatterbot-corpus (english)"},
               "diagnosis": findings, "harness": None,
               "bootstrap": {"resamples": opts.n_resamples, "confidence": opts.confidence, "seed": 0}}
    out = run / "eval"
    out.mkdir()
    write_results(results, systems, out)
    rp.write_report(eval_blocks(results, systems, "tuned", None, out), out, f"Evaluation of {run}")
    return results


def compare_folder(run):
    rows = [{"name": n, "metric": "exact_match", "accuracy": a, "ci": [a - 0.1, a + 0.1], "seconds_per_request": s,
             "prompt_tokens_per_request": p, "output_tokens_per_request": 3.0, "index_seconds": 0.0,
             "train_seconds": t} for n, a, s, p, t in (("zero-shot", 0.25, 0.01, 12, 0), ("few-shot", 0.4, 0.02, 60, 0),
                                                        ("rag", 0.5, 0.03, 70, 0), ("fine-tuned", 0.75, 0.01, 12, 30),
                                                        ("fine-tuned + rag", 0.76, 0.03, 70, 30))]
    for r in rows:
        r["tco"] = cost_of_ownership(r, 1000, Prices())
    # 40 rows: each strategy right on its first accuracy * 40 rows (nested, so the gaps are significant)
    per = {r["name"]: [1.0] * round(40 * r["accuracy"]) + [0.0] * (40 - round(40 * r["accuracy"])) for r in rows}
    rec = recommend([{"name": r["name"], "accuracy": r["accuracy"], "tco": r["tco"]["compute_seconds"]} for r in rows],
                    per)
    (run / "compare").mkdir()
    (run / "compare" / "compare.json").write_text(json.dumps({
        "config": "c.yaml", "run": str(run), "n": 4, "kind": "short_answer", "k": 3, "retriever": "bm25",
        "requests": 1000, "prices": Prices().model_dump(), "tco_unit": "compute_seconds", "generation": {},
        "strategies": rows, "recommendation": rec, "data_manifest_sha256": "0" * 64}))
    return rec


def test_evaluation_page_shows_base_vs_tuned_forgetting_diagnosis_samples_and_strategies(ui_app, runs_dir):
    run = runs_dir / "alpha"
    (run / "eval.json").write_text(json.dumps({
        "base": {"n": 2, "scores": {"exact_match": 0.5, "token_f1": 0.6}, "seconds": 1.0, "generation": {}},
        "tuned": {"n": 2, "scores": {"exact_match": 1.0, "token_f1": 0.55}, "seconds": 1.0, "generation": {}}}))
    (run / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in (
        {"model": "base", "prompt": "p1", "reference": "r1", "prediction": "wrong one", "score": 0.0},
        {"model": "base", "prompt": "p2", "reference": "r2", "prediction": "r2", "score": 1.0},
        {"model": "tuned", "prompt": "p1", "reference": "r1", "prediction": "r1 <b>yes</b>", "score": 1.0},
        {"model": "tuned", "prompt": "p2", "reference": "r2", "prediction": "r2", "score": 1.0})))
    results = eval_folder(run)
    rec = compare_folder(run)
    with TestClient(ui_app) as c:
        page = c.get("/ui/runs/alpha/evaluation").text
    # the trainer's held-out scores: base, tuned, delta (better up, worse down)
    assert re.search(r'data-metric="exact_match"><td>exact_match</td>\s*<td>0.5</td><td>1</td>\s*'
                     r'<td class="delta up">\+0.5</td>', page)
    assert re.search(r'data-metric="token_f1">.*?<td class="delta down">-0.05</td>', page, re.S)
    assert "1 better, 0 worse, 1 the same" in page and "r1 &lt;b&gt;yes&lt;/b&gt;" in page
    # tuneforge eval's report: delta with its bootstrap interval, forgetting flagged, diagnosis
    c_em = results["comparisons"]["base zero-shot"]["exact_match"]
    assert f"{100 * c_em['delta']:+.1f} pts [{100 * c_em['low']:+.1f}, {100 * c_em['high']:+.1f}]" in page
    assert 'id="forgetting" class="down"' in page and "10.00 before, 12.50 after (+25.0%" in page and "FLAGGED" in page
    finding = results["diagnosis"][0]
    assert f'<td class="finding {finding["kind"]}">{finding["kind"]}</td><td>{html.escape(finding["evidence"])}' in page
    assert "&lt;i&gt;bad&lt;/i&gt;" in page and "<i>bad</i>" not in page  # the report's losing answer, escaped
    # the strategy comparison and its recommendation
    assert page.count("<tr class=") >= 5 and f"Recommendation: {rec['strategy']}" in page
    assert 'id="report-missing"' not in page and 'id="compare-missing"' not in page


def test_evaluation_page_of_a_run_without_reports_says_why(ui_app):
    with TestClient(ui_app) as c:
        page = c.get("/ui/runs/alpha/evaluation").text
        beta = c.get("/ui/runs/beta/evaluation").text
    assert "no `tuneforge eval` report" in page and "no strategy comparison" in page
    assert 'id="forgetting-missing"' in page
    assert "diagnosed now from this run&#39;s metrics.jsonl" in page and 'id="diagnosis"' in page
    assert re.search(r'data-metric="json_exact"><td>json_exact</td>\s*<td>0.25</td><td>0.75</td>', page)
    assert 'id="trained-missing"' in beta and "its status is" in beta


def test_run_page_links_the_tabs_and_a_tenant_key_gets_404(ui_app, registry):
    app_key = registry.create_key("app", ["*"])[1]
    admin = registry.create_key("ops", ["*"], admin=True)[1]
    with TestClient(ui_app) as c:
        run_page = c.get("/ui/runs/alpha", headers={"Authorization": f"Bearer {admin}"}).text
        assert 'href="/ui/runs/alpha/data"' in run_page and 'href="/ui/runs/alpha/evaluation"' in run_page
        for page in ("data", "evaluation"):
            assert c.get(f"/ui/runs/alpha/{page}", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
            tenant = c.get(f"/ui/runs/alpha/{page}", headers={"Authorization": f"Bearer {app_key}"})
            assert tenant.status_code == 404 and "no run &#39;alpha&#39;" in tenant.text
            assert c.get(f"/ui/runs/alpha/{page}", follow_redirects=False).status_code == 303
            assert c.get(f"/ui/runs/..%2Falpha/{page}",
                         headers={"Authorization": f"Bearer {admin}"}).status_code == 404
