"""The train recipe on a tiny Llama: what should change does, what should not does not,
saved adapters reload exactly, and an interrupted run resumes to the same weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tuneforge.plugins import validate_config
from tuneforge.runs import load_run_config
from tuneforge.train.recipes import tokens as tokens_recipe
from tuneforge.train.run import train


def _train(raw):
    return train(validate_config(raw))


def test_lora_trains_adapters_only_and_adapter_reloads_with_identical_logits(tiny_raw_cfg, tiny_model_dir):
    from peft import PeftModel

    run_dir = _train(tiny_raw_cfg)
    for f in ("config.yaml", "environment.json", "data_report.json", "metrics.jsonl", "loss.png", "summary.json",
              "eval.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / f).exists(), f
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(1, 7))
    ev = json.loads((run_dir / "eval.json").read_text())
    for who in ("base", "tuned"):  # every metric with its own interval, the rows it was scored on hashed
        main, value = next(iter(ev[who]["scores"].items()))
        lo, hi = ev[who]["intervals"][main]
        assert lo <= value <= hi and len(ev[who]["rows_sha256"]) == 64
        assert len(next(iter(ev[who]["per_example"].values()))) == ev[who]["n"]
    assert ev["base"]["rows_sha256"] == ev["tuned"]["rows_sha256"]
    assert {"delta", "low", "high", "p_not_better"} <= set(next(iter(ev["comparison"].values())))
    pii = json.loads((run_dir / "data_report.json").read_text())["pii"]
    assert pii["train"]["info"]["action"] == "redact" and pii["train"]["input"] > 0  # data.pii ran on the raw rows
    assert any(m["kind"] == "eval" for m in metrics)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = load_file(str(run_dir / "adapter/adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained

    tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    # The base weights under the adapter are untouched by training.
    for k, v in tuned.get_base_model().state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_state[k.replace(".base_layer", "")]), k
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        a = tuned(input_ids=ids).logits
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(run_dir / "adapter")).eval()(input_ids=ids).logits
        with tuned.disable_adapter():
            c = tuned(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # the adapter changes the output


def test_resumed_run_ends_with_the_same_weights(tiny_raw_cfg, monkeypatch):
    tiny_raw_cfg = tiny_raw_cfg | {"eval": {"metric": "none"}}  # weights are compared, not generations
    ref_dir = _train(tiny_raw_cfg | {"run_name": "ref"})
    ref = load_file(str(ref_dir / "adapter/adapter_model.safetensors"))

    calls = {"n": 0}
    real = tokens_recipe.trained_tokens

    def interrupt_in_step_5(batch):
        calls["n"] += 1
        if calls["n"] == 5:  # batch_size 4, grad_accum 1: one call per step
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(tokens_recipe, "trained_tokens", interrupt_in_step_5)
    with pytest.raises(SystemExit) as e:
        _train(tiny_raw_cfg | {"run_name": "cut"})
    assert e.value.code == 130
    monkeypatch.setattr(tokens_recipe, "trained_tokens", real)
    cut_dir = ref_dir.parent / "cut"
    assert sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    cfg = load_run_config(cut_dir)
    train(cfg, resume=cut_dir)
    resumed = load_file(str(cut_dir / "adapter/adapter_model.safetensors"))
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k
    steps = [json.loads(x)["step"] for x in (cut_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 7))


def test_grad_accumulation_matches_one_big_batch(tiny_raw_cfg):
    """Loss is normalised by the window's trained tokens: 2 x 2 rows == 1 x 4 rows."""
    common = {"max_steps": 2, "eval_every": 0, "save_every": 0}
    raw = tiny_raw_cfg | {"eval": {"metric": "none"}, "method": tiny_raw_cfg["method"] | {"dropout": 0.0}}
    a = _train(raw | {"run_name": "big", "train": tiny_raw_cfg["train"] | common | {"batch_size": 4}})
    b = _train(raw | {"run_name": "acc", "train": tiny_raw_cfg["train"] | common | {"batch_size": 2,
                                                                                      "grad_accum": 2}})
    wa, wb = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (a, b))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_padding_free_batches_train_the_same_weights_as_padded_ones(tiny_raw_cfg, monkeypatch):
    """The default padding-free path is a speed-up only: same losses, same validation losses
    (its validation batches laid out the same way, the shared instruction computed once),
    same trained adapter."""
    made = []  # each run's batches, the validation ones first (built before training starts)
    real = tokens_recipe.epoch_batches
    monkeypatch.setattr(tokens_recipe, "epoch_batches", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    common = {"max_steps": 2, "eval_every": 1, "save_every": 0}
    raw = tiny_raw_cfg | {"eval": {"metric": "none"}, "method": tiny_raw_cfg["method"] | {"dropout": 0.0}}
    a = _train(raw | {"run_name": "padded", "train": tiny_raw_cfg["train"] | common | {"padding_free": False}})
    padded_val = made[0]
    made.clear()
    b = _train(raw | {"run_name": "free", "train": tiny_raw_cfg["train"] | common})
    free_val = made[0]
    for kind in ("loss", "val_loss"):
        la, lb = ([m[kind] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if kind in m]
                  for d in (a, b))
        assert len(la) == 2 and la == pytest.approx(lb, rel=1e-4), kind
    assert any(v["input_ids"].shape[0] > 1 for v in padded_val)
    assert all(v["input_ids"].shape[0] == 1 for v in free_val)  # rows end to end, no padding
    assert sum(v["input_ids"].numel() for v in free_val) < sum(int(v["n_real"]) for v in free_val)  # prefix once
    wa, wb = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (a, b))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_picking_cuda_turns_off_cudnn_attention(monkeypatch):
    # cuDNN attention plans every new sequence length (6x slower padding-free steps on an H200):
    # choosing the GPU must switch it off for the process, and choosing the CPU must not.
    from tuneforge.hardware import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        assert pick_device("cpu") == "cpu" and torch.backends.cuda.cudnn_sdp_enabled()
        assert pick_device("auto") == "cuda" and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


