"""Preference objectives on the tiny Llama: the reference is the adapter-disabled model,
every loss trains, and DPO raises held-out preference accuracy."""

import json

import pytest
import torch

from tuneforge.plugins import validate_config
from tuneforge.methods import METHODS
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives import OBJECTIVES
from tuneforge.train.recipes.pairs import encode_pairs, pair_batches, pair_step
from tuneforge.train.recipes.scoring import Reference, batch_logps
from tuneforge.train.run import train

ROWS = [{"prompt": [{"role": "user", "content": f"order {i} coffee mugs"}], "chosen": '{"quantity": %d}' % i,
         "rejected": f"you want {i} mugs"} for i in range(1, 5)]


@pytest.fixture
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    opts = validate_config({"data": {"train": ["x"]}, "method": {"name": "lora", "r": 4}}).method
    model = METHODS["lora"].apply(load_causal_lm(tiny_model_dir, torch.float32, "cpu"), opts)
    for name, p in model.named_parameters():  # make the adapter non-zero, as after training
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def test_reference_is_the_base_model(lora_model, tiny_model_dir, tiny_tok):
    pairs, _ = encode_pairs(tiny_tok, ROWS, 128, None)
    batch = pair_batches(pairs, 4, tiny_tok.pad_token_id, 0, 0, shuffle=False)[0]
    base = load_causal_lm(tiny_model_dir, torch.float32, "cpu").eval()
    lora_model.eval()
    with torch.no_grad():
        expected, _ = batch_logps(base, batch)
        policy, _ = batch_logps(lora_model, batch)
    ref, n = Reference(lora_model).logps(batch)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapter is on outside the reference
    assert n.tolist()[:4] == [sum(t != -100 for t in p["chosen"]["labels"][1:]) for p in pairs]


@pytest.mark.parametrize("objective", [{"name": "dpo", "loss_type": "sigmoid"}, {"name": "dpo", "loss_type": "ipo"},
                                       {"name": "dpo", "loss_type": "hinge"}, {"name": "simpo"}, {"name": "orpo"}])
def test_every_preference_loss_gives_gradients_to_the_adapter(lora_model, tiny_tok, objective):
    opts = validate_config({"data": {"train": ["x"]}, "objective": objective}).objective
    obj = OBJECTIVES[opts.name]
    pairs, _ = encode_pairs(tiny_tok, ROWS, 128, None)
    batch = pair_batches(pairs, 4, tiny_tok.pad_token_id, 0, 0)[0]
    loss, metrics = pair_step(lora_model, Reference(lora_model) if obj.needs_reference else None, obj, opts, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(metrics) >= {"reward_margin", "reward_accuracy", "logp_accuracy"}
    grads = [p.grad for n, p in lora_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_dpo_run_raises_held_out_preference_accuracy(tiny_raw_cfg):
    raw = tiny_raw_cfg | {"objective": {"name": "dpo", "beta": 0.1}, "run_name": "dpo"}
    raw["data"] = {"train": ["builtin:orders_preference?n=100&seed=3"], "max_length": 200, "val_size": 0.1,
                   "test_size": 0.2}
    raw["train"] = raw["train"] | {"max_steps": 8, "eval_every": 0, "save_every": 0}
    raw["eval"] = {"batch_size": 10}
    run_dir = train(validate_config(raw))
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["base"]["reward_accuracy"] == 0.0  # before training policy == reference: all margins are 0
    assert ev["tuned"]["reward_accuracy"] > 0.5 and ev["tuned"]["reward_margin"] > 0
    assert ev["tuned"]["logp_accuracy"] > ev["base"]["logp_accuracy"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["steps"] == 8
    assert (run_dir / "adapter/adapter_model.safetensors").exists() and (run_dir / "loss.png").exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
