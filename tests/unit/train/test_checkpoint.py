"""Resuming: metrics.jsonl cut short by a killed run does not stop the resume."""

import json
import logging

from tuneforge.train.checkpoint import truncate_metrics
from tuneforge.train.loop import eval_history


def test_resume_skips_a_truncated_last_metrics_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 6)] + [
        {"kind": "eval", "step": 3, "val_loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="tuneforge.train"):
        truncate_metrics(path, 4)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 3]
    assert eval_history(path) == [(3, 0.5)]  # the early stopper's replay reads the file again
    assert "metrics.jsonl:7 is not a metrics row" in caplog.text
