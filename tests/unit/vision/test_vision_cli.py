"""End to end through the CLI: `tuneforge train` a tiny VLM on generated coloured shapes, then
`tuneforge eval` the run; the run folder is a standard one and the adapter reloads."""

from __future__ import annotations

import json

import torch
import yaml

from tuneforge.cli import main


def test_train_then_eval_a_tiny_vlm(tiny_vlm_dir, shapes, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "off")  # never re-exec the test process
    config = {
        "model": {"name": tiny_vlm_dir, "kind": "vision", "vision": {"train_projector": True}},
        "data": {"train": [str(shapes["llava"])], "max_length": 96, "val_size": 0.15, "test_size": 0.15},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"lr": 5e-3, "max_steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "dtype": "fp32",
                  "seed": 1},
        "eval": {"max_new_tokens": 3, "limit": 2, "batch_size": 4},
        "output_dir": str(tmp_path / "runs"), "run_name": "vlm",
    }
    (tmp_path / "vision.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "vision.yaml")]) == 0
    run = tmp_path / "runs" / "vlm"
    for name in ("config.yaml", "data_report.json", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/processor_config.json", "eval.json", "eval_samples.jsonl", "summary.json"):
        assert (run / name).exists(), name
    report = json.loads((run / "data_report.json").read_text())
    assert report["load"]["train"]["format"] == "vision_sharegpt" and report["images"]["train"] > 0
    adapter = json.loads((run / "adapter/adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["model.multi_modal_projector"]
    assert all(".language_model." in t for t in adapter["target_modules"])  # LoRA never on the vision tower
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["eval"]) == {"base", "tuned"}

    assert main(["eval", str(run), "--limit", "2"]) == 0
    results = json.loads((run / "eval" / "eval_results.json").read_text())
    assert results["kind"] == "vision" and results["n"] == 2 and "exact_match" in results["systems"]["tuned"]["scores"]

    # The saved run reloads to the trained weights: same logits as at the end of training.
    from tuneforge.data.load import load_rows
    from tuneforge.runs import load_vision_run
    from tuneforge.train.recipes.vision import collate, encode_rows

    model, proc, _ = load_vision_run(run)
    rows, _ = load_rows([str(shapes["llava"])], kind="vision")
    batch = collate(proc, encode_rows(proc, rows[:2], 96, "drop", 8).rows)
    batch.pop("labels")
    with torch.no_grad():
        tuned = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    assert not torch.allclose(tuned, base)  # the adapter (and trained projector) is applied on reload
