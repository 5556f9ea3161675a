"""Every method on the tiny Llama: exactly the parameters that should train change (all
others stay bit-identical, with AdamW weight decay on), what is saved reloads to the same
logits, and the QLoRA base really is 4-bit."""

import importlib.util

import pytest
import torch

from tuneforge.config import ConfigError

from tuneforge.plugins import validate_config
from tuneforge.methods import METHODS
from tuneforge.models.load import load_causal_lm, meta_module_names
from tuneforge.objectives import OBJECTIVES

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install 'tuneforge[qlora]')")

CASES = {
    "full": {},
    "freeze-top1": {"name": "freeze", "top_k": 1},
    "freeze-attn": {"name": "freeze", "modules": ["*.self_attn"]},
    "freeze-head": {"name": "freeze", "modules": ["lm_head"]},
    "hft": {"round_steps": 2},
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "lora-rs-all": {"name": "lora", "r": 4, "rslora": True},
    "dora": {"r": 4},
    "qlora": {"r": 4},
    "lora-8bit": {"name": "lora", "r": 4, "load_in_8bit": True},
    "ia3": {},
    "prompt": {"num_virtual_tokens": 4, "init_text": "extract the order"},
    "ptuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix": {"num_virtual_tokens": 4},
    "adapters": {"size": 8},
}


@pytest.fixture(scope="module")
def tiny64_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama at width 64: bitsandbytes' 4-bit CPU kernels need multiples of its 64-wide blocks."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    out = tmp_path_factory.mktemp("tiny-llama-64")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def _opts(case):
    raw = {"name": case.split("-")[0], **CASES[case]}
    return validate_config({"data": {"train": ["builtin:orders"]}, "method": raw}).method


