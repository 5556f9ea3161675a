"""DP-SGD: each example's contribution to the update is bounded by max_grad_norm; epsilon is reported."""

import json

import pytest
import torch

from tuneforge.config import ConfigError, PrivacyConfig

from tuneforge.plugins import validate_config
from tuneforge.data.load import load_rows
from tuneforge.data.render import encode_rows, pad_batch
from tuneforge.methods import METHODS
from tuneforge.objectives import OBJECTIVES
from tuneforge.train.privacy import make_private
from tuneforge.train.run import train


def _lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = METHODS["lora"]
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora.options(name="lora", r=2, dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # B=0 at init would zero A's gradient
    return model


def _summed_update(model, rows, tok, clip, private: bool):
    """The gradient the optimizer applies for a batch of ``rows`` (a sum: expected batch size 1, no noise)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    dp = make_private(model, opt, PrivacyConfig(noise_multiplier=0.0, max_grad_norm=clip), micro_batch_size=1,
                      rows_per_step=len(rows), n_rows=100, steps=1) if private else None
    try:
        sft = OBJECTIVES["sft"]
        loss, _ = sft.loss(model, pad_batch(rows, tok.pad_token_id), sft.options(), hidden_path=True)
        loss.backward()
        if dp:
            dp.optimizer.pre_step()  # clip each example, sum, (no) noise, scale by 1/expected batch size
        flat = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        (dp.optimizer if dp else opt).zero_grad()
        return flat
    finally:
        if dp:
            dp.close()


def test_per_example_clipping_bounds_each_examples_contribution(tiny_model_dir, tiny_tok):
    rows = encode_rows(tiny_tok, load_rows(["builtin:orders?n=4&seed=9"])[0], 160, "drop").rows
    model = _lora_model(tiny_model_dir)
    clip = 1e-3
    for private, bounded in ((False, False), (True, True)):
        with_all = _summed_update(model, rows, tiny_tok, clip, private)
        for i in range(len(rows)):  # neighbouring batch: example i removed
            without = _summed_update(model, rows[:i] + rows[i + 1 :], tiny_tok, clip, private)
            change = float((with_all - without).norm())
            if bounded:
                # The example's gradient is far above the bound, so it is clipped to exactly it.
                assert change == pytest.approx(clip, rel=1e-3)
            else:
                assert change > 100 * clip  # without DP one example moves the update far more
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_dp_run_reports_epsilon_close_to_the_target(tiny_raw_cfg):
    raw = tiny_raw_cfg | {"privacy": {"target_epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 0.5},
                          "eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 4, "eval_every": 2}
    run_dir = train(validate_config(raw))
    summary = json.loads((run_dir / "summary.json").read_text())
    p = summary["privacy"]
    assert p["epsilon"] == pytest.approx(4.0, rel=0.05) and p["noise_multiplier"] > 0 and p["steps"] == 4
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert 0 < evals[0]["epsilon"] < evals[1]["epsilon"] == pytest.approx(p["epsilon"])  # spent as it trains


def test_dp_rejects_ewc_and_packing(tiny_raw_cfg, tiny_model_dir):
    from tuneforge.train.run_folder import preflight

    raw = tiny_raw_cfg | {"privacy": {"noise_multiplier": 1.0}}
    raw["data"] = raw["data"] | {"packing": True}
    with pytest.raises(ConfigError, match="packing"):
        preflight(validate_config(raw))
    with pytest.raises(ConfigError, match="exactly one"):
        validate_config(tiny_raw_cfg | {"privacy": {"noise_multiplier": 1.0, "target_epsilon": 3.0}})
