"""`tuneforge eval` and `tuneforge compare` through the real CLI on the tiny Llama."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.integration


def tf(*args):
    # Offline like CI: lm-evaluation-harness must say its hub tasks are unavailable, not hang retrying.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tuneforge", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """One short LoRA run shared by the tests here (training is the slow part)."""
    tmp = tmp_path_factory.mktemp("eval-run")
    cfg = {"model": {"name": tiny_model_dir},
           "data": {"train": ["builtin:orders?n=120&seed=3"], "max_length": 160, "test_size": 0.1},
           "method": {"name": "lora", "r": 4, "alpha": 8},
           "train": {"lr": 5e-3, "max_steps": 3, "batch_size": 4, "eval_every": 1, "seed": 7, "dtype": "fp32"},
           "eval": {"metric": "none", "batch_size": 8}, "output_dir": str(tmp / "runs"), "run_name": "tiny"}
    p = tmp / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = tf("train", p)
    assert r.returncode == 0, r.stderr
    return p, tmp / "runs" / "tiny"


def test_eval_run_against_zero_and_few_shot_base(tiny_run, tmp_path):
    _, run = tiny_run
    r = tf("eval", run, "--data", "test", "--few-shot", "2", "--limit", "5", "--max-new-tokens", "6",
           "--forgetting-texts", "12", "--harness", "hellaswag")
    assert r.returncode == 0, r.stderr
    out = run / "eval"
    res = json.loads((out / "eval_results.json").read_text())
    assert list(res["systems"]) == ["base zero-shot", "base 2-shot", "tuned"]
    assert res["kind"] == "json" and res["n"] == 5
    assert res["generation"]["max_new_tokens"] == 6 and res["generation"]["do_sample"] is False
    tuned = res["systems"]["tuned"]["scores"]
    assert {"json_exact", "json_fields", "json_valid", "exact_match", "token_f1", "loss", "perplexity"} <= set(tuned)
    cmp = res["comparisons"]["base zero-shot"]["loss"]
    assert cmp["low"] <= cmp["delta"] <= cmp["high"]
    # Every metric has its own interval and an interval of the difference (perplexity recomputed per resample).
    assert set(res["systems"]["tuned"]["intervals"]) == set(tuned)
    assert all("low" in c for c in res["comparisons"]["base zero-shot"].values())
    # The prompt of the 2-shot system holds two more exchanges.
    sys_ = res["systems"]
    assert sys_["base 2-shot"]["prompt_tokens_per_request"] > sys_["base zero-shot"]["prompt_tokens_per_request"] + 40
    assert res["forgetting"]["texts"] == 12 and res["forgetting"]["perplexity_before"] > 1
    assert res["diagnosis"] and res["lineage"]["data_manifest_sha256"] == json.loads(
        (run / "data_report.json").read_text())["manifest_sha256"]
    said = " ".join(r.stdout.split())
    if importlib.util.find_spec("lm_eval"):
        assert "the data of hellaswag is not available locally" in said
        assert res["harness"]["skipped"].startswith("task data not available")
    else:
        assert "lm-evaluation-harness is not installed" in said
    assert len((out / "eval_samples.jsonl").read_text().splitlines()) == 15
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Forgetting probe" in html and "Lineage" in html
    assert "tuned - base zero-shot" in (out / "report.md").read_text()


HARNESS_TASK = """task: tf_capitals
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed "
                    "(pip install 'tuneforge[harness]')")