def _load(model_dir, method, opts):
    return load_causal_lm(model_dir, method.base_dtype(opts, torch.float32), "cpu",
                          quantization_config=method.quantization_config(opts, torch.float32))


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _train_steps(model, method, steps: range, opt=None):
    """AdamW steps with weight decay on: decay must not move what does not train."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt or torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    sft, hidden = OBJECTIVES["sft"], getattr(method, "supports_hidden_path", True)
    model.train()
    for step in steps:
        method.on_step(model, step)
        loss, n = sft.loss(model, _batch(model.config.vocab_size, step), sft.options(), hidden_path=hidden)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model, vocab):
    with torch.no_grad():
        return model.eval()(input_ids=_batch(vocab, 99)["input_ids"]).logits


@pytest.mark.parametrize("case", list(CASES))
def test_only_trainable_parameters_change_and_saved_method_reloads(case, request, tmp_path):
    if case in ("qlora", "lora-8bit") and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    tiny_model_dir = request.getfixturevalue("tiny64_dir" if case in ("qlora", "lora-8bit") else "tiny_model_dir")
    torch.manual_seed(0)
    opts = _opts(case)
    method = METHODS[opts.name]
    model = method.apply(_load(tiny_model_dir, method, opts), opts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    before = _snapshot(model)
    _train_steps(model, method, range(4))
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable, (sorted(changed ^ trainable)[:5])

    method.save(model, tmp_path / "adapter")
    reloaded = method.load(_load(tiny_model_dir, method, opts), tmp_path)
    vocab = model.config.vocab_size if hasattr(model, "config") else 400
    assert torch.equal(_logits(model, vocab), _logits(reloaded, vocab))


def test_freeze_selection(tiny_model_dir):
    method = METHODS["freeze"]
    for case, expect in (("freeze-top1", lambda n: ".layers.1." in n), ("freeze-attn", lambda n: ".self_attn." in n),
                         ("freeze-head", lambda n: n == "model.embed_tokens.weight")):  # lm_head is tied here
        opts = _opts(case)
        model = method.apply(_load(tiny_model_dir, method, opts), opts)
        names = [n for n, _ in model.named_parameters()]
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in names if expect(n)}, case


def test_hft_trains_complementary_halves_and_frozen_half_stays_bit_identical(tiny_model_dir):
    from tuneforge.methods.hft import active_half

    opts = _opts("hft")  # round_steps=2
    method = METHODS["hft"]
    model = method.apply(_load(tiny_model_dir, method, opts), opts)
    groups = model.hft_state.groups
    r0, r1 = active_half(groups, 0, 0), active_half(groups, 1, 0)
    candidates = {n for by_child in groups for members in by_child.values() for n in members}
    assert r0 | r1 == candidates and not r0 & r1  # complementary halves
    assert {len(m) for g in groups for m in g.values()} == {4, 3}  # attention q/k/v/o, mlp gate/up/down
    assert abs(len(r0) - len(candidates) / 2) <= len(groups)
    assert active_half(groups, 2, 0) != r0  # a fresh split for the next pair of rounds
    start = _snapshot(model)
    opt = _train_steps(model, method, range(0, 2))  # round 0
    mid = _snapshot(model)
    assert {n for n in start if not torch.equal(start[n], mid[n])} == r0
    _train_steps(model, method, range(2, 4), opt)  # round 1: round 0's half has AdamW moments, and no grad
    end = _snapshot(model)
    assert {n for n in mid if not torch.equal(mid[n], end[n])} == r1


@needs_bnb
def test_qlora_base_is_really_4bit(tiny64_dir):
    import bitsandbytes as bnb

    opts = _opts("qlora")
    method = METHODS["qlora"]
    model = _load(tiny64_dir, method, opts)
    linears = {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    for m in linears.values():
        # Two 4-bit values per byte: packed storage is half a byte per weight.
        assert m.weight.dtype == torch.uint8 and m.weight.numel() * 2 == m.in_features * m.out_features
        assert m.weight.quant_state.quant_type == "nf4"
    dense = load_causal_lm(tiny64_dir, torch.float32, "cpu")
    block_bytes = lambda mdl: sum(p.numel() * p.element_size() for n, p in mdl.named_parameters()  # noqa: E731
                                  if ".layers." in n and "norm" not in n)
    assert block_bytes(model) * 8 == block_bytes(dense)  # fp32 (4 bytes) -> 4 bits


@needs_bnb
def test_lora_8bit_base_is_really_int8_and_stays_frozen(tiny64_dir):
    import bitsandbytes as bnb

    opts = _opts("lora-8bit")
    method = METHODS["lora"]
    model = _load(tiny64_dir, method, opts)
    linears = {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}
    assert linears and all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8
                           for m in linears.values())
    assert not isinstance(model.lm_head, bnb.nn.Linear8bitLt)  # the head stays in the compute dtype
    int8 = {n: m.weight.detach().clone() for n, m in linears.items()}
    model = method.apply(model, opts)
    _train_steps(model, method, range(2))
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight
             for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert all(torch.equal(after[n], w) for n, w in int8.items())


def test_qlora_with_load_in_8bit_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="for an 8-bit base use method lora with load_in_8bit"):
        validate_config({"data": {"train": ["builtin:orders"]}, "method": {"name": "qlora", "load_in_8bit": True}})


def test_options_of_another_method_are_named_at_config_time():
    with pytest.raises(ConfigError, match="method 'prompt' has no option 'r'; it is an option of: dora, lora, qlora"):
        validate_config({"data": {"train": ["builtin:orders"]}, "method": {"name": "prompt", "r": 8}})
    with pytest.raises(ConfigError, match="set top_k"):
        validate_config({"data": {"train": ["builtin:orders"]}, "method": {"name": "freeze"}})


@pytest.mark.parametrize("name,opts,expect", [
    ("dora", {"target_modules": ["q_prj"]}, "did you mean 'q_proj'"),
    ("ia3", {"target_modules": ["k_proj"], "feedforward_modules": ["down_prj"]}, "did you mean 'down_proj'"),
    ("freeze", {"top_k": 5}, "has 2 transformer blocks"),
    ("freeze", {"modules": ["*.attention"]}, "matches no module"),
])
def test_method_checks_against_module_names(name, opts, expect, tiny_model_dir):
    cfg = validate_config({"data": {"train": ["builtin:orders"]}, "method": {"name": name, **opts}})
    problems = METHODS[name].check(cfg.method, meta_module_names(tiny_model_dir))
    assert any(expect in p for p in problems), problems


def test_qlora_without_bitsandbytes_is_a_config_problem(monkeypatch):
    from tuneforge.methods import lora

    monkeypatch.setattr(lora.importlib.util, "find_spec", lambda name: None)
    for case, method in (("qlora", "qlora"), ("lora-8bit", "lora")):
        problems = METHODS[method].check(_opts(case), ["model.layers.0.self_attn.q_proj"])
        assert any("pip install 'tuneforge[qlora]'" in p for p in problems), case
    assert METHODS["lora"].check(_opts("lora-rs-all"), ["model.layers.0.self_attn.q_proj"]) == []  # 16-bit: no need


@needs_bnb
def test_qlora_gradients_are_right_after_an_eval_pass(tiny64_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode; training after a
    validation pass must still get the same gradients."""
    opts = _opts("qlora")
    method = METHODS["qlora"]

    def grads(eval_first):
        torch.manual_seed(0)
        model = method.apply(_load(tiny64_dir, method, opts), opts)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)  # non-zero B so every adapter gets a gradient
        if eval_first:
            _logits(model, 400)
        model.train()
        sft = OBJECTIVES["sft"]
        loss, n = sft.loss(model, _batch(400), sft.options(), hidden_path=True)
        loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)


def test_recipe_steps_hft_rounds_with_gradient_checkpointing(tiny_raw_cfg, tiny_model_dir):
    """train/run.py calls Method.on_step each step and wires gradient checkpointing."""
    from safetensors.torch import load_file

    from tuneforge.train.run import train

    raw = tiny_raw_cfg | {"method": {"name": "hft", "round_steps": 1}, "eval": {"metric": "none"}}
    raw["train"] = raw["train"] | {"max_steps": 2, "gradient_checkpointing": True, "weight_decay": 0.1}
    run_dir = train(validate_config(raw))
    trained = load_file(str(run_dir / "adapter" / "trained.safetensors"))
    base = dict(load_causal_lm(tiny_model_dir, torch.float32, "cpu").named_parameters())
    # Two rounds = both halves: every block matrix moved; norms and embeddings are not saved.
    assert trained and all(not torch.equal(t, base[n]) for n, t in trained.items())
    assert not any("norm" in n or "embed" in n for n in trained)
