"""Serving throughput of the local engine: one request at a time (what a naive server does)
vs 16 concurrent clients micro-batched over 1, 4 and 16 different adapters in the same
forward passes, for each way of running a mixed-adapter batch (--lora): "gathered"
(tuneforge/deploy/multilora.py, the default) and "peft" (peft's ``adapter_names=``, the
baseline). Prints generated tokens/s, requests/s and p50/p95 latency per mode, and the
ratios against one-at-a-time and against the same path's single-adapter batches.

    python benchmarks/serve_throughput.py RUN_DIR --prompts 16 --tokens 32

RUN_DIR is a LoRA run folder; its adapter is loaded under 16 names for the mixed cases (the
work per token is what is measured, and identical weights keep output lengths equal). The
paths run back to back in one process, so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.registry.runinfo import read_run


def prompts(run, n: int) -> list[str]:
    rows = [json.loads(x) for x in (run.run_dir / "eval_samples.jsonl").read_text().splitlines() if x.strip()] \
        if (run.run_dir / "eval_samples.jsonl").exists() else []
    texts = list(dict.fromkeys(r["prompt"] for r in rows if r.get("prompt"))) or ["Tell me about apples."]
    return [texts[i % len(texts)] + ("" if i < len(texts) else f" (#{i})") for i in range(n)]


async def timed(engine: LocalEngine, req: GenRequest):
    t0 = time.perf_counter()
    out = await collect(engine.stream(req))
    return out, time.perf_counter() - t0


async def run_mode(engine: LocalEngine, reqs: list[GenRequest], concurrent: bool):
    t0 = time.perf_counter()
    if concurrent:
        outs = await asyncio.gather(*(timed(engine, r) for r in reqs))
    else:
        outs = [await timed(engine, r) for r in reqs]
    lat = sorted(s for _, s in outs)
    return time.perf_counter() - t0, sum(o.completion_tokens for o, _ in outs), lat


async def main(args) -> None:
    run = read_run(args.run_dir)
    texts = prompts(run, args.prompts)

    def reqs(n_adapters: int):
        return [GenRequest(adapter=f"a{i % n_adapters}", adapter_dir=str(run.adapter_dir), base_model=run.base_model,
                           messages=[{"role": "user", "content": t}], system_prompt=run.system_prompt,
                           max_tokens=args.tokens) for i, t in enumerate(texts)]

    results, single = {}, None
    for path in args.lora.split(","):
        engine = LocalEngine(args.device, args.dtype, max_batch=args.prompts, batch_wait_ms=50, lora=path)
        await collect(engine.stream(reqs(16)[0]))  # load the base and warm up
        for i in range(16):
            await collect(engine.stream(GenRequest(**{**reqs(16)[i].__dict__, "max_tokens": 1})))  # load 16 adapters
        # One concurrent batch first: the first batch of a shape pays the kernels' set-up
        # (oneDNN primitives), which would otherwise land on whichever mode runs first.
        await run_mode(engine, [GenRequest(**{**r.__dict__, "max_tokens": 4}) for r in reqs(16)], True)
        modes = [("one at a time", 1, False)] if single is None and not args.skip_single else []
        modes += [("16 clients, 1 adapter", 1, True), ("16 clients, 4 adapters", 4, True),
                  ("16 clients, 16 adapters", 16, True)]
        for label, n_adapters, concurrent in modes:
            secs, toks, lat = await run_mode(engine, reqs(n_adapters), concurrent)
            rate = toks / secs
            if not concurrent:
                single = rate
            results[f"{path}: {label}"] = rate
            one = results.get(f"{path}: 16 clients, 1 adapter", rate)
            print(f"{path:<8} {label:<26} {toks:>5} tokens in {secs:6.1f}s  {rate:7.1f} tok/s  "
                  f"{len(lat) / secs:5.2f} req/s  p50 {lat[len(lat) // 2]:5.1f}s  "
                  f"p95 {lat[int(0.95 * (len(lat) - 1))]:5.1f}s"
                  + (f"  x{rate / single:.2f} vs one at a time" if single else "")
                  + (f"  x{rate / one:.2f} vs 1 adapter" if concurrent else ""), flush=True)
        await engine.close()
        info = {"device": engine.device, "dtype": str(engine.dtype)}
        del engine  # the next path loads its own copy of the base
    print(json.dumps({**info, "prompts": args.prompts, "max_tokens": args.tokens,
                      "tokens_per_s": {k: round(v, 1) for k, v in results.items()}}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lora", default="gathered,peft", help="the engine's mixed-batch paths to measure, in order")
    p.add_argument("--skip-single", action="store_true", help="leave out one-at-a-time (the slowest mode)")
    asyncio.run(main(p.parse_args()))
