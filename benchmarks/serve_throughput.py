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
--naive, each round of the first path runs right after a round of each naive server, so they
see the same minutes of the machine's load. The naive server (naive_server.py: transformers +
peft, ``set_adapter`` per request, one request at a time) is measured three ways: "in-process",
its code in a loop on one thread (its best case: no HTTP, one OpenMP pool, one client after
another), and as a FastAPI server under the same 16 concurrent clients as the engine, with a
plain ``def`` endpoint ("fastapi-def", what FastAPI's documentation asks for around blocking
code: requests run on its thread pool) or an ``async def`` one ("fastapi-async", requests block
the event loop, all on one thread).

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
import atexit
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import naive_server
from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.runs import read_run


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


def engine_sender(engine, run):
    """``send(texts, adapter names, max_tokens, concurrent)`` for an engine in this process."""
    async def send(texts: list[str], names: list[str], max_tokens: int, concurrent: bool):
        return await run_mode(engine, [GenRequest(
            adapter=name, adapter_dir=str(run.adapter_dir), base_model=run.base_model,
            messages=[{"role": "user", "content": t}], system_prompt=run.system_prompt, max_tokens=max_tokens)
            for name, t in zip(names, texts)], concurrent)
    return send


def stats(path: str, label: str, secs: float, toks: int, lat: list[float]) -> str:
    """One result line: generated tokens/s, requests/s, p50/p95 latency (``lat`` sorted)."""
    return (f"{path:<8} {label:<26} {toks:>5} tokens in {secs:6.1f}s  {toks / secs:7.1f} tok/s  "
            f"{len(lat) / secs:5.2f} req/s  p50 {lat[len(lat) // 2]:5.1f}s  p95 {lat[int(0.95 * (len(lat) - 1))]:5.1f}s")


_NAIVE: dict = {}  # the in-process naive server's model, loaded once per process


def naive_in_process(run_dir: str, texts: list[str], max_tokens: int, device: str, dtype: str) \
        -> tuple[float, int, list[float]]:
    """The naive server's code (naive_server.py) called in a loop, one request after another, on
    the one main thread of a process of its own: its best case, no HTTP and a single OpenMP pool
    (a second pool in the engine's process would slow the engine's thread down)."""
    if not _NAIVE:
        _NAIVE.update(naive_server.load(run_dir, device, dtype))
        _naive_request(0, texts[0], max_tokens)  # warm-up, as for the engine
    t0, lat, tokens = time.perf_counter(), [], 0
    for i, text in enumerate(texts):
        t = time.perf_counter()
        tokens += _naive_request(i, text, max_tokens)
        lat.append(time.perf_counter() - t)
    # Requests queue behind each other: a client's latency includes the wait for those before it.
    waits = [sum(lat[: i + 1]) for i in range(len(lat))]
    return time.perf_counter() - t0, tokens, sorted(waits)


def _naive_request(i: int, text: str, max_tokens: int) -> int:
    return naive_server.answer(_NAIVE, f"a{i % 16}", [{"role": "user", "content": text}], max_tokens)[1]


class HTTPServer:
    """A serving process on a free local port (naive_server.py or ``tuneforge serve``), driven
    over HTTP by concurrent clients with OpenAI-shaped chat requests."""

    def __init__(self, name: str, cmd: list[str], log_path: str):
        import subprocess

        port = free_port()
        self.url, self.name = f"http://127.0.0.1:{port}", name
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        self.log_path = log_path
        atexit.register(self.close)  # a benchmark that fails midway leaves no server behind

    async def ready(self, path: str) -> None:
        import httpx

        async with httpx.AsyncClient() as client:
            for _ in range(600):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if (await client.get(f"{self.url}{path}")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(1)
        raise RuntimeError(f"{self.name} not ready within 10 minutes; see {self.log_path}")

    async def send(self, texts: list[str], models: list[str], max_tokens: int, concurrent: bool) \
            -> tuple[float, int, list[float]]:
        import httpx

        async def one(client, model: str, text: str) -> tuple[int, float]:
            t = time.perf_counter()
            r = await client.post(f"{self.url}/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"], time.perf_counter() - t

        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=None) as client:
            jobs = [one(client, m, t) for m, t in zip(models, texts)]
            outs = await asyncio.gather(*jobs) if concurrent else [await j for j in jobs]
        return time.perf_counter() - t0, sum(n for n, _ in outs), sorted(t for _, t in outs)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def naive_http(run_dir: str, endpoint: str, args, tmp: str) -> HTTPServer:
    script = str(Path(__file__).with_name("naive_server.py"))
    return HTTPServer(f"naive_server.py --endpoint {endpoint}",
                      [sys.executable, script, run_dir, "--endpoint", endpoint, "--device", args.device,
                       "--dtype", args.dtype], f"{tmp}/naive-{endpoint}.log")


