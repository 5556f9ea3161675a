"""Exports of a trained tiny run: the merged folder is the same model as base + adapter, the
GGUF files read back through transformers' own GGUF loader, int8 reloads exactly, the pruned
folder is a smaller plain model with its table, and every folder carries a model card."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.plugins import validate_config
from tuneforge.deploy.export import export
from tuneforge.deploy.prune import PruneError, PruneOptions
from tuneforge.runs import load_for_inference
from tuneforge.train.run import train


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    raw = {"model": {"name": tiny_model_dir},
           "data": {"train": ["builtin:orders?n=60&seed=3"], "max_length": 160, "val_size": 0.1, "test_size": 0.1},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"lr": 2e-2, "max_steps": 4, "batch_size": 4, "eval_every": 0, "save_every": 0, "seed": 7,
                     "dtype": "fp32"},
           "eval": {"max_new_tokens": 4, "limit": 2, "batch_size": 2},
           "output_dir": str(tmp_path_factory.mktemp("runs")), "run_name": "tiny"}
    return train(validate_config(raw))


IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 41, 7]])


@pytest.fixture(scope="module")
def tuned(run_dir):
    model, tok, *_ = load_for_inference(str(run_dir), device="cpu", dtype="fp32")
    return model, tok


def test_merged_export_is_the_same_model_as_base_plus_adapter(run_dir, tuned, tiny_model_dir):
    model, tok = tuned
    out = export(run_dir, "merged")
    assert out == run_dir / "export" / "merged"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    with torch.no_grad():
        a, b = model(input_ids=IDS).logits, merged(input_ids=IDS).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=IDS).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-3)  # the adapter did change the model
    prompt = tok.apply_chat_template([{"role": "user", "content": "2 apples"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    ga = model.generate(**prompt, eos_token_id=tok.eos_token_id, **kw)
    gb = merged.generate(**prompt, **kw)  # eos from the exported generation config
    assert ga.tolist() == gb.tolist()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert merged.generation_config.eos_token_id == reloaded_tok.convert_tokens_to_ids("<|im_end|>")
    assert reloaded_tok.chat_template
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "merged" and m["source_run"] == str(run_dir.resolve())
    assert len(m["adapter_sha256"]) == 64 and len(m["base_model_sha256"]) == 64
    assert m["eval_scores"]["tuned"] and m["files"]["model.safetensors"] > 0


def test_gguf_export_reads_back_with_transformers(run_dir, tuned):
    model, tok = tuned
    out = export(run_dir, "gguf", run_dir / "gguf-out")
    merged_logits = model(input_ids=IDS).logits.detach()
    for q, tol in (("f16", 2e-2), ("q8_0", 1e-1)):
        name = f"model-{q}.gguf"
        g = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = g(input_ids=IDS).logits
        err = (logits - merged_logits).abs().max().item()
        assert err < tol, (q, err)
        assert torch.equal(logits.argmax(-1), merged_logits.argmax(-1)), q
    # The tokenizer inside the GGUF file encodes chat prompts exactly like the original.
    gtok = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    msgs = [{"role": "user", "content": "3 pears and 2 apples, please!"}]
    assert (gtok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert gtok(text, add_special_tokens=True).input_ids == tok(text, add_special_tokens=True).input_ids
    assert gtok.eos_token == "<|im_end|>"
    sizes = json.loads((out / "manifest.json").read_text())["files"]
    assert sizes["model-q8_0.gguf"] < sizes["model-f16.gguf"]


def test_int8_export_reloads_exactly_and_reports_speed_and_quality(run_dir, tuned):
    from tuneforge.deploy.int8 import load_int8, quantize
    from tuneforge.runs import load_run

    model, tok = tuned
    out = export(run_dir, "int8")
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())  # nothing pickled
    loaded = load_int8(out)
    ref = quantize(load_run(run_dir, merge=True)[0])
    with torch.no_grad():
        a, b, f = loaded(input_ids=IDS).logits, ref(input_ids=IDS).logits, model(input_ids=IDS).logits
    assert torch.equal(a, b)  # the stored int8 weights are exactly the quantised ones
    assert (a - f).abs().max() < 0.2 * f.abs().max()
    report = json.loads((out / "manifest.json").read_text())["vs_bf16"]
    assert set(report["tokens_per_s"]) == {"bf16", "int8"} and 0 <= report["next_token_agreement"] <= 1


def test_export_and_merge_never_replace_a_folder_tuneforge_did_not_make(run_dir, tmp_path, capsys):
    from tuneforge.cli import main
    from tuneforge.io import OutputRefused

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(OutputRefused, match="holds files tuneforge did not write"):
        export(run_dir, "merged", foreign)
    for out, word in ((run_dir, "contains"), (run_dir / "adapter", "is"), (run_dir.parent, "contains")):
        with pytest.raises(OutputRefused, match=f"{word} the input"):
            export(run_dir, "merged", out)
    assert main(["merge-adapters", str(run_dir), str(run_dir), "--out", str(foreign)]) == 2
    assert "holds files tuneforge did not write" in capsys.readouterr().err
    assert main(["merge-adapters", str(run_dir), str(run_dir), "--out", str(run_dir / "merged")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (run_dir / "adapter").is_dir()
    assert main(["export", str(run_dir), "--format", "merged", "--out", str(foreign)]) == 2
    assert "holds files tuneforge did not write" in capsys.readouterr().err


def test_every_export_carries_a_model_card_and_a_users_readme_survives_a_new_export(run_dir):
    out = export(run_dir, "merged", run_dir / "export" / "carded")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    assert card.data.base_model == json.loads((out / "manifest.json").read_text())["base_model"]
    assert f"tuneforge export {run_dir.resolve()} --format merged --out {out.resolve()}" in card.text
    (out / "README.md").write_text("# notes the user wrote\n")
    export(run_dir, "merged", run_dir / "export" / "carded")  # replaces the export it wrote, keeps the user's card
    assert (out / "README.md").read_text() == "# notes the user wrote\n"


def test_pruned_export_with_recovery_writes_a_smaller_model_its_table_and_card(run_dir):
    with pytest.raises(PruneError, match="options of --format pruned"):
        export(run_dir, "merged", prune=PruneOptions(0.5))
    out = export(run_dir, "pruned", prune=PruneOptions(0.5, ("mlp", "heads"), recover_steps=2, calibration_rows=4))
    m = json.loads((out / "manifest.json").read_text())
    p = m["pruning"]
    assert [r["model"] for r in p["table"]] == ["dense", "pruned", "pruned+recovered"]
    assert p["model"] == "pruned+recovered"  # what the folder holds
    dense, pruned, recovered = p["table"]
    assert pruned["parameters"] == recovered["parameters"] < dense["parameters"]
    assert pruned["size_bytes"] < dense["size_bytes"]
    assert dense["metric"] == pruned["metric"] == "json_exact" and recovered["score"] is not None
    assert p["recovery"]["steps"] == 2 and p["recovery"]["last_loss"] is not None and p["metric_rows"] == 2
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (small.config.intermediate_size, small.config.num_key_value_heads) == (32, 1)
    assert sum(x.numel() for x in small.parameters()) == recovered["parameters"]
    assert not list(out.parent.glob(".prune-*"))  # the scratch folder is gone
    card = ModelCard.load(out / "README.md")
    assert "pruned" in card.data.tags and card.data.library_name == "transformers"
    assert "| pruned+recovered |" in card.text and "--sparsity 0.5 --structured mlp,heads --recover 2" in card.text
    assert card.data.eval_results[0].metric_value == recovered["score"]  # the pruned model's, not the run's
