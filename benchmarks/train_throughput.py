"""LoRA SFT throughput: tuneforge vs trl SFTTrainer + peft vs transformers Trainer + peft.

Same model, same rows (one epoch over steps x batch rows, so every runner trains exactly
the same tokens), same LoRA (r=8, all linear layers), batch, max length, lr. Each runner
runs in its own process so peak RSS is its own. Prints real (non-padding) tokens/s,
ratios against each peer, peak RSS and final loss.

    python benchmarks/train_throughput.py --steps 20 --batch 4 --max-length 256

``--model`` takes any model spec tuneforge accepts (default: the embedded SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

RUNNERS = ("tuneforge", "trainer", "sft_trainer")


def rows(n: int):
    from tuneforge.data.builtin import orders
    from tuneforge.data.formats import FORMATS

    return [FORMATS["instruction"].convert(r, {}) for r in orders(n=n, seed=11)]


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tuneforge(a) -> dict:
    import tempfile

    from tuneforge.config import validate_config
    from tuneforge.train.run import train

    n = a.steps * a.batch
    with tempfile.TemporaryDirectory() as out:
        cfg = validate_config({
            "model": {"name": a.model},
            "data": {"train": [f"builtin:orders?n={n}&seed=11"], "val_size": 0.0, "test_size": 0.0,
                     "max_length": a.max_length},
            "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"lr": 2e-4, "batch_size": a.batch, "epochs": 1, "eval_every": 0, "save_every": 0,
                      "scheduler": "constant", "warmup_ratio": 0.0},
            "eval": {"metric": "none"}, "output_dir": out, "run_name": "bench"})
        run_dir = train(cfg)
        summary = json.loads((run_dir / "summary.json").read_text())
        losses = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [m["loss"] for m in losses if m["kind"] == "train"][-1]
    return {"seconds": summary["train_seconds"], "final_loss": last}


def _tokenized(a, tok):
    from tuneforge.data.render import encode_rows

    enc = encode_rows(tok, rows(a.steps * a.batch), a.max_length, "drop")
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in enc.rows]


def run_trainer(a) -> dict:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tuneforge.models.load import load_causal_lm, load_tokenizer

    tok = load_tokenizer(a.model)
    ds = datasets.Dataset.from_list(_tokenized(a, tok))
    model = load_causal_lm(a.model, torch.float32, "cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir="/tmp/tf-bench-trainer", per_device_train_batch_size=a.batch,
                             num_train_epochs=1, learning_rate=2e-4, lr_scheduler_type="constant", bf16=True,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    return {"seconds": seconds, "final_loss": last}


def run_sft_trainer(a) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tuneforge.models.load import load_tokenizer, resolve

    tok = load_tokenizer(a.model)
    data = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows(a.steps * a.batch)]
    args = SFTConfig(output_dir="/tmp/tf-bench-sft", per_device_train_batch_size=a.batch, num_train_epochs=1,
                     learning_rate=2e-4, lr_scheduler_type="constant", bf16=True, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, max_length=a.max_length)
    trainer = SFTTrainer(model=resolve(a.model).path, args=args, train_dataset=datasets.Dataset.from_list(data),
                         processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    return {"seconds": seconds, "final_loss": last}


def real_tokens(a) -> int:
    from tuneforge.models.load import load_tokenizer

    return sum(len(r["input_ids"]) for r in _tokenized(a, load_tokenizer(a.model)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--only", help=argparse.SUPPRESS)  # child process: run one runner, print JSON
    a = p.parse_args()
    if a.only:
        result = globals()[f"run_{a.only}"](a)
        print("RESULT " + json.dumps(result | {"peak_rss_mb": peak_rss_mb()}))
        return

    tokens = real_tokens(a)
    results = {}
    for name in a.runners.split(","):
        cmd = [sys.executable, __file__, "--only", name, "--model", a.model, "--steps", str(a.steps),
               "--batch", str(a.batch), "--max-length", str(a.max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name} failed:\n{out.stderr[-2000:]}")
            continue
        r = json.loads(line[7:])
        r["tokens_per_s"] = tokens / r["seconds"]
        results[name] = r
        print(f"{name:12s} {r['tokens_per_s']:8.1f} real tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"final loss {r['final_loss']:.4f}", flush=True)
    if "tuneforge" in results:
        base = results["tuneforge"]["tokens_per_s"]
        for name, r in results.items():
            if name != "tuneforge":
                print(f"tuneforge / {name}: {base / r['tokens_per_s']:.2f}x tokens/s")
    print(f"({tokens} real tokens, {a.steps} steps x batch {a.batch}, max_length {a.max_length})")


if __name__ == "__main__":
    main()
