"""Token-loss objectives that reuse the SFT recipe: CPT on raw text (packed, loss on every
token, perplexity before/after) and logit distillation from a teacher."""

import json

from tuneforge.plugins import validate_config
from tuneforge.data.builtin import orders
from tuneforge.train.run import train


def test_cpt_packs_text_and_reports_perplexity_before_and_after(tiny_raw_cfg, tmp_path):
    text = tmp_path / "domain.jsonl"
    text.write_text("\n".join(json.dumps({"text": r["input"]}) for r in orders(n=120, seed=5)))
    raw = tiny_raw_cfg | {"objective": "cpt", "run_name": "cpt"}
    raw["data"] = {"train": [str(text)], "max_length": 64, "val_size": 0.1, "test_size": 0.1}
    raw["train"] = raw["train"] | {"max_steps": 6, "eval_every": 0, "save_every": 0}
    run_dir = train(validate_config(raw))
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["tuned"]["perplexity"] < ev["base"]["perplexity"]
    for who in ("base", "tuned"):  # intervals over test rows, from per-row token losses
        lo, hi = ev[who]["intervals"]["perplexity"]
        assert lo <= ev[who]["perplexity"] <= hi and lo < hi
    change = ev["comparison"]["perplexity"]
    assert change["low"] <= change["delta"] <= change["high"] and change["delta"] < 0
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["load"]["train"]["format"] == "text"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Full blocks: every position but the first carries loss.
    assert rows[0]["trained_tokens"] == 4 * 63


def test_distill_trains_from_the_teacher_logits(tiny_raw_cfg, tiny_model_dir):
    raw = tiny_raw_cfg | {"objective": {"name": "distill", "teacher": tiny_model_dir, "alpha": 0.0},
                          "run_name": "kd", "eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 2, "eval_every": 0, "save_every": 0}
    run_dir = train(validate_config(raw))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    # The student starts as the teacher: with alpha=0 (pure KL) the first loss is 0.
    assert abs(rows[0]["loss"]) < 1e-6