def test_harness_scores_a_local_task_on_the_tuned_model(tiny_run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [("France", ["Paris", "Berlin", "Madrid"], 0), ("Germany", ["Rome", "Berlin", "Oslo"], 1),
            ("Italy", ["Lisbon", "Vienna", "Rome"], 2), ("Spain", ["Madrid", "Paris", "Prague"], 0)]
    (tasks / "capitals.jsonl").write_text("".join(
        json.dumps({"question": f"What is the capital of {c}?", "choices": ch, "answer": a}) + "\n" for c, ch, a in rows))
    (tasks / "capitals.yaml").write_text(HARNESS_TASK.format(data=tasks / "capitals.jsonl"))
    _, run = tiny_run
    r = tf("eval", run, "--data", "test", "--limit", "2", "--max-new-tokens", "2", "--forgetting-texts", "0",
           "--harness", "tf_capitals", "--harness-include", tasks, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    harness = json.loads((tmp_path / "ev" / "eval_results.json").read_text())["harness"]
    acc = harness["results"]["tf_capitals"]["acc,none"]
    assert harness["tasks"] == ["tf_capitals"] and acc in (0.0, 0.25, 0.5, 0.75, 1.0)  # scored all 4 questions
    assert "lm-evaluation-harness tf_capitals" in r.stdout
    bad = tf("eval", run, "--data", "test", "--harness", "tf_capitals", "--harness-include", tmp_path / "nope")
    assert bad.returncode != 0 and "not a folder of lm-evaluation-harness task YAMLs" in bad.stderr + bad.stdout


def test_eval_model_on_a_label_file_with_baseline(tiny_model_dir, tmp_path):
    data = tmp_path / "labels.jsonl"
    rows = [{"instruction": f"Is this review good or bad? review {i}", "output": ["good", "bad"][i % 2]}
            for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = tf("eval", tiny_model_dir, "--data", data, "--baseline", tiny_model_dir, "--max-new-tokens", "3",
           "--forgetting-texts", "8", "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert res["kind"] == "classification" and res["labels"] == ["bad", "good"]
    model = res["systems"][tiny_model_dir]
    assert {"accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_micro"} <= set(model["scores"])
    assert sum(map(sum, model["confusion"]["matrix"])) == 8
    # Same weights as the baseline: no change, and no forgetting.
    assert res["comparisons"][f"{tiny_model_dir} zero-shot"]["accuracy"]["delta"] == 0
    assert res["forgetting"]["relative_change"] == pytest.approx(0, abs=1e-6)
    assert list((tmp_path / "ev").glob("confusion-*.png"))


def test_eval_and_compare_errors_name_the_problem(tiny_run, tiny_model_dir, capsys):
    from tuneforge.cli import main

    cfg, run = tiny_run
    assert main(["eval", tiny_model_dir, "--data", "test"]) == 2
    assert "needs a run folder" in capsys.readouterr().err
    assert main(["eval", tiny_model_dir, "--data", "nope.jsonl"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["compare", str(cfg), 'data.train=["builtin:orders?n=100&seed=4"]', "--run", str(run)]) == 2
    assert "trained on other data" in capsys.readouterr().err


def test_compare_strategies_with_an_existing_run(tiny_run, tmp_path):
    cfg, run = tiny_run
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "catalogue.md").write_text("Mugs cost 4 euros.\n\nYoga mats ship from Berlin.")
    r = tf("compare", cfg, "eval.max_new_tokens=6", "--run", run, "--limit", "4", "--k", "2", "--retriever", "bm25",
           "--requests", "1000", "--docs", docs,
           "--price-hour", "2.0", "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    names = [s["name"] for s in res["strategies"]]
    assert names == ["zero-shot", "few-shot", "rag", "fine-tuned", "fine-tuned + rag"]
    by = {s["name"]: s for s in res["strategies"]}
    assert by["fine-tuned"]["train_seconds"] > 0 and by["zero-shot"]["train_seconds"] == 0
    assert by["rag"]["prompt_tokens_per_request"] > by["zero-shot"]["prompt_tokens_per_request"]
    assert res["tco_unit"] == "cost" and all(s["tco"]["cost"] > 0 for s in res["strategies"])
    # 4 rows cannot separate the strategies: no recommendation, and the output says to run with more
    assert res["recommendation"]["strategy"] is None
    assert "no significant difference at 4 rows; run with more" in " ".join(r.stdout.split())
    assert res["rag_corpus"]["kind"] == "documents" and res["rag_corpus"]["chunks"] == 1  # two short paragraphs: one chunk
    assert by["rag"]["effort"]["rows_needed"] == 1 and by["fine-tuned"]["update"]["how"] == "re-train"
    assert by["rag"]["update"]["seconds"] > 0 and by["fine-tuned"]["update"]["seconds"] == by["fine-tuned"]["train_seconds"]
    assert by["rag"]["tokens_per_request"] == by["rag"]["prompt_tokens_per_request"] + by["rag"]["output_tokens_per_request"]
    assert "Effort and updating a fact" in (tmp_path / "cmp" / "report.html").read_text()
