"""Prepacked bf16 Linear weights (deploy/prepack.py): the model computes what it computes
unpacked, forward hooks (the gathered LoRA path) still apply, and where packing cannot be done
"auto" leaves the model alone while "on" says why; with fp32_prefill, products of many rows run
in float32 and few-row ones stay bf16, and the logits agree with the unpacked model's."""

import asyncio

import pytest
import torch
from deploy_helpers import fake_run
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.deploy.multilora import LoraBank
from tuneforge.deploy import prepack as prepack_mod
from tuneforge.deploy.prepack import prepack

# oneDNN packs bf16 weights on CPUs with bf16 units (AVX512-BF16, AMX); on an AVX2-only CPU its
# packed product is missing or disagrees with F.linear, and the engine serves unpacked (tested below).
needs_packing = pytest.mark.skipif(not prepack_mod._agrees(nn.Linear(64, 32, bias=False).to(torch.bfloat16)),
                                   reason="oneDNN's packed bf16 linear is unavailable or disagrees on this CPU")


def _model(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()


@needs_packing
def test_packed_model_gives_the_same_logits_and_keeps_lora_hooks(tiny_model_dir, tmp_path):
    adapter = fake_run(tiny_model_dir, tmp_path / "run", seed=3) / "adapter"
    plain, packed = _model(tiny_model_dir, torch.bfloat16), _model(tiny_model_dir, torch.bfloat16)
    banks = [LoraBank(m) for m in (plain, packed)]
    for bank in banks:
        assert bank.load("a", str(adapter)) is None
    linears = list(banks[1].linears.values())
    assert prepack(linears, "auto", fp32_prefill="off")
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


def test_where_packing_disagrees_auto_serves_unpacked_and_on_says_why(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(prepack_mod, "_agrees", lambda lin: False)
    model = _model(tiny_model_dir, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert not prepack(linears, "auto")
    assert not any("forward" in vars(lin) for lin in linears)
    with pytest.raises(RuntimeError, match="engine.prepack=on: oneDNN's packed linear disagrees"):
        prepack(linears, "on")


@needs_packing
def test_engine_answers_the_same_packed_and_unpacked(tiny_model_dir, tmp_path):
    run = fake_run(tiny_model_dir, tmp_path / "run", seed=4)
    reqs = [GenRequest(adapter="bot:v1", adapter_dir=str(run / "adapter"), base_model=tiny_model_dir,
                       messages=[{"role": "user", "content": q}], max_tokens=6) for q in ("hello", "b c a", "nails")]

    def answers(mode):
        # fp32_prefill off: on this random tiny model a last-bit difference can flip a greedy
        # token; test_fp32_prefill_* covers that route.
        engine = LocalEngine("cpu", "bf16", max_batch=4, batch_wait_ms=200, prepack=mode, fp32_prefill="off")

        async def go():
            out = await asyncio.gather(*(collect(engine.stream(r)) for r in reqs))
            await engine.close()
            return out
        out = asyncio.run(go())
        return [(c.text, c.completion_tokens) for c in out], next(iter(engine.bases.values())).packed

    (packed, was_packed), (plain, was_plain) = answers("on"), answers("off")
    assert was_packed and not was_plain
    assert packed == plain


class _ProductDtypes(TorchDispatchMode):
    """Records the input dtype of every oneDNN linear the model runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("mkldnn::_linear_pointwise"):
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@needs_packing
def test_fp32_prefill_runs_many_row_products_in_fp32_and_agrees(tiny_model_dir):
    plain, packed = _model(tiny_model_dir, torch.bfloat16), _model(tiny_model_dir, torch.bfloat16)
    linears = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    assert prepack(linears, "on", fp32_prefill="on")
    prompt, step = torch.randint(3, 100, (3, 30)), torch.randint(3, 100, (3, 1))  # 90 rows; 3 rows
    with torch.no_grad():
        for ids, dtype in ((prompt, torch.float32), (step, torch.bfloat16)):
            with _ProductDtypes() as seen:
                got = packed(input_ids=ids).logits
            assert len(seen.seen) == len(linears) and set(seen.seen) == {dtype}
            want = plain(input_ids=ids).logits
            # bf16 outputs of the same sums, accumulated in another order: a bf16 ulp or so apart
            assert torch.allclose(got.float(), want.float(), atol=3e-2, rtol=3e-2)
