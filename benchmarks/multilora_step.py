"""Time of one forward pass (prefill of a batch, then decode steps) with rows over 1, 4 and 16
LoRA adapters, gathered (tuneforge/deploy/multilora.py) vs peft's mixed batches
(``adapter_names=``), and the base model alone. Prints ms per decode step and each path's
ratio of 16 (or 4) adapters to 1.

    python benchmarks/multilora_step.py RUN_DIR --rows 16 --prompt 60 --steps 8 --repeats 3

The end-to-end serving benchmark (serve_throughput.py) measures the same thing through the
engine, but one run takes minutes and a shared machine's load moves it by 2x; here every case
runs once per round, round after round, and the best round of each counts, so load changes
hit all cases alike. RUN_DIR's adapter is loaded under 16 names (16 copies: the memory each
decode step reads is that of 16 distinct adapters).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from tuneforge.deploy.multilora import LoraBank
from tuneforge.models.load import load_causal_lm
from tuneforge.runs import read_run
from tuneforge.hardware import pick_device, pick_dtype


def timed(model, ids, steps: int, ctx, dtype, device, **kw) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) with the KV cache, as generate runs them."""
    autocast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # GPU kernels run asynchronously
    with torch.no_grad(), autocast, ctx():
        sync()
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **kw)
        sync()
        prefill = time.perf_counter() - t
        nxt, past = ids[:, -1:], out.past_key_values
        t = time.perf_counter()
        for _ in range(steps):
            past = model(input_ids=nxt, past_key_values=past, use_cache=True, **kw).past_key_values
        sync()
        return prefill, (time.perf_counter() - t) / steps


def main(args) -> None:
    from peft import PeftModel

    run = read_run(args.run_dir)
    device, dtype = pick_device(args.device), pick_dtype(args.dtype, pick_device(args.device))
    model = load_causal_lm(run.base_model, dtype, device).eval()
    bank = LoraBank(model)
    names = [f"a{i}" for i in range(16)]
    for n in names:
        assert bank.load(n, str(run.adapter_dir)) is None, "not a plain LoRA adapter"
    peft = PeftModel.from_pretrained(load_causal_lm(run.base_model, dtype, device), str(run.adapter_dir),
                                     adapter_name=names[0]).eval()
    for n in names[1:]:
        peft.load_adapter(str(run.adapter_dir), adapter_name=n)
    ids = torch.randint(100, 1000, (args.rows, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def rows(k: int) -> list[str]:
        return [names[i % k] for i in range(args.rows)]

    cases = {"base": lambda: timed(model, ids, args.steps, contextlib.nullcontext, dtype, device)}
    for k in (1, 4, 16):
        cases[f"gathered {k}"] = lambda k=k: timed(model, ids, args.steps, lambda: bank.rows(rows(k)), dtype, device)
        cases[f"peft {k}"] = lambda k=k: timed(peft, ids, args.steps, contextlib.nullcontext, dtype, device,
                                               adapter_names=rows(k))
    best = {c: (float("inf"), float("inf")) for c in cases}
    for _ in range(args.repeats):
        for c, fn in cases.items():
            p, d = fn()
            best[c] = (min(best[c][0], p), min(best[c][1], d))
    for c, (p, d) in best.items():
        path, _, k = c.partition(" ")
        ratio = f"  x{best[f'{path} 1'][1] / d:.2f} of 1 adapter's speed" if k and k != "1" else ""
        print(f"{c:<12} prefill {p * 1000:8.1f} ms  decode {d * 1000:7.1f} ms/step{ratio}")
    print(json.dumps({"device": device, "dtype": str(dtype), "rows": args.rows, "prompt": args.prompt,
                      "decode_ms": {c: round(d * 1000, 1) for c, (_, d) in best.items()},
                      "prefill_ms": {c: round(p * 1000, 1) for c, (p, _) in best.items()}}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--prompt", type=int, default=60, help="prompt tokens per row")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the best of each case counts")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    main(p.parse_args())
