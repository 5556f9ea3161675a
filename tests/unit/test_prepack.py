"""Prepacked bf16 Linear weights (deploy/prepack.py): the model computes what it computes
unpacked, forward hooks (the gathered LoRA path) still apply, and where packing cannot be done
"auto" leaves the model alone while "on" says why."""

import asyncio

import pytest
import torch
from deploy_helpers import fake_run
from torch import nn

from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.deploy.multilora import LoraBank
from tuneforge.deploy.prepack import prepack


def _model(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()


def test_packed_model_gives_the_same_logits_and_keeps_lora_hooks(tiny_model_dir, tmp_path):
    adapter = fake_run(tiny_model_dir, tmp_path / "run", seed=3) / "adapter"
    plain, packed = _model(tiny_model_dir, torch.bfloat16), _model(tiny_model_dir, torch.bfloat16)
    banks = [LoraBank(m) for m in (plain, packed)]
    for bank in banks:
        assert bank.load("a", str(adapter)) is None
    linears = list(banks[1].linears.values())
    assert prepack(linears, "auto")
    assert all("forward" in vars(lin) for lin in linears)  # each Linear runs the packed product
    ids = torch.randint(3, 100, (3, 9))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, plain(input_ids=ids).logits)
        with banks[0].rows(["a", None, "a"]):
            want = plain(input_ids=ids).logits
        with banks[1].rows(["a", None, "a"]):
            got = packed(input_ids=ids).logits
    assert torch.equal(got, want)
    assert (got[0] - packed(input_ids=ids).logits[0]).abs().max() > 1e-2  # the adapter did change row 0


def test_fp32_weights_are_not_packed_and_on_says_why(tiny_model_dir):
    model = _model(tiny_model_dir, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert not prepack(linears, "auto") and not prepack(linears, "off")
    assert not any("forward" in vars(lin) for lin in linears)
    with pytest.raises(RuntimeError, match="engine.prepack=on: only bf16 weights on a CPU are packed"):
        prepack(linears, "on")


def test_engine_answers_the_same_packed_and_unpacked(tiny_model_dir, tmp_path):
    run = fake_run(tiny_model_dir, tmp_path / "run", seed=4)
    reqs = [GenRequest(adapter="bot:v1", adapter_dir=str(run / "adapter"), base_model=tiny_model_dir,
                       messages=[{"role": "user", "content": q}], max_tokens=6) for q in ("hello", "b c a", "nails")]

    def answers(mode):
        engine = LocalEngine("cpu", "bf16", max_batch=4, batch_wait_ms=200, prepack=mode)

        async def go():
            out = await asyncio.gather(*(collect(engine.stream(r)) for r in reqs))
            await engine.close()
            return out
        out = asyncio.run(go())
        return [(c.text, c.completion_tokens) for c in out], next(iter(engine.bases.values())).packed

    (packed, was_packed), (plain, was_plain) = answers("on"), answers("off")
    assert was_packed and not was_plain
    assert packed == plain
