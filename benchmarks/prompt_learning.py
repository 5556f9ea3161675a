"""Prompt-learning methods at their defaults on the quick-start task: validation loss of the
base model and after a short run, per method (what docs/methods.md's table quotes).

    python benchmarks/prompt_learning.py [STEPS] [METHOD ...]

Each method starts from the same base, trains STEPS optimizer steps of batch_size rows at the
method's default learning rate (constant after 2 warm-up steps, AdamW, gradients clipped at 1),
and is scored on the same validation rows before and after.
"""

from __future__ import annotations

import sys
import time

import torch

from tuneforge.data.render import pad_batch
from tuneforge.methods import count_trainable
from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.models.tokenizer import fix_chat_tokenizer
from tuneforge.plugins import method_of, objective_of, validate_config
from tuneforge.train.multitask import load_tasks

RAW = {"model": {"name": "smollm2-135m-instruct"},
       "data": {"train": ["builtin:orders?n=900&seed=0"], "val_size": 0.05, "test_size": 0.11, "max_length": 160,
                "system_prompt": "You are an order-processing assistant."},
       "train": {"batch_size": 4, "seed": 0, "dtype": "fp32"}}
VAL_ROWS = 16


def val_loss(model, rows, pad_id) -> float:
    model.eval()
    total = n = 0
    with torch.no_grad():
        for i in range(0, len(rows), 4):
            b = pad_batch(rows[i:i + 4], pad_id)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            k = int((b["labels"][:, 1:] != -100).sum())
            total, n = total + out.loss.item() * k, n + k
    return total / n


def main(steps: int, methods: list[str]) -> None:
    for name in methods:
        cfg = validate_config({**RAW, "method": {"name": name}})
        method = method_of(cfg)
        tok = load_tokenizer(cfg.model.name)
        task = load_tasks(cfg, tok, objective_of(cfg))[0]
        train_rows, val_rows = task.enc["train"].rows, task.enc["validation"].rows[:VAL_ROWS]
        torch.manual_seed(0)
        base = load_causal_lm(cfg.model.name, torch.float32, "cpu")
        fix_chat_tokenizer(tok, base)
        before = val_loss(base, val_rows, tok.pad_token_id)
        opts = method.for_task(cfg.method, task.splits.train, cfg.data.system_prompt)
        model = method.apply(base, opts)
        at_init = val_loss(model, val_rows, tok.pad_token_id)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
        t0, losses = time.perf_counter(), []
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(train_rows), generator=g).tolist()
        model.train()
        for s in range(steps):
            b = pad_batch([train_rows[i] for i in order[s * 4:(s + 1) * 4]], tok.pad_token_id)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            losses.append(round(out.loss.item(), 3))
            print(f"{name} step {s + 1} loss {losses[-1]}", flush=True)
        after = val_loss(model, val_rows, tok.pad_token_id)
        print(f"RESULT {name}: lr {cfg.train.lr:g}, {count_trainable(model)[0]:,} trainable, {steps} steps x 4 rows, "
              f"val loss base {before:.3f} -> at init {at_init:.3f} -> tuned {after:.3f} "
              f"(train loss {losses[:2]} .. {losses[-2:]}, {time.perf_counter() - t0:.0f}s)"
              f"{'; init: ' + repr(opts.init_text[:60]) if getattr(opts, 'init_text', None) else ''}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, sys.argv[2:] or ["prompt", "ptuning", "prefix"])
