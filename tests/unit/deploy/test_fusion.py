"""Fusion (learned per-layer mixing of frozen LoRA adapters): one adapter fused is that adapter;
training changes the mixing weights only; the saved folder (one folded peft LoRA) reloads with
the trained fusion's logits, generates, and holds the per-task comparison."""

import json

import torch
from safetensors.torch import load_file
from test_merge import IDS, lora_run

from tuneforge.cli import main
from tuneforge.deploy.fusion import EVAL_FILE, fuse_adapters
from tuneforge.deploy.merge import MERGE_FILE
from tuneforge.deploy.multilora import LoraBank
from tuneforge.methods import get_method
from tuneforge.methods.fusion import FusionLinear, FusionOptions
from tuneforge.models.load import load_causal_lm
from tuneforge.runs import load_run, load_run_config
from tests.unit.deploy.test_merge import one_thread  # noqa: F401 - the autouse fixture, here too


def fused(model_dir, runs):
    base = load_causal_lm(model_dir, torch.float32, "cpu")
    return get_method("fusion").apply(base, FusionOptions(runs=[str(r) for r in runs])).eval()


def test_fusion_of_one_adapter_is_that_adapter(tiny_model_dir, tmp_path):
    a, b = (lora_run(tmp_path, tiny_model_dir, seed=s, rslora=s == 2) for s in (1, 2))
    with torch.no_grad():
        one = fused(tiny_model_dir, [a])(input_ids=IDS).logits
        ref_a, ref_b = (load_run(r)[0](input_ids=IDS).logits for r in (a, b))
        assert torch.allclose(one, ref_a, atol=1e-5)
        two = fused(tiny_model_dir, [a, b])
        two.fusion_gates.fixed = torch.tensor([0.0, 1.0])  # the comparison's "adapter b alone"
        assert torch.allclose(two(input_ids=IDS).logits, ref_b, atol=1e-5)


def test_fusion_trains_only_the_mixing_weights_and_reloads(tiny_model_dir, tmp_path, capsys):
    a, b = (lora_run(tmp_path, tiny_model_dir, seed=s) for s in (1, 2))
    out = fuse_adapters([a, b], tmp_path / "fusion", [
        "train.max_steps=2", "train.batch_size=4", "train.dtype=fp32", "train.eval_every=0", "train.save_every=0",
        "eval.limit=1", "eval.batch_size=1", "eval.max_new_tokens=2"])
    cfg = load_run_config(out)
    assert cfg.method.name == "fusion" and cfg.train.lr == 5e-2
    assert json.loads((out / "summary.json").read_text())["trainable_params"] == 2 * 2  # 2 layers x 2 adapters

    # Only the gates moved: the base weights and the adapters' A/B are the inputs' own.
    model = get_method("fusion").load_fusion(load_causal_lm(tiny_model_dir, torch.float32, "cpu"), out, cfg.method)
    assert model.fusion_gates.logits.abs().min() > 0
    base = load_causal_lm(tiny_model_dir, torch.float32, "cpu").state_dict()
    for n, p in model.state_dict().items():
        if n != "fusion_gates.logits":
            assert torch.equal(p, base[n.replace(".base.", ".")]), n
    srcs = [load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (a, b)]
    for name, m in model.named_modules():
        if isinstance(m, FusionLinear):
            key = f"base_model.model.{name}.lora_A.weight"
            assert torch.equal(m.lora_A, torch.cat([s[key] for s in srcs]))

    # The saved folder is one standard peft LoRA of rank 4 + 4 with the same logits.
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    with torch.no_grad():
        assert torch.allclose(load_run(out)[0](input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)

    table = json.loads((out / EVAL_FILE).read_text())
    assert set(table["tasks"]) == {"lora1", "lora2"}
    assert all(list(per) == ["lora1", "lora2", "linear", "fusion"] for per in table["tasks"].values())
    assert json.loads((out / MERGE_FILE).read_text())["state"] == "done"
    assert "per task" in capsys.readouterr().out
    assert main(["generate", str(out), "hello", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert LoraBank(load_causal_lm(tiny_model_dir, torch.float32, "cpu")).load("f", str(out / "adapter")) is None
