"""Serving throughput of the local engine: one request at a time (what a naive server does)
vs 16 concurrent clients micro-batched over 1, 4 and 16 different adapters in the same
forward passes, for each way of running a mixed-adapter batch (--lora): "gathered"
(tuneforge/deploy/multilora.py, the default) and "peft" (peft's ``adapter_names=``, the
baseline). Prints generated tokens/s, requests/s and p50/p95 latency per mode, and the
ratios against one-at-a-time and against the same path's single-adapter batches.

    python benchmarks/serve_throughput.py RUN_DIR --prompts 16 --tokens 32
    python benchmarks/serve_throughput.py RUN_DIR --naive --lora gathered   # vs the hand-written peft server
    python benchmarks/serve_throughput.py RUN_DIR --lora "" --vllm /opt/vllm/bin/python   # through vLLM

Every mode runs ``--rounds`` times (default 3) and the summary gives each mode's median and
range: on a shared machine one batch's figure moves by 10-30% from minute to minute. With
--naive, each round of the first path runs right after a round of the naive server, so both
see the same minutes of the machine's load.

RUN_DIR is a LoRA run folder; its adapter is loaded under 16 names for the mixed cases (the
work per token is what is measured, and identical weights keep output lengths equal). The
paths run back to back in one process, so machine load affects both alike. Prompts are the
run's eval prompts, and every mode gets prompts no earlier mode sent: the engine's prefix cache
then reuses only what real traffic shares (system prompt, chat template, an instruction common
to the task), never a whole repeated prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time

from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.registry.runinfo import read_run


def prompts(run, n: int) -> list[str]:
    rows = [json.loads(x) for x in (run.run_dir / "eval_samples.jsonl").read_text().splitlines() if x.strip()] \
        if (run.run_dir / "eval_samples.jsonl").exists() else []
    texts = list(dict.fromkeys(r["prompt"] for r in rows if r.get("prompt"))) or ["Tell me about apples."]
    # Past the distinct prompts, repeats are marked at the start, so that a repeat shares no
    # more with its original than the system prompt and chat template (the prefix cache's due).
    return [("" if i < len(texts) else f"(#{i}) ") + texts[i % len(texts)] for i in range(n)]


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


def stats(path: str, label: str, secs: float, toks: int, lat: list[float]) -> str:
    """One result line: generated tokens/s, requests/s, p50/p95 latency (``lat`` sorted)."""
    return (f"{path:<8} {label:<26} {toks:>5} tokens in {secs:6.1f}s  {toks / secs:7.1f} tok/s  "
            f"{len(lat) / secs:5.2f} req/s  p50 {lat[len(lat) // 2]:5.1f}s  p95 {lat[int(0.95 * (len(lat) - 1))]:5.1f}s")


_NAIVE: dict = {}  # the naive server's model, loaded once per process


def naive_server(run_dir: str, texts: list[str], max_tokens: int, device: str, dtype: str) \
        -> tuple[float, int, list[float]]:
    """The server users write by hand: transformers + peft, every adapter loaded, one request at
    a time, ``set_adapter`` per request, ``generate`` (greedy). 16 adapter names, round-robin.
    Run in a process of its own, as such a server is: torch's OpenMP pools are per thread, and a
    second pool in the engine's process slows the engine's thread down (engines.py, _on_worker)."""
    if not _NAIVE:
        _NAIVE.update(_naive_load(run_dir, device, dtype))
        _naive_answer(0, texts[0], max_tokens)  # warm-up, as for the engine
    t0, lat, tokens = time.perf_counter(), [], 0
    for i, text in enumerate(texts):
        t = time.perf_counter()
        tokens += _naive_answer(i, text, max_tokens)
        lat.append(time.perf_counter() - t)
    # Requests queue behind each other: a client's latency includes the wait for those before it.
    waits = [sum(lat[: i + 1]) for i in range(len(lat))]
    return time.perf_counter() - t0, tokens, sorted(waits)


def _naive_answer(i: int, text: str, max_tokens: int) -> int:
    import torch

    from tuneforge.data.render import with_system

    run, tok, model, device = _NAIVE["run"], _NAIVE["tok"], _NAIVE["model"], _NAIVE["device"]
    model.set_adapter(f"a{i % 16}")
    ids = tok.apply_chat_template(with_system([{"role": "user", "content": text}], run.system_prompt),
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids.to(device), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return len(new) - (new[-1] == tok.eos_token_id)


def _naive_load(run_dir: str, device: str, dtype: str) -> dict:
    from peft import PeftModel

    from tuneforge.models.load import load_causal_lm, load_tokenizer
    from tuneforge.models.tokenizer import fix_chat_tokenizer
    from tuneforge.train.hardware import pick_device, pick_dtype

    run = read_run(run_dir)
    device = pick_device(device)
    tok = load_tokenizer(run.base_model)
    base = load_causal_lm(run.base_model, pick_dtype(dtype, device), device).eval()
    fix_chat_tokenizer(tok, base)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir), adapter_name="a0")
    for i in range(1, 16):
        model.load_adapter(str(run.adapter_dir), adapter_name=f"a{i}")
    return {"run": run, "tok": tok, "model": model, "device": device}


def vllm_engine(run, python: str):
    """tuneforge's vLLM engine on a throwaway registry holding the run under 16 names: vLLM is
    started with --enable-lora and the 16 adapters (docs/deploy.md has its set-up)."""
    import socket
    import tempfile

    from tuneforge.deploy.config import ServeConfig
    from tuneforge.deploy.server import build_engine
    from tuneforge.registry.store import Registry

    reg = Registry(f"sqlite:///{tempfile.mkdtemp(prefix='tf-serve-bench-')}/reg.db")
    for i in range(16):
        reg.add(run.run_dir, f"a{i}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ServeConfig.model_validate({"registry": str(reg.engine.url), "engine": {"kind": "vllm", "launch": {
        "python": python, "port": port, "args": ["--max-model-len", "1024"], "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}}})
    return build_engine(cfg)


MODES = [("one at a time", 1, False), ("16 clients, 1 adapter", 1, True), ("16 clients, 4 adapters", 4, True),
         ("16 clients, 16 adapters", 16, True)]


async def main(args) -> None:
    run = read_run(args.run_dir)
    n_sets = 2 + len(MODES) * args.rounds  # warm-up, warm batch, then a set per mode per round
    texts = prompts(run, args.prompts * n_sets)
    sets = [texts[i * args.prompts:(i + 1) * args.prompts] for i in range(n_sets)]
    rates: dict[str, list[float]] = {}  # "path: mode" -> tok/s per round
    naive_pool = multiprocessing.get_context("spawn").Pool(1) if args.naive else None

    def report(path: str, label: str, secs: float, toks: int, lat: list[float], rnd: int) -> None:
        rates.setdefault(f"{path}: {label}", []).append(toks / secs)
        print(f"round {rnd + 1}  " + stats(path, label, secs, toks, lat), flush=True)

    async def measure(engine, path: str, refs: list[str], naive: bool) -> None:
        """One warm-up batch, then each round's modes; ``refs``: the 16 adapter names as the
        engine knows them; ``naive``: a round of the naive server before each round."""

        def reqs(texts: list[str], n_adapters: int, max_tokens: int = args.tokens):
            return [GenRequest(adapter=refs[i % n_adapters], adapter_dir=str(run.adapter_dir),
                               base_model=run.base_model, messages=[{"role": "user", "content": t}],
                               system_prompt=run.system_prompt, max_tokens=max_tokens) for i, t in enumerate(texts)]

        for r in reqs(sets[0], 16, 1):  # the base and all 16 adapters resident before timing
            await collect(engine.stream(r))
        # One concurrent batch first: the first batch of a shape pays the kernels' set-up
        # (oneDNN primitives), which would otherwise land on whichever mode runs first.
        await run_mode(engine, reqs(sets[1], 16, 4), True)
        for rnd in range(args.rounds):
            first = 2 + rnd * len(MODES)
            if naive:  # the same prompts as the engine's one at a time
                report("naive", "peft, one at a time", *naive_pool.apply(
                    naive_server, (args.run_dir, sets[first], args.tokens, args.device, args.dtype)), rnd)
            for k, (label, n_adapters, concurrent) in enumerate(MODES):
                if label == "one at a time" and args.skip_single:
                    continue
                report(path, label, *await run_mode(engine, reqs(sets[first + k], n_adapters), concurrent), rnd)

    info, naive_pending = {}, args.naive
    for path in [p for p in args.lora.split(",") if p]:
        engine = LocalEngine(args.device, args.dtype, max_batch=args.prompts, batch_wait_ms=50, lora=path,
                             prefix_cache_mb=args.prefix_cache_mb, prepack=args.prepack,
                             fp32_prefill=args.fp32_prefill)
        await measure(engine, path, [f"a{i}" for i in range(16)], naive_pending)
        naive_pending = False
        await engine.close()
        info = {"device": engine.device, "dtype": str(engine.dtype), "prefix_cache_mb": args.prefix_cache_mb,
                "prepacked": any(b.packed for b in engine.bases.values())}
        if engine.prefix is not None:
            print(f"{path:<8} prefix cache: {engine.prefix.reused_tokens} prompt tokens reused", flush=True)
        del engine  # the next path loads its own copy of the base
    if args.vllm:
        engine = vllm_engine(run, args.vllm)
        try:
            await measure(engine, "vllm", [f"a{i}:v1" for i in range(16)], naive_pending)
        finally:
            await engine.close()
    if naive_pool is not None:
        naive_pool.close()
    summary(rates, args.rounds)
    print(json.dumps({**info, "prompts": args.prompts, "max_tokens": args.tokens, "rounds": args.rounds,
                      "tokens_per_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()}}))


def summary(rates: dict[str, list[float]], rounds: int) -> None:
    """Each mode's median tok/s over the rounds (and range), with the ratios of the medians: to
    the same path's one at a time and 1-adapter batches, and to the naive server."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    naive = med.get("naive: peft, one at a time")
    print(f"\nmedian of {rounds} round(s), generated tok/s:")
    for key, values in rates.items():
        path, label = key.split(": ", 1)
        single, one = med.get(f"{path}: one at a time"), med.get(f"{path}: 16 clients, 1 adapter")
        line = f"{path:<8} {label:<26} {med[key]:7.1f}  ({min(values):.1f}-{max(values):.1f})"
        if label.startswith("16 clients"):
            line += (f"  x{med[key] / single:.2f} vs one at a time" if single else "") + \
                f"  x{med[key] / one:.2f} vs 1 adapter" + (f"  x{med[key] / naive:.2f} vs naive" if naive else "")
        print(line, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--lora", default="gathered,peft", help="the engine's mixed-batch paths to measure, in order")
    p.add_argument("--prefix-cache-mb", type=float, default=256, help="the local engine's prefix cache (0: off)")
    p.add_argument("--prepack", default="auto", choices=["auto", "on", "off"], help="the local engine's prepack")
    p.add_argument("--fp32-prefill", default="auto", choices=["auto", "on", "off"],
                   help="the local engine's fp32_prefill")
    p.add_argument("--rounds", type=int, default=3, help="times each mode runs (the summary gives medians)")
    p.add_argument("--skip-single", action="store_true", help="leave out one-at-a-time (the slowest mode)")
    p.add_argument("--vllm", metavar="PYTHON",
                   help="also through tuneforge's vLLM engine, launched with this python (vLLM's own venv)")
    p.add_argument("--naive", action="store_true",
                   help="also the hand-written server (peft, set_adapter per request, one request at a time), "
                        "a round of it before each round of the first path")
    asyncio.run(main(p.parse_args()))
