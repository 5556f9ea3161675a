"""Model cards: generated from the run folder in the Hugging Face format (the hub's own parser
reads the front matter back), written by `registry add`, never over a README.md the user wrote."""

import json

import yaml
from huggingface_hub import ModelCard

from deploy_helpers import fake_run, fresh_url
from tuneforge.registry.card import MARK, card_text, write_card
from tuneforge.registry.store import Registry


def full_run(tiny_model_dir, root):
    """A fake run folder with what a trained and evaluated run holds."""
    run = fake_run(tiny_model_dir, root / "run", seed=1, score=0.8)
    cfg = {"model": {"name": "smollm2-135m-instruct"},
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "objective": {"name": "sft"},
           "data": {"train": ["builtin:orders?n=900&seed=0", "org/support-chats"], "max_length": 256,
                    "system_prompt": "Be brief."},
           "train": {"lr": 1e-3, "scheduler": "cosine", "batch_size": 8, "max_steps": 40, "seed": 0}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pii = {"name": "pii", "input": 900, "kept": 900, "dropped": {}, "changed": {"rows redacted": 7},
           "info": {"action": "redact", "found": {"email": 5, "phone": 3}}}
    (run / "data_report.json").write_text(json.dumps({
        "manifest_sha256": "ab" * 32, "rows": {"train": 756, "validation": 45, "test": 99},
        "load": {"train": {"dropped": {"empty answer": 4},
                           "sources": {"builtin:orders?n=900&seed=0": {"read": 904, "kept": 900, "synthetic": True}}}},
        "pii": {"train": pii},
        "render": {"train": {"kept": 750, "dropped": {"longer than max_length": 6}, "truncated": 0}}}))
    (run / "eval").mkdir()
    (run / "eval" / "eval_results.json").write_text(json.dumps({
        "n": 99, "data": "test", "bootstrap": {"resamples": 1000, "confidence": 0.95},
        "comparisons": {"base": {"exact_match": {"base": 0.1, "tuned": 0.8, "delta": 0.7, "low": 0.61,
                                                 "high": 0.79}}},
        "forgetting": {"verdict": "ok", "perplexity_ratio": 1.03},
        "fairness": {"max_gap": {"metric": "exact_match", "value": 0.21, "ci": [0.05, 0.37], "flagged": True}}}))
    return run


def test_card_front_matter_parses_with_the_hub_parser(tiny_model_dir, tmp_path):
    run = full_run(tiny_model_dir, tmp_path)
    text = card_text(run, title="bot:v1")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded alias's hub id
    assert data["library_name"] == "peft" and data["license"] == "apache-2.0"
    assert data["datasets"] == ["org/support-chats"]  # a hub id; the builtin task is in the Data section
    assert {"tuneforge", "lora", "sft"} <= set(data["tags"])
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert metrics == [{"type": "exact_match", "value": 0.8, "name": "exact_match"}]
    body = card.text
    assert MARK in body
    assert "904 read, 900 kept (synthetic)" in body and "4 rows dropped at loading (empty answer)" in body
    assert "6 rows dropped at tokenisation (longer than max_length)" in body
    assert "email 5, phone 3" in body and "7 redacted" in body
    assert "| base | exact_match | 0.1000 | 0.8000 | +0.7000 | [+0.6100, +0.7900] |" in body
    assert "perplexity_ratio: 1.03" in body
    assert "exact_match 0.21, interval [0.05, 0.37] — FLAGGED" in body
    assert f"tuneforge train {run / 'config.yaml'}" in body


def test_a_card_says_fairness_not_evaluated_when_absent(tiny_model_dir, tmp_path):
    run = full_run(tiny_model_dir, tmp_path)
    results = json.loads((run / "eval" / "eval_results.json").read_text())
    del results["fairness"]
    (run / "eval" / "eval_results.json").write_text(json.dumps(results))
    assert "Not evaluated (`tuneforge eval RUN --fairness SPEC`)" in card_text(run, title="x")


def test_registry_add_writes_a_card_and_keeps_a_users_readme(tiny_model_dir, tmp_path):
    reg = Registry(fresh_url("sqlite", tmp_path))
    run = fake_run(tiny_model_dir, tmp_path / "old-run", seed=2, score=0.6)  # an older run's bare config
    v = reg.add(run, "bot")
    assert v.card == str((run / "README.md").resolve())
    card = ModelCard.load(run / "README.md")
    assert card.data.model_name == "bot:v1" and card.data.eval_results[0].metric_value == 0.6
    assert card.data.base_model == tiny_model_dir
    v2 = reg.add(run, "bot")  # its own card: replaced
    assert ModelCard.load(run / "README.md").data.model_name == "bot:v2" and v2.card
    (run / "README.md").write_text("# my notes\n")
    v3 = reg.add(run, "bot")
    assert v3.card is None and (run / "README.md").read_text() == "# my notes\n"
    assert write_card(run, run, title="x") is None
