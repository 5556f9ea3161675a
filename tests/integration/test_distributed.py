"""`tuneforge train --nproc 2` (torchrun, gloo) computes the same run as one process with the
same global batch: 2 processes x grad_accum 1 == 1 process x grad_accum 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_raw_cfg, tmp_path):
    raw = tiny_raw_cfg | {"eval": {"metric": "none"}, "method": tiny_raw_cfg["method"] | {"dropout": 0.0}}
    raw["train"] = raw["train"] | {"max_steps": 3, "batch_size": 2, "eval_every": 3, "save_every": 0}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(ROOT), TUNEFORGE_ALLOCATOR="off", OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "tuneforge", "train", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    one = run(cfg, "train.grad_accum=2", "run_name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run("--nproc", "2", cfg, "run_name=two")
    assert two.returncode == 0, two.stderr[-3000:]
    runs = tmp_path / "runs"
    assert json.loads((runs / "two/environment.json").read_text())["world_size"] == 2
    m1, m2 = ([json.loads(x) for x in (runs / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [r["kind"] for r in m1] == [r["kind"] for r in m2]
    for a, b in zip(m1, m2):
        if a["kind"] == "train":
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        else:  # padded validation batches on weights equal to ~1e-6: float noise of the sum order
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=2e-4)
        if a["kind"] == "train":
            assert a["trained_tokens"] == b["trained_tokens"]  # the same global batch
    w1, w2 = (load_file(str(runs / d / "adapter/adapter_model.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    assert any(float(w.abs().sum()) > 0 for k, w in w2.items() if "lora_B" in k)  # it did train
