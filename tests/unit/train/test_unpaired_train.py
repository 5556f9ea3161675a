"""KTO on unpaired rows with the tiny Llama: rendering (labels on the completion only), the
mismatched rows of the KL estimate, a few steps that move desirable completions up and
undesirable ones down against the reference, and a run folder."""

import json

import pytest
import torch

from tuneforge.data.load import DataError
from tuneforge.data.prepare import build_splits
from tuneforge.data.render import IGNORE
from tuneforge.methods import METHODS
from tuneforge.models.load import load_causal_lm
from tuneforge.plugins import validate_config
from tuneforge.train.recipes.pairs import encode_pairs
from tuneforge.train.recipes.scoring import Reference
from tuneforge.train.recipes.unpaired import (
    encode_unpaired,
    evaluate_unpaired,
    score_batch,
    unpaired_batch,
    unpaired_batches,
    unpaired_step,
)
from tuneforge.train.run import train

ROWS = [{"prompt": [{"role": "user", "content": f"order {i} coffee mugs"}],
         "completion": [{"role": "assistant", "content": '{"quantity": %d}' % i if good else f"you want {i} mugs"}],
         "label": good} for i in range(1, 5) for good in (True, False)]
KTO = validate_config({"data": {"train": ["x"]}, "objective": {"name": "kto", "beta": 0.5}}).objective


@pytest.fixture
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    opts = validate_config({"data": {"train": ["x"]}, "method": {"name": "lora", "r": 4, "dropout": 0.0}}).method
    return METHODS["lora"].apply(load_causal_lm(tiny_model_dir, torch.float32, "cpu"), opts)


def test_labels_only_on_the_completion_and_mismatched_rows_for_the_kl(tiny_tok):
    rows = [{**ROWS[0], "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                   *ROWS[0]["prompt"]]}, ROWS[1], ROWS[2]]
    enc, dropped = encode_unpaired(tiny_tok, rows, 128, None)
    assert not dropped and [e["label"] for e in enc] == [True, False, True]
    b = unpaired_batch(enc, tiny_tok.pad_token_id, 128)
    n = int(b["attention_mask"][0].sum())
    trained = [int(x) for x in b["labels"][0, :n] if x != IGNORE]
    # The earlier assistant turn ("hello") is context: only the completion and its eos train.
    assert tiny_tok.decode(trained) == '{"quantity": 1}<|im_end|>'
    assert b["input_ids"][0, :n].tolist() == enc[0]["prompt_ids"] + enc[0]["completion_ids"]
    for i, j in ((0, 1), (1, 2), (2, 0)):  # completion i after prompt i+1 mod B
        m = int(b["kl_attention_mask"][i].sum())
        assert b["kl_input_ids"][i, :m].tolist() == enc[j]["prompt_ids"] + enc[i]["completion_ids"]
        assert [x for x in b["kl_labels"][i, :m].tolist() if x != IGNORE] == \
            [x for x in enc[i]["completion_labels"] if x != IGNORE]
    assert b["label"].tolist() == [True, False, True]


def test_a_few_steps_raise_desirable_and_lower_undesirable_against_the_reference(lora_model, tiny_tok):
    enc, _ = encode_unpaired(tiny_tok, ROWS, 128, None)
    batch = unpaired_batches(enc, len(enc), tiny_tok.pad_token_id, 128, 0, 0, shuffle=False)[0]
    reference = Reference(lora_model)
    frozen = {n: p.detach().clone() for n, p in lora_model.named_parameters() if not p.requires_grad}
    lora_model.eval()
    assert evaluate_unpaired(lora_model, reference, KTO, [batch], "cpu")["accuracy"] == 0  # r = z = 0 at the start
    opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(8):
        loss, metrics = unpaired_step(lora_model, reference, KTO, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(metrics) == {"kl", "accuracy"}
    with torch.no_grad():
        _, r, z = score_batch(lora_model, reference, KTO, batch)
    good = batch["label"]
    assert (r[good] > 0).all() and (r[~good] < 0).all(), r  # log π/π_ref up for desirable, down for undesirable
    m = evaluate_unpaired(lora_model, reference, KTO, [batch], "cpu")
    assert m["accuracy"] > 0.5 and m["reward_desirable"] > 0 > m["reward_undesirable"]
    assert m["kl"] == pytest.approx(float(z), abs=1e-5) and m["kl"] >= 0
    assert all(torch.equal(p, frozen[n]) for n, p in lora_model.named_parameters() if n in frozen)


def test_rows_of_another_kind_under_kto_are_refused(tiny_raw_cfg):
    cfg = validate_config(tiny_raw_cfg | {"objective": {"name": "kto"}})  # builtin:orders: chat rows
    with pytest.raises(DataError, match="holds sft rows .*trains on unpaired rows"):
        build_splits(cfg.data, 0, "unpaired")


def test_kto_run_writes_a_run_folder_and_moves_held_out_rows_to_their_side(tiny_raw_cfg):
    # The loader splits each preference pair into a desirable and an undesirable row for kto.
    raw = tiny_raw_cfg | {"objective": {"name": "kto", "beta": 1.0}, "run_name": "kto", "eval": {"batch_size": 8}}
    raw["data"] = raw["data"] | {"train": ["builtin:orders_preference?n=100&seed=3"], "max_length": 200,
                                 "val_size": 0.1, "test_size": 0.2}
    raw["train"] = raw["train"] | {"lr": 1e-2, "max_steps": 8, "eval_every": 4, "save_every": 0, "batch_size": 8}
    run_dir = train(validate_config(raw))
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["base"]["accuracy"] == 0 and ev["base"]["kl"] == 0  # policy == reference before training
    assert ev["tuned"]["accuracy"] > 0.6, ev  # 0.675 measured (tiny model, fp32 CPU)
    assert ev["tuned"]["reward_desirable"] > ev["tuned"]["reward_undesirable"]
    assert set(ev["measured"]) >= {"reward", "kl", "accuracy"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objective"] == "kto" and summary["steps"] == 8
    assert summary["labels_train"]["n_desirable"] == summary["labels_train"]["n_undesirable"]  # pairs split in two
    assert summary["labels_train"]["advice"] is None
    assert (run_dir / "adapter/adapter_model.safetensors").exists() and (run_dir / "loss.png").exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
    assert all({"kl", "accuracy"} <= set(r) for r in rows if r["kind"] == "train")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and all({"kl", "accuracy", "reward_desirable", "reward_undesirable"} <= set(r) for r in evals)


def test_rows_with_tools_render_them_in_the_prompt_and_train_the_call(tiny_tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {}}}]}
    prompt = [{"role": "user", "content": "weather?"}]
    unpaired, _ = encode_unpaired(tiny_tok, [{"prompt": prompt, "completion": [call], "label": True, "tools": tools}],
                                  512, None)
    assert "<tools>" in tiny_tok.decode(unpaired[0]["prompt_ids"])
    trained = [t for t in unpaired[0]["completion_labels"] if t != IGNORE]
    assert "<tool_call>" in tiny_tok.decode(trained)
    pairs, _ = encode_pairs(tiny_tok, [{"prompt": prompt, "chosen": [call], "tools": tools,
                                        "rejected": [{"role": "assistant", "content": "no idea"}]}], 512, None)
    for side in ("chosen", "rejected"):
        assert "<tools>" in tiny_tok.decode(pairs[0][side]["input_ids"])
    assert "<tool_call>" in tiny_tok.decode([t for t in pairs[0]["chosen"]["labels"] if t != IGNORE])