def serve_http(run, args, tmp: str) -> HTTPServer:
    """``tuneforge serve`` over a throwaway registry holding the run under 16 names, with the
    engine settings the in-process paths get."""
    import yaml

    cfg = Path(tmp) / "serve.yaml"
    registry = bench_registry(run, f"{tmp}/serve-reg.db")
    cfg.write_text(yaml.safe_dump({"registry": registry, "log_format": "text", "engine": {
        "device": args.device, "dtype": args.dtype, "max_batch": args.prompts, "batch_wait_ms": 50,
        "lora": "gathered", "prefix_cache_mb": args.prefix_cache_mb, "prepack": args.prepack,
        "fp32_prefill": args.fp32_prefill}}))
    return HTTPServer("tuneforge serve", [sys.executable, "-m", "tuneforge", "serve", "--config", str(cfg)],
                      f"{tmp}/serve.log")


def vllm_engine(run, python: str, tmp: str):
    """tuneforge's vLLM engine on a throwaway registry holding the run under 16 names: vLLM is
    started with --enable-lora and the 16 adapters (docs/deploy.md has its set-up)."""
    from tuneforge.deploy.config import ServeConfig
    from tuneforge.deploy.server import build_engine

    cfg = ServeConfig.model_validate({"registry": bench_registry(run, f"{tmp}/vllm-reg.db"), "engine": {
        "kind": "vllm", "launch": {"python": python, "port": free_port(), "args": ["--max-model-len", "1024"],
                                   "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}}})
    return build_engine(cfg)


def bench_registry(run, path: str) -> str:
    """A throwaway registry at ``path`` holding the run under 16 names, a0 .. a15; its URL."""
    from tuneforge.registry.store import Registry

    reg = Registry(f"sqlite:///{path}")
    for i in range(16):
        reg.add(run.run_dir, f"a{i}")
    return str(reg.engine.url)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# in-process: naive_server.py's code called in a loop (no HTTP, one thread, the best case);
# fastapi-def / fastapi-async: naive_server.py served with that --endpoint under 16 clients.
NAIVE_VARIANTS = ("in-process", "fastapi-def", "fastapi-async")
MODES = [("one at a time", 1, False), ("16 clients, 1 adapter", 1, True), ("16 clients, 4 adapters", 4, True),
         ("16 clients, 16 adapters", 16, True)]


async def main(args) -> None:
    run = read_run(args.run_dir)
    n_sets = 2 + len(MODES) * args.rounds  # warm-up, warm batch, then a set per mode per round
    texts = prompts(run, args.prompts * n_sets)
    sets = [texts[i * args.prompts:(i + 1) * args.prompts] for i in range(n_sets)]
    rates: dict[str, list[float]] = {}  # "path: mode" -> tok/s per round
    variants = [v for v in (args.naive or "").split(",") if v]
    if set(variants) - set(NAIVE_VARIANTS):
        raise SystemExit(f"--naive: unknown {sorted(set(variants) - set(NAIVE_VARIANTS))}; "
                         f"choose from {', '.join(NAIVE_VARIANTS)}")
    tmp = tempfile.mkdtemp(prefix="tf-serve-bench-")
    naive_pool = multiprocessing.get_context("spawn").Pool(1) if "in-process" in variants else None
    naives = {v: naive_http(args.run_dir, v.removeprefix("fastapi-"), args, tmp) for v in variants if v != "in-process"}
    naive_16 = [f"a{i % 16}" for i in range(args.prompts)]
    for server in naives.values():
        await server.ready("/openapi.json")
        await server.send(sets[0][:1], naive_16[:1], args.tokens, False)  # warm-up, as for the engine

    def report(path: str, label: str, secs: float, toks: int, lat: list[float], rnd: int) -> None:
        rates.setdefault(f"{path}: {label}", []).append(toks / secs)
        print(f"round {rnd + 1}  " + stats(path, label, secs, toks, lat), flush=True)

    async def measure(send, path: str, refs: list[str], naive: bool) -> None:
        """One warm-up batch, then each round's modes. ``send(texts, models, max_tokens,
        concurrent)`` runs requests on the path; ``refs``: the 16 adapter names as the path
        knows them; ``naive``: a round of each naive server before each round."""

        def models(n_adapters: int, n: int = args.prompts) -> list[str]:
            return [refs[i % n_adapters] for i in range(n)]

        await send(sets[0], models(16), 1, False)  # the base and all 16 adapters resident before timing
        # One concurrent batch first: the first batch of a shape pays the kernels' set-up
        # (oneDNN primitives), which would otherwise land on whichever mode runs first.
        await send(sets[1], models(16), 4, True)
        for rnd in range(args.rounds):
            first = 2 + rnd * len(MODES)
            if naive and naive_pool is not None:  # the same prompts as the engine's one at a time
                report("naive", "in-process, one at a time", *naive_pool.apply(
                    naive_in_process, (args.run_dir, sets[first], args.tokens, args.device, args.dtype)), rnd)
            for variant, server in naives.items() if naive else ():  # those of its 16 clients, 1 adapter
                report("naive", f"{variant}, 16 clients",
                       *await server.send(sets[first + 1], naive_16, args.tokens, True), rnd)
            for k, (label, n_adapters, concurrent) in enumerate(MODES):
                if label == "one at a time" and args.skip_single:
                    continue
                report(path, label, *await send(sets[first + k], models(n_adapters), args.tokens, concurrent), rnd)

    info, naive_pending = {}, bool(variants)
    for path in [p for p in args.lora.split(",") if p]:
        engine = LocalEngine(args.device, args.dtype, max_batch=args.prompts, batch_wait_ms=50, lora=path,
                             prefix_cache_mb=args.prefix_cache_mb, prepack=args.prepack,
                             fp32_prefill=args.fp32_prefill)
        await measure(engine_sender(engine, run), path, [f"a{i}" for i in range(16)], naive_pending)
        naive_pending = False
        await engine.close()
        info = {"device": engine.device, "dtype": str(engine.dtype), "prefix_cache_mb": args.prefix_cache_mb,
                "prepacked": any(b.packed for b in engine.bases.values())}
        if engine.prefix is not None:
            print(f"{path:<8} prefix cache: {engine.prefix.reused_tokens} prompt tokens reused", flush=True)
        del engine  # the next path loads its own copy of the base
    if args.http:
        server = serve_http(run, args, tmp)
        try:
            await server.ready("/readyz")
            await measure(server.send, "serve", [f"a{i}" for i in range(16)], naive_pending)
            naive_pending = False
        finally:
            server.close()
    if args.vllm:
        engine = vllm_engine(run, args.vllm, tmp)
        try:
            await measure(engine_sender(engine, run), "vllm", [f"a{i}:v1" for i in range(16)], naive_pending)
        finally:
            await engine.close()
    if naive_pool is not None:
        naive_pool.close()
    for server in naives.values():
        server.close()
    summary(rates, args.rounds)
    print(json.dumps({**info, "prompts": args.prompts, "max_tokens": args.tokens, "rounds": args.rounds,
                      "tokens_per_s_median": {k: round(statistics.median(v), 1) for k, v in rates.items()}}))


def summary(rates: dict[str, list[float]], rounds: int) -> None:
    """Each mode's median tok/s over the rounds (and range), with the ratios of the medians: to
    the same path's one at a time and 1-adapter batches, and to each naive server measured."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    naive = {k.split(": ", 1)[1].split(",")[0]: v for k, v in med.items() if k.startswith("naive: ")}
    print(f"\nmedian of {rounds} round(s), generated tok/s:")
    for key, values in rates.items():
        path, label = key.split(": ", 1)
        single, one = med.get(f"{path}: one at a time"), med.get(f"{path}: 16 clients, 1 adapter")
        line = f"{path:<8} {label:<30} {med[key]:7.1f}  ({min(values):.1f}-{max(values):.1f})"
        if path != "naive" and label.startswith("16 clients"):
            line += (f"  x{med[key] / single:.2f} vs one at a time" if single else "") + \
                f"  x{med[key] / one:.2f} vs 1 adapter" + "".join(f"  x{med[key] / v:.2f} vs naive {k}"
                                                                   for k, v in naive.items())
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
    p.add_argument("--http", action="store_true",
                   help="also through `tuneforge serve` as its own process, over HTTP like the FastAPI naive servers")
    p.add_argument("--vllm", metavar="PYTHON",
                   help="also through tuneforge's vLLM engine, launched with this python (vLLM's own venv)")
    p.add_argument("--naive", nargs="?", const=",".join(NAIVE_VARIANTS), metavar="VARIANTS",
                   help="also the hand-written server (naive_server.py: peft, set_adapter per request, one request "
                        f"at a time), a round of it before each round of the first path; comma-separated of "
                        f"{', '.join(NAIVE_VARIANTS)} (default all)")
    asyncio.run(main(p.parse_args()))
