"""Serving throughput of the local engine: one request at a time (what a naive server does)
vs 16 concurrent clients micro-batched over 1, 4 and 16 different adapters in the same
forward passes. Prints generated tokens/s, requests/s and p50/p95 latency per mode.

    python benchmarks/serve_throughput.py RUN_DIR --prompts 16 --tokens 32

RUN_DIR is a LoRA run folder; its adapter is loaded under 16 names for the mixed cases (the
work per token is what is measured, and identical weights keep output lengths equal).
Prints generated tokens/s for each mode and ratios against one-at-a-time.
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

    engine = LocalEngine(args.device, args.dtype, max_batch=args.prompts, batch_wait_ms=50)
    await collect(engine.stream(reqs(16)[0]))  # load the base and warm up
    for i in range(16):
        await collect(engine.stream(GenRequest(**{**reqs(16)[i].__dict__, "max_tokens": 1})))  # load 16 adapters
    results = {}
    for label, n_adapters, concurrent in (("one at a time", 1, False), ("16 clients, 1 adapter", 1, True),
                                          ("16 clients, 4 adapters", 4, True), ("16 clients, 16 adapters", 16, True)):
        secs, toks, lat = await run_mode(engine, reqs(n_adapters), concurrent)
        results[label] = toks / secs
        print(f"{label:<26} {toks:>5} tokens in {secs:6.1f}s  {toks / secs:7.1f} tok/s  {len(lat) / secs:5.2f} req/s  "
              f"p50 {lat[len(lat) // 2]:5.1f}s  p95 {lat[int(0.95 * (len(lat) - 1))]:5.1f}s  "
              f"x{toks / secs / results['one at a time']:.2f} vs one at a time", flush=True)
    await engine.close()
    print(json.dumps({"device": engine.device, "dtype": str(engine.dtype), "prompts": args.prompts,
                      "max_tokens": args.tokens, "tokens_per_s": {k: round(v, 1) for k, v in results.items()}}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    asyncio.run(main(p.parse_args()))
