"""Export (merged) folds LoRA/DoRA/IA3 (and full/freeze/hft trivially) into a plain model whose
logits match base + adapter (merge-adapters: test_merge.py)."""


import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GenerationConfig

from tuneforge.config import to_yaml

from tuneforge.plugins import validate_config
from tuneforge.deploy.export import export
from tuneforge.methods import METHODS
from tuneforge.models.load import load_causal_lm

IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 41, 7]])


def fake_run(root, model_dir, method_raw, seed=0):
    """A finished run folder whose trained parameters are random (so folding is not trivial)."""
    cfg = validate_config({"model": {"name": model_dir}, "data": {"train": ["builtin:orders"]}, "method": method_raw})
    method = METHODS[cfg.method.name]
    model = method.apply(load_causal_lm(model_dir, method.base_dtype(cfg.method, torch.float32), "cpu"), cfg.method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    run = root / f"{method_raw['name']}-{seed}"
    method.save(model, run / "adapter")
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def tuned_logits(run, model_dir):
    cfg = validate_config(yaml.safe_load((run / "config.yaml").read_text()))
    method = METHODS[cfg.method.name]
    model = method.load(load_causal_lm(model_dir, torch.float32, "cpu"), run).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("raw", [{"name": "lora", "r": 4}, {"name": "dora", "r": 4}, {"name": "ia3"},
                                 {"name": "full"}, {"name": "freeze", "top_k": 1}, {"name": "hft"}])
def test_merged_export_matches_base_plus_adapter(raw, tiny_model_dir, tiny_tok, tmp_path):
    run = fake_run(tmp_path, tiny_model_dir, raw)
    out = export(run, "merged", tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n or "ia3" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        merged = plain(input_ids=IDS).logits
    ref = tuned_logits(run, tiny_model_dir)
    assert torch.allclose(merged, ref, atol=1e-4), (merged - ref).abs().max()
    base = load_causal_lm(tiny_model_dir, torch.float32, "cpu").eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=IDS).logits, ref, atol=1e-3)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tiny_tok.eos_token_id
    assert (out / "tokenizer.json").exists()


def test_methods_that_cannot_fold_say_so(tiny_model_dir, tmp_path):
    run = fake_run(tmp_path, tiny_model_dir, {"name": "prompt", "num_virtual_tokens": 2})
    with pytest.raises(ValueError, match="cannot be folded"):
        export(run, "merged", tmp_path / "export")
