"""`tuneforge train --nproc 2` (torchrun, gloo) computes the same run as one process with the
same global batch: 2 processes x grad_accum 1 == 1 process x grad_accum 2, with the model
replicated (train.distributed=ddp) or sharded by FSDP2 (train.distributed=fsdp)."""

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
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TUNEFORGE_ALLOCATOR="off", OMP_NUM_THREADS="1")


def short_run(raw: dict, tmp_path: Path, method: dict | None = None) -> Path:
    raw = raw | {"eval": {"metric": "none"}, "method": method or raw["method"] | {"dropout": 0.0}}
    raw["train"] = raw["train"] | {"max_steps": 3, "batch_size": 2, "eval_every": 3, "save_every": 0}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def train(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "tuneforge", "train", *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_run(one: Path, two: Path, weights: str, distributed: str) -> None:
    env = json.loads((two / "environment.json").read_text())
    assert (env["world_size"], env["distributed"]) == (2, distributed)
    m1, m2 = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert [r["kind"] for r in m1] == [r["kind"] for r in m2]
    for a, b in zip(m1, m2):
        if a["kind"] == "train":
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-4)  # FSDP: the norm over all shards
            assert a["trained_tokens"] == b["trained_tokens"]  # the same global batch
        else:  # weights equal but for Adam's eps-amplified elements (below): float noise of the sum order
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    # Checkpoints are the same files too: whole weights and optimizer state, written by rank 0.
    s1, s2 = (torch.load(d / "checkpoints/step-000003/state.pt", weights_only=True)["optimizer"] for d in (one, two))
    assert s1["param_groups"] == s2["param_groups"]
    for i, moments in s1["state"].items():  # Adam's moments are linear in the gradients: they must agree
        for k, v in moments.items():  # (to float noise: a wrong scale or a missing shard is off by >= 30%)
            assert float((v - s2["state"][i][k]).norm()) <= 1e-3 * float(v.norm()) + 1e-12, (i, k)
    max_step = 2 * s1["param_groups"][0]["initial_lr"] * 3  # opposite full Adam steps, at most, over 3 steps
    assert_same_adam_weights(*(load_file(str(d / weights)) for d in (one, two)), max_step)
    assert_same_adam_weights(*(load_file(str(d / "checkpoints/step-000003/trainable.safetensors"))
                               for d in (one, two)), max_step)


def assert_same_adam_weights(w1: dict, w2: dict, max_step: float) -> None:
    """Equal weights, but for the few elements whose gradient is ~Adam's eps (1e-8): there
    the float noise of a different summation order (machine-dependent kernels, the gradient
    reduction) decides the sign of a nearly whole Adam step, so such an element may differ by
    up to ``max_step``. The gradients themselves are compared through the moments above."""
    assert w1.keys() == w2.keys()
    for k in w1:
        diff = (w1[k] - w2[k]).abs()
        assert float((diff > 1e-5).float().mean()) < 1e-3 and float(diff.max()) <= max_step * 1.01, k


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_raw_cfg, tmp_path):
    cfg = short_run(tiny_raw_cfg, tmp_path)
    train(cfg, "train.grad_accum=2", "run_name=one")
    runs = tmp_path / "runs"
    for distributed in ("ddp", "fsdp"):
        train("--nproc", "2", cfg, f"train.distributed={distributed}", f"run_name={distributed}")
        assert_same_run(runs / "one", runs / distributed, "adapter/adapter_model.safetensors", distributed)
    w = load_file(str(runs / "fsdp/adapter/adapter_model.safetensors"))
    assert any(float(t.abs().sum()) > 0 for k, t in w.items() if "lora_B" in k)  # it did train


def test_fsdp_full_fine_tuning_matches_one_process(tiny_raw_cfg, tmp_path):
    """Every weight sharded and trained, the tied embedding/head included."""
    cfg = short_run(tiny_raw_cfg | {"train": tiny_raw_cfg["train"] | {"lr": 1e-3}}, tmp_path, {"name": "full"})
    train(cfg, "train.grad_accum=2", "run_name=one")
    train("--nproc", "2", cfg, "train.distributed=fsdp", "run_name=fsdp")
    runs = tmp_path / "runs"
    assert_same_run(runs / "one", runs / "fsdp", "adapter/model.safetensors", "fsdp")
    base = load_file(str(Path(tiny_raw_cfg["model"]["name"]) / "model.safetensors"))
    tuned = load_file(str(runs / "fsdp/adapter/model.safetensors"))
    assert all(not torch.equal(base[k], tuned[k]) for k in base)  # it did train, every tensor


def test_a_checkpoint_reads_back_into_the_shards(tiny_model_dir, tmp_path):
    """Whole tensors from the files, cut again to each rank's shard (the NaN guard's rollback)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/integration/fsdp_checkpoint_worker.py"), tiny_model_dir, str(tmp_path)],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoints/step-000001/trainable.safetensors").exists()
