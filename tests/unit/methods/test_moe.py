"""Mixture-of-experts fine-tuning on tiny MoE models built from config (Mixtral, Qwen2-MoE,
OLMoE: hidden 32, 2 layers, 4 experts, top-2): detection, config refusals, which weights
train, the router's aux loss, utilisation stats, adapter reload, plan counts, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tuneforge.config import ConfigError

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=True)


def moe_config(family: str, tok=None):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    ids = {} if tok is None else dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    ids = {"vocab_size": 400, **ids}
    if family == "mixtral":
        return MixtralConfig(**SMALL, **ids, num_local_experts=4, num_experts_per_tok=2)
    if family == "olmoe":
        return OlmoeConfig(**SMALL, **ids, num_experts=4, num_experts_per_tok=2)
    return Qwen2MoeConfig(**SMALL, **ids, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=32)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Mixtral with the tiny Llama's tokenizer, saved like a hub folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("tiny-mixtral")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(moe_config("mixtral", tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def lora_opts(**moe):
    from tuneforge.plugins import validate_config

    return validate_config({"data": {"train": ["x"]}, "method": {"name": "lora", "r": 4, "alpha": 8, "moe": moe}}).method


def base(family="mixtral", seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(moe_config(family)).eval()


# --- detection and counts -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_describe_finds_router_experts_and_active_params(family):
    from tuneforge.models.moe import describe

    model = base(family)
    info = describe(model)
    assert info.num_experts == 4 and info.top_k == 2 and info.layers == [0, 1]
    assert info.router_suffix == "mlp.gate" and info.experts_suffix == "mlp.experts"
    assert info.expert_params == ["gate_up_proj", "down_proj"]
    assert info.attention_linears == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert bool(info.shared_expert_linears) == (family == "qwen2_moe")
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert info.total_params == sum(p.numel() for p in model.parameters())
    assert info.routed_expert_params == routed
    assert info.active_params == info.total_params - routed // 2  # top-2 of 4: half the routed experts idle
    # A dense model is not a mixture of experts.
    from transformers import LlamaConfig, LlamaForCausalLM

    assert describe(LlamaForCausalLM(LlamaConfig(vocab_size=64, **SMALL))) is None


# --- config: what is refused, with the reason ----------------------------------------------


def test_config_refusals_name_the_reason():
    from tuneforge.plugins import validate_config

    def problems(method):
        with pytest.raises(ConfigError) as e:
            validate_config({"data": {"train": ["x"]}, "method": method})
        return str(e.value)

    assert "not both" in problems({"name": "lora", "moe": {"experts": [0], "top_k_experts": 2}})
    assert "needs LoRA on them" in problems({"name": "lora", "moe": {"lora_on": "attention", "experts": [1]}})
    assert "cannot apply dropout" in problems({"name": "lora", "dropout": 0.1, "moe": {"lora_on": "experts"}})
    assert "remove method.target_modules" in problems({"name": "lora", "target_modules": ["q_proj"], "moe": {}})
    assert "only method lora" in problems({"name": "dora", "moe": {}})
    assert "distinct" in problems({"name": "lora", "moe": {"experts": [1, 1]}})
    # No dropout given: LoRA on experts gets 0 (peft cannot apply one there); attention only keeps the default.
    assert lora_opts(lora_on="experts").dropout == 0.0
    assert lora_opts(lora_on="attention").dropout == 0.05


def test_preflight_refuses_what_the_model_cannot_give(tiny_moe_dir, tiny_model_dir):
    from tuneforge.plugins import validate_config
    from tuneforge.train.moe_stats import moe_preflight

    def cfg(model, method, objective="sft"):
        return validate_config({"model": {"name": model}, "data": {"train": ["x"]}, "method": method,
                                "objective": {"name": objective}})

    assert moe_preflight(cfg(tiny_moe_dir, {"name": "lora", "moe": {"experts": [0, 3]}})) == []
    out = moe_preflight(cfg(tiny_moe_dir, {"name": "lora", "moe": {"experts": [4]}}))
    assert any("experts 0..3" in p for p in out)
    out = moe_preflight(cfg(tiny_moe_dir, {"name": "lora", "moe": {"top_k_experts": 5}}))
    assert any("has 4 experts" in p for p in out)
    out = moe_preflight(cfg(tiny_moe_dir, {"name": "lora"}))  # all-linear: peft would widen it to the experts
    assert any("all-linear on a mixture-of-experts" in p for p in out)
    assert moe_preflight(cfg(tiny_moe_dir, {"name": "lora", "target_modules": ["q_proj", "v_proj"]})) == []
    out = moe_preflight(cfg(tiny_moe_dir, {"name": "lora", "moe": {}}, objective="dpo"))
    assert any("token-loss recipe" in p for p in out)
    fsdp = cfg(tiny_moe_dir, {"name": "lora", "moe": {}}).model_copy(
        update={"train": cfg(tiny_moe_dir, {"name": "lora"}).train.model_copy(update={"distributed": "fsdp"})})
    assert any("train.distributed=ddp" in p for p in moe_preflight(fsdp))
    out = moe_preflight(cfg(tiny_model_dir, {"name": "lora", "moe": {}}))
    assert any("not a mixture-of-experts" in p for p in out)


# --- which weights train ---------------------------------------------------------------------


def effective_experts(model) -> dict[str, torch.Tensor]:
    """Every fused expert weight with its LoRA update folded in, [E, out, in] per parameter."""
    from tuneforge.methods.moe import expert_lora_layers

    out = {}
    for layer_idx, layer in expert_lora_layers(model):
        w = layer.get_param().detach().clone()
        out[f"{layer_idx}.{layer.parameter_name}"] = w + layer.get_delta_weight("default").detach()
    return out


def router_weights(model) -> list[torch.Tensor]:
    from tuneforge.models.moe import describe, router_modules

    return [m.weight.detach().clone() for _, m in router_modules(model, describe(model))]


def train_steps(model, steps=3, lr=5e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 400, (2, 24), generator=g)
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_only_chosen_experts_change_and_frozen_router_stays(family):
    from tuneforge.methods import get_method

    model = get_method("lora").apply(base(family), lora_opts(lora_on="experts", experts=[1, 3]))
    before, routers = effective_experts(model), router_weights(model)
    assert len(before) == 4  # 2 layers x (gate_up_proj, down_proj)
    train_steps(model)
    after = effective_experts(model)
    for key in before:
        moved = (after[key] - before[key]).flatten(1).abs().amax(1)  # per expert
        assert moved[1] > 0 and moved[3] > 0, key
        assert moved[0] == 0 and moved[2] == 0, key  # exactly the base weights
    assert all(torch.equal(a, b) for a, b in zip(routers, router_weights(model)))


def test_router_trained_when_asked_and_attention_only_leaves_experts():
    from tuneforge.methods import get_method

    model = get_method("lora").apply(base(), lora_opts(lora_on="attention", router="trained"))
    assert not effective_experts(model)  # no LoRA on the experts
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    routers = router_weights(model)
    train_steps(model)
    assert all(not torch.equal(a, b) for a, b in zip(routers, router_weights(model)))
    assert all(torch.equal(p, experts_before[n]) for n, p in model.named_parameters() if ".experts." in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in n for n in trainable) and any("mlp.gate.modules_to_save" in n for n in trainable)


def test_saved_adapter_reloads_with_identical_logits(tmp_path):
    from tuneforge.methods import get_method

    method = get_method("lora")
    model = method.apply(base(), lora_opts(lora_on="both", router="trained", experts=[0, 2]))
    train_steps(model)
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    method.save(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert cfg["modules_to_save"] == ["mlp.gate"]
    reloaded = method.load(base(), tmp_path).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, want)
    with torch.no_grad():  # and the adapter did change the model
        assert not torch.allclose(base()(input_ids=ids).logits, want)


# --- aux loss and utilisation ----------------------------------------------------------------


def test_aux_loss_is_transformers_and_enters_the_training_loss():
    from tuneforge.models.moe import describe
    from tuneforge.objectives import OBJECTIVES
    from tuneforge.train.moe_stats import MoEMonitor

    model = base()
    info = describe(model)
    monitor = MoEMonitor(model, info, lora_opts(aux_loss_coef=0.5).moe, None, console=None)
    sft = OBJECTIVES["sft"]
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model.train()
    with torch.no_grad():
        plain, n = sft.loss(model, batch, sft.options(), hidden_path=True)
        with_aux, n2 = monitor.wrap(sft).loss(model, batch, sft.options(), hidden_path=True)
        ref = model(input_ids=ids, attention_mask=batch["attention_mask"], output_router_logits=True).aux_loss
    assert n == n2
    assert torch.allclose(with_aux, plain + 0.5 * ref * n, rtol=1e-5)
    metrics = monitor.window_metrics()
    assert metrics["aux_loss"] == pytest.approx(float(ref), rel=1e-5)
    assert metrics["aux_weighted"] == pytest.approx(0.5 * float(ref), rel=1e-5)
    # Every real token is routed to top-2 experts in each layer.
    assert all(sum(s["tokens"]) == 2 * 40 for s in monitor.pending.values())
    model.eval()  # validation: the plain token loss
    with torch.no_grad():
        val, _ = monitor.wrap(sft).loss(model, batch, sft.options(), hidden_path=True)
    assert torch.equal(val, plain)


def test_collapsed_router_warns_in_log_and_summary(tmp_path):
    from rich.console import Console

    from tuneforge.models.moe import describe
    from tuneforge.train.moe_stats import PLOT_FILE, STATS_FILE, MoEMonitor, balance

    assert balance(torch.tensor([10, 10, 10, 10]), 2) == pytest.approx(1.0)
    assert balance(torch.tensor([50, 50, 0, 0]), 2) == 0.0  # the same two experts take every token
    console = Console(record=True, width=200)
    model = base()
    monitor = MoEMonitor(model, describe(model), lora_opts().moe, tmp_path, console)
    monitor.start(0)
    for step, counts in enumerate(([30, 25, 25, 20], [60, 58, 1, 1]), start=1):
        for layer in (0, 1):
            monitor.counts[layer] = torch.tensor(counts)
        monitor.window_metrics()
        monitor.logged({"step": step}, console)
    rows = [json.loads(x) for x in (tmp_path / STATS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["layers"]["0"]["tokens"] == [30, 25, 25, 20]
    log = console.export_text()
    assert "router collapse in layer 0 at step 2" in log and "step 1" not in log
    summary = monitor.finish()
    assert summary["collapsed_layers"] == [0, 1] and "router collapse" in summary["warning"]
    assert (tmp_path / PLOT_FILE).stat().st_size > 0


# --- plan -----------------------------------------------------------------------------------


def test_plan_reports_total_and_active_params(tiny_moe_dir):
    from tuneforge.plan import plan
    from tuneforge.plugins import validate_config

    cfg = validate_config({"model": {"name": tiny_moe_dir}, "data": {"train": ["x"], "max_length": 32},
                           "method": {"name": "lora", "r": 4, "moe": {"lora_on": "experts"}},
                           "train": {"batch_size": 1, "dtype": "fp32"}})
    p = plan(cfg, device="cpu", probe=False)
    moe = p["moe"]
    assert moe["experts"] == 4 and moe["top_k"] == 2
    assert moe["active_params"] == moe["total_params"] - moe["routed_expert_params"] // 2
    assert "qlora" not in p["rows"] and "lora" in p["rows"]  # lora row through method.moe
    assert p["rows"]["lora (config)"].trainable > 0


# --- the CLI, end to end ----------------------------------------------------------------------


def test_cli_train_on_tiny_moe(tiny_moe_dir, tmp_path, capsys, monkeypatch):
    from tuneforge.cli import main

    cfg = {"model": {"name": tiny_moe_dir},
           "data": {"train": ["builtin:orders?n=40&seed=3"], "max_length": 160, "val_size": 0.1, "test_size": 0.1},
           "method": {"name": "lora", "r": 4, "alpha": 8,
                      "moe": {"lora_on": "both", "top_k_experts": 2, "calibration_batches": 2, "aux_loss_coef": 0.05}},
           "train": {"lr": 5e-3, "max_steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 0, "dtype": "fp32"},
           "eval": {"metric": "none"}, "output_dir": str(tmp_path / "runs"), "run_name": "moe"}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "off")
    assert main(["train", str(path), "--force"]) == 0, capsys.readouterr().err
    run = tmp_path / "runs" / "moe"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 and all(r["aux_loss"] > 0 and "router_balance_min" in r for r in train)
    # The logged loss is the token loss plus the weighted aux loss, and the aux part is shown apart.
    assert all(r["aux_weighted"] == pytest.approx(0.05 * r["aux_loss"], abs=1e-5) for r in train)
    stats = [json.loads(x) for x in (run / "moe_stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2] and set(stats[0]["layers"]) == {"0", "1"}
    assert (run / "moe_utilisation.png").exists()
    chosen = json.loads((run / "moe_experts.json").read_text())
    assert chosen["by"] == "top_k" and all(len(v) == 2 for v in chosen["trained_experts"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["moe"]["experts"] == 4 and summary["moe"]["aux_loss_coef"] == 0.05
    assert summary["moe"]["active_params"] < summary["moe"]["total_params"]


def test_moe_example_validates():
    from pathlib import Path

    from tuneforge.plugins import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "examples" / "moe.yaml")
    assert cfg.method.moe.lora_on == "both" and cfg.method.moe.top_k_experts == 8 and cfg.method.dropout == 0.0


def test_trained_router_keeps_fp32_master_weights_on_a_bf16_base():
    from tuneforge.methods import get_method

    model = get_method("lora").apply(base().to(torch.bfloat16), lora_opts(router="trained"))
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(d == torch.float32 for d in trained.values())
    assert any("mlp.gate.modules_to_save" in n for n in trained)


def test_shared_expert_adapted_with_all_experts_not_with_a_choice():
    from tuneforge.methods import get_method

    def adapted(**moe):
        model = get_method("lora").apply(base("qwen2_moe"), lora_opts(**moe))
        return {n.split(".layers.0.")[1].split(".lora_")[0] for n, p in model.named_parameters()
                if p.requires_grad and ".layers.0." in n}

    assert {"mlp.shared_expert.gate_proj", "mlp.experts", "self_attn.q_proj"} <= adapted(lora_on="both")
    assert not any("shared_expert" in n for n in adapted(lora_on="both", experts=[0]))


def test_resumed_run_drops_stats_rows_after_its_checkpoint(tmp_path):
    from rich.console import Console

    from tuneforge.models.moe import describe
    from tuneforge.train.moe_stats import STATS_FILE, MoEMonitor

    model = base()
    monitor = MoEMonitor(model, describe(model), None, tmp_path, Console(quiet=True))
    assert monitor.coef == 0.0  # no method.moe: utilisation only, no aux loss
    (tmp_path / STATS_FILE).write_text("".join(json.dumps({"step": s, "layers": {}}) + "\n" for s in (1, 2, 3, 4)))
    monitor.start(2)
    assert [json.loads(x)["step"] for x in (tmp_path / STATS_FILE).read_text().splitlines()] == [1, 2]
    monitor.start(0)  # a fresh run starts an empty file
    assert (tmp_path / STATS_FILE).read_text() == ""


def test_server_runs_an_expert_adapter_alone_not_in_a_mixed_batch():
    """peft's LoRA on fused expert weights refuses adapter_names= batches: the engine must not
    put such an adapter in one."""
    from types import SimpleNamespace

    from peft import LoraConfig

    from tuneforge.deploy.engines import _by_path

    configs = {"moe": LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
               "plain": LoraConfig(target_modules=["q_proj"]), "plain2": LoraConfig(target_modules=["v_proj"])}
    base = SimpleNamespace(paths={a: "peft" for a in configs}, peft=SimpleNamespace(peft_config=configs))
    jobs = [SimpleNamespace(req=SimpleNamespace(adapter=a, adapter_dir="x")) for a in ("moe", "plain", "plain2")]
    assert _by_path(base, jobs) == {"peft-one:moe": [0], "peft-mixed": [1, 2]}
