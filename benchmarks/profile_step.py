"""Where a LoRA training step's time goes: torch.profiler over a few steps of tuneforge's own
step (the model, method, batches and loss exactly as `tuneforge train` builds them), after
warm-up steps. Prints ms per step and the top operators by self time on the device (CUDA) and
on the CPU. Read this before guessing what to speed up.

    python benchmarks/profile_step.py --model smollm2-135m-instruct --batch 4 --max-length 256
    python benchmarks/profile_step.py --method full
    python benchmarks/profile_step.py --data reviews-train.jsonl --batch 8 --max-length 104 --r 16   # your rows
    python benchmarks/profile_step.py --device cuda --model /tmp/sm17 --batch 16 --max-length 512 --no-padding-free
"""

from __future__ import annotations

import argparse
import json
import os
import time

# On a busy machine OpenMP threads spinning for a descheduled peer show up as time in whatever
# op they wait in (measured: a third of a step "in" zero fills that cost nothing with passive
# waiting), so the profile follows `tuneforge train`'s rule (tuneforge/allocator.py). Set
# before torch loads OpenMP.
from tuneforge.allocator import machine_busy  # noqa: E402  (imports no torch)

if machine_busy():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main(a) -> None:
    from tuneforge.plugins import validate_config
    from tuneforge.data.builtin import chatterbot_instructions
    from tuneforge.data.formats import FORMATS
    from tuneforge.data.render import encode_rows
    from tuneforge.methods import METHODS
    from tuneforge.models.load import load_tokenizer
    from tuneforge.objectives import OBJECTIVES
    from tuneforge.hardware import pick_device, pick_dtype
    from tuneforge.data.render import epoch_batches
    from tuneforge.allocator import allocator_name
    from tuneforge.hardware import autocast, compute_path, to_device
    from tuneforge.train.recipes.tokens import load_model

    device = pick_device(a.device)
    dtype = pick_dtype("auto", device)
    cfg = validate_config({"model": {"name": a.model}, "data": {"train": ["-"], "max_length": a.max_length},
                           "method": {"name": "lora", "r": a.r, "alpha": 2 * a.r, "dropout": a.dropout}
                           if a.method == "lora" else {"name": a.method},
                           "train": {"padding_free": a.padding_free, "batch_size": a.batch}})
    tok = load_tokenizer(a.model)
    method = METHODS[cfg.method.name]
    model, per_example = load_model(cfg, method, dtype, device, tok)
    model.train()  # as the training loop runs it (dropout on)
    if a.data:  # chat rows only: {"messages": [...]}, one a line
        rows = [json.loads(x) for x in open(a.data, encoding="utf-8") if x.strip()]
    else:
        rows = [FORMATS["instruction"].convert(r, {}) for r in chatterbot_instructions(seed=0)]
    enc = encode_rows(tok, rows, a.max_length, "drop").rows
    padding_free = a.padding_free and per_example
    # The training defaults: rows sharing an untrained prefix compute it once (train.shared_prefix).
    batches = epoch_batches(enc, 0, 0, a.batch, False, a.max_length, tok.pad_token_id,
                            padding_free=padding_free, shared_prefix=padding_free and a.shared_prefix)
    sft = OBJECTIVES["sft"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)  # as run.py
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(b):
        with autocast(device, dtype):
            loss, n = sft.loss(model, to_device(b, device), sft.options(), hidden_path=True)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if a.threads:
        torch.set_num_threads(a.threads)
    it = iter(batches)
    for _ in range(a.warmup):
        step(next(it))
    sync()
    # CPU seconds beside wall seconds: on a shared machine the process's own CPU time moves
    # far less with the neighbours' load than the wall clock does.
    t0, c0, tokens, computed = time.perf_counter(), time.process_time(), 0, 0
    for _ in range(a.steps):
        b = next(it)
        tokens += int(b["n_real"])
        computed += int(b.get("n_computed", b["input_ids"].numel()))
        step(b)
    sync()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{compute_path(device, dtype)}, {torch.get_num_threads()} threads, allocator "
          f"{allocator_name(os.environ.get('LD_PRELOAD', '').split(':')[0] or None)}, load {os.getloadavg()[0]:.1f}, "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'default')}, "
          f"padding-free {a.padding_free and per_example}: {1000 * dt / a.steps:.1f} ms/step, "
          f"{1000 * cpu / a.steps:.1f} CPU ms/step, {tokens / dt:.0f} real tok/s ({computed / dt:.0f} computed) over "
          f"{a.steps} steps after "
          f"{a.warmup} warm-up", flush=True)
    if not a.profile_steps:
        return
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda"
                                                          else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(a.profile_steps):
            step(next(it))
        sync()
    keys = ["self_cuda_time_total", "self_cpu_time_total"] if device == "cuda" else ["self_cpu_time_total"]
    for key in keys:
        print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--profile-steps", type=int, default=3, help="0: timing only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--rows", type=int, default=15, help="operators shown per table")
    p.add_argument("--no-padding-free", dest="padding_free", action="store_false")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha 2r), on every linear layer")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (auto and the jobs API use 0.05)")
    p.add_argument("--data", help="a chat JSONL file to take the rows from (default: chatterbot instructions)")
    p.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false")
    main(p.parse_args())
