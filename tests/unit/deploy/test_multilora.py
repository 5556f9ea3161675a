"""Gathered multi-LoRA batches (tuneforge/deploy/multilora.py): rows of different LoRA adapters
(ranks 2/4/8, rsLoRA, per-module rank and alpha, different target modules) and a base row in
one batch, laid out side by side or row by row, give what peft gives each adapter alone; the
engine reuses and frees adapters on load, unload and LRU eviction; adapters that are not plain
LoRA are served by peft."""

import asyncio

import pytest
import torch

from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.deploy.multilora import LoraBank

LORAS = {  # name -> LoraConfig arguments
    "r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r4": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    "r8": dict(r=8, lora_alpha=16, target_modules=["o_proj", "gate_proj", "down_proj"],
               rank_pattern={"o_proj": 3}, alpha_pattern={"down_proj": 5}),
}
PROMPTS = ["2 apples and 3 pears", "hello", "one box of nails, please", "b c a"]


def _save(tiny_model_dir, out, config, seed):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from peft import IA3Config, LoraConfig

    root = tmp_path_factory.mktemp("multilora")
    out = {name: _save(tiny_model_dir, root / name, LoraConfig(init_lora_weights=False, **kw), seed=i)
           for i, (name, kw) in enumerate(LORAS.items())}
    out["dora"] = _save(tiny_model_dir, root / "dora", LoraConfig(r=4, use_dora=True, init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj"]), seed=7)
    ia3 = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                    init_ia3_weights=False)
    out["ia3"] = _save(tiny_model_dir, root / "ia3", ia3, seed=8)
    # IA3 starts at 1.0 and init_ia3_weights=False only jitters it slightly: scale it up so
    # the adapter visibly changes the answers.
    from safetensors.torch import load_file, save_file

    path = f"{out['ia3']}/adapter_model.safetensors"
    save_file({k: v * 3 for k, v in load_file(path).items()}, path)
    return out


def _batch(tok, prompts):
    """Left-padded ids and mask, as the engine builds them."""
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(x)
    for row, p in enumerate(ids):
        x[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return x, mask


@pytest.mark.parametrize("layout", ["cat", "rows"])
def test_a_mixed_batch_equals_each_adapter_alone_through_peft(adapters, tiny_model_dir, tiny_tok, layout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = ["r2", "r4", "r8", None]  # None: the base model alone
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    bank = LoraBank(model)
    for name in LORAS:
        assert bank.load(name, adapters[name]) is None
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["r2"],
                                    adapter_name="r2").eval()
    for name in ("r4", "r8"):
        ref.load_adapter(adapters[name], adapter_name=name)

    def peft_logits(name, ids, mask):
        if name is None:
            with ref.disable_adapter():
                return ref(input_ids=ids, attention_mask=mask).logits
        ref.set_adapter(name)
        return ref(input_ids=ids, attention_mask=mask).logits

    ids, mask = _batch(tiny_tok, PROMPTS)
    with torch.no_grad():
        with bank.rows(rows, layout):
            mixed = model(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits  # the hooks are gone after the batch
        for i, name in enumerate(rows):
            want = peft_logits(name, ids, mask)[i]
            assert torch.allclose(mixed[i], want, atol=1e-4, rtol=1e-4), name
            # ...and each adapter changes the logits (else the comparison proves little).
            assert name is None or (mixed[i] - plain[i]).abs().max() > 1e-2
        assert torch.equal(plain[3], mixed[3])

        greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=tiny_tok.pad_token_id, eos_token_id=None)
        with bank.rows(rows, layout):
            out = model.generate(input_ids=ids, attention_mask=mask, **greedy)[:, ids.shape[1]:]
        for i, name in enumerate(rows):  # each row alone, unpadded, through peft
            one, one_mask = _batch(tiny_tok, [PROMPTS[i]])
            if name is None:
                with ref.disable_adapter():
                    alone = ref.generate(input_ids=one, attention_mask=one_mask, **greedy)
            else:
                ref.set_adapter(name)
                alone = ref.generate(input_ids=one, attention_mask=one_mask, **greedy)
            assert out[i].tolist() == alone[0, one.shape[1]:].tolist(), name
    assert len({tuple(r) for r in out.tolist()}) == 4


@pytest.mark.parametrize("layout", ["cat", "rows"])
def test_one_adapter_on_every_row_decodes_greedily_as_peft_alone(adapters, tiny_model_dir, tiny_tok, layout):
    """A batch whose rows all use one adapter (the side-by-side layout then has no mask and
    uses the bank's own tensors) generates, row by row, the tokens peft's ``generate`` gives
    each prompt alone: the float32 hooks add the LoRA product straight into the base output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    bank = LoraBank(model)
    assert bank.load("r4", adapters["r4"]) is None
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["r4"]).eval()
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=tiny_tok.pad_token_id, eos_token_id=None)
    ids, mask = _batch(tiny_tok, PROMPTS)
    with torch.no_grad():
        with bank.rows(["r4"] * len(PROMPTS), layout):
            out = model.generate(input_ids=ids, attention_mask=mask, **greedy)[:, ids.shape[1]:]
        base = model.generate(input_ids=ids, attention_mask=mask, **greedy)[:, ids.shape[1]:]
        for i, prompt in enumerate(PROMPTS):
            one, one_mask = _batch(tiny_tok, [prompt])
            alone = ref.generate(input_ids=one, attention_mask=one_mask, **greedy)[0, one.shape[1]:]
            assert out[i].tolist() == alone.tolist(), prompt
    assert out.tolist() != base.tolist()  # the adapter changes the answers


@pytest.mark.parametrize("layout", ["cat", "rows"])
def test_hooks_under_bf16_autocast_match_the_float32_batch(adapters, tiny_model_dir, tiny_tok, layout):
    """Under autocast (the bf16 CPU and CUDA paths) the hooks keep their float32 LoRA products
    and add them in the output's dtype: the logits agree with the float32 batch within bf16
    rounding, and the adapters still change them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    bank = LoraBank(model)
    for name in LORAS:
        assert bank.load(name, adapters[name]) is None
    rows = ["r2", "r4", "r8", None]
    ids, mask = _batch(tiny_tok, PROMPTS)
    with torch.no_grad():
        with bank.rows(rows, layout):
            fp32 = model(input_ids=ids, attention_mask=mask).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model(input_ids=ids, attention_mask=mask).logits.float()
        plain = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (bf16 - fp32)[keep].abs().max() < 0.05 * fp32[keep].abs().max()
    assert (bf16 - plain)[keep].abs().max() > 0.05 * fp32[keep].abs().max()


@pytest.mark.parametrize("layout", ["cat", "rows"])
def test_batches_after_batches_refill_the_held_copies(adapters, tiny_model_dir, tiny_tok, layout):
    """The bank keeps each layout's copies from batch to batch: a later batch of the same
    shapes with the rows in another order, and a batch of one adapter beside base rows (no
    copy at all), give each row what it got in the first batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    bank = LoraBank(model)
    for name in LORAS:
        assert bank.load(name, adapters[name]) is None
    rows, order = ["r2", "r4", "r8", None], [2, 3, 0, 1]

    def logits(names, prompts):
        ids, mask = _batch(tiny_tok, prompts)
        with torch.no_grad(), bank.rows(names, layout):
            out = model(input_ids=ids, attention_mask=mask).logits
        return [o[m.bool()] for o, m in zip(out, mask)]  # each row's own tokens (padding differs)

    first = logits(rows, PROMPTS)
    again = logits([rows[i] for i in order], [PROMPTS[i] for i in order])
    one = logits(["r4", None, "r4", None], [PROMPTS[1], PROMPTS[3], PROMPTS[0], PROMPTS[1]])
    for k, i in enumerate(order):
        assert torch.allclose(again[k], first[i], atol=1e-5), rows[i]
    assert torch.allclose(one[0], first[1], atol=1e-5) and torch.allclose(one[1], first[3], atol=1e-5)
    assert (one[3] - one[0]).abs().max() > 1e-2  # the same prompt with and without r4: the adapter counts


def test_adapters_that_are_not_plain_lora_are_left_to_peft(adapters, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    bank = LoraBank(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert bank.load("d", adapters["dora"]) == "LoRA with use_dora"
    assert bank.load("i", adapters["ia3"]) == "IA3 adapter"
    assert not bank.adapters


def _req(adapters, tiny_model_dir, name, prompt, adapter=None):
    return GenRequest(adapter=adapter or name, adapter_dir=adapters[name], base_model=tiny_model_dir,
                      messages=[{"role": "user", "content": prompt}], max_tokens=8)


async def _all(engine, reqs):
    out = await asyncio.gather(*(collect(engine.stream(r)) for r in reqs))
    await engine.close()
    return [c.text for c in out]


def test_engine_serves_lora_gathered_and_ia3_dora_through_peft(adapters, tiny_model_dir):
    names = ["r2", "r4", "r8", "ia3", "r4", "r2"]
    reqs = [_req(adapters, tiny_model_dir, n, p) for n, p in zip(names, PROMPTS * 2, strict=False)]
    # Reference: every request alone through peft (one engine per peft type: peft keeps one type per model).
    alone = asyncio.run(_all(LocalEngine("cpu", "fp32", max_batch=1, lora="peft"), reqs[:3] + reqs[4:]))
    alone.insert(3, asyncio.run(_all(LocalEngine("cpu", "fp32", max_batch=1, lora="peft"), reqs[3:4]))[0])
    engine = LocalEngine("cpu", "fp32", max_batch=8, batch_wait_ms=300)
    assert asyncio.run(_all(engine, reqs)) == alone
    assert engine.paths() == {"r2": "gathered", "r4": "gathered", "r8": "gathered", "ia3": "peft"}
    # one generate call for the five LoRA rows, one for the IA3 row
    assert sorted(engine.batches, key=len) == [["ia3"], ["r2", "r4", "r8", "r4", "r2"]]
    assert len(set(alone)) > 2

    # DoRA: peft cannot mix its rows with others' (adapter_names=), so it gets a generate call of its own.
    dora = [_req(adapters, tiny_model_dir, "dora", p) for p in PROMPTS[:2]] + [reqs[0]]
    want = asyncio.run(_all(LocalEngine("cpu", "fp32", max_batch=1, lora="peft"), dora[:2]))
    engine = LocalEngine("cpu", "fp32", max_batch=8, batch_wait_ms=300)
    got = asyncio.run(_all(engine, dora))
    assert got[:2] == want and got[2] == alone[0]
    assert engine.paths()["dora"] == "peft" and ["dora", "dora"] in engine.batches


def test_load_unload_and_eviction_free_and_reuse_adapters(adapters, tiny_model_dir):
    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1, max_adapters=2)
    ask = {n: _req(adapters, tiny_model_dir, n, "hello") for n in LORAS}

    async def scenario():
        first = {n: (await collect(engine.stream(ask[n]))).text for n in ("r2", "r4")}
        bank = engine.bases[tiny_model_dir].bank
        assert set(bank.adapters) == {"r2", "r4"}
        third = (await collect(engine.stream(ask["r8"]))).text  # evicts r2 (least recently used)
        assert engine.evicted == ["r2"] and set(bank.adapters) == {"r4", "r8"}
        assert await engine.unload("r4") and set(bank.adapters) == {"r8"}
        # r2 reloaded after its eviction, in a batch with r8; then r4's folder under a new name
        # (evicting r2 again): each answers with its own weights
        again = await asyncio.gather(collect(engine.stream(ask["r2"])), collect(engine.stream(ask["r8"])))
        swapped = (await collect(engine.stream(_req(adapters, tiny_model_dir, "r4", "hello", adapter="r8b")))).text
        await engine.close()
        return first, third, [c.text for c in again], swapped

    first, third, again, swapped = asyncio.run(scenario())
    assert again == [first["r2"], third] and swapped == first["r4"]
    assert len({first["r2"], first["r4"], third}) == 3
    assert engine.evicted == ["r2", "r2"] and engine.resident() == ["r8", "r8b"]
    assert set(engine.bases[tiny_model_dir].bank.adapters) == {"r8", "r8b"}
