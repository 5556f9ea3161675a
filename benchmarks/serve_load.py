"""Serving under load (issue 25 item 8, "graceful degradation"): `tuneforge serve` on
SmolLM2-135M-Instruct (the embedded model, base model alone, default engine settings and the
default timeout_s unless --timeout is given), as its own process on 127.0.0.1, against 1, 4,
16 and 64 concurrent clients. Each client sends short chats (max_tokens 32) back to back for
--seconds; a 503 with Retry-After makes it wait that long (at most until the level ends)
before its next request, as a well-behaved client does. Prints, per level: requests sent,
success rate, status counts, p50/p95 latency of the successes and of every answer,
successful requests/s and generated tokens/s.

    python benchmarks/serve_load.py                      # 1, 4, 16, 64 clients, 60 s each
    python benchmarks/serve_load.py --clients 16 64 --seconds 90 --json out.json

Not run in CI: it takes several minutes. Run it on an otherwise idle machine; the server gets
the machine's cores (OMP threads as torch picks them), the clients are one asyncio process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

PROMPTS = ["What is the capital of France?", "Give me a synonym for happy.", "How many legs does a spider have?",
           "Name a primary color.", "What is 7 times 8?", "Say hello in Spanish.", "What do bees make?",
           "Which planet is closest to the sun?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, model: str, timeout_s: float | None, engine: dict,
                 threads: int | None) -> tuple[subprocess.Popen, str]:
    cfg = {"base_model": model, "base_name": "smol", "engine": engine, "logging": {"enabled": False},
           "log_format": "text"} | ({"timeout_s": timeout_s} if timeout_s else {})
    (workdir / "serve.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - the server process writes it until it ends
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--config", str(workdir / "serve.yaml"),
                             "--registry", f"sqlite:///{workdir / 'reg.db'}", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start:\n" + (workdir / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


async def client(http: httpx.AsyncClient, url: str, i: int, end: float, max_tokens: int, out: list) -> None:
    n = 0
    while time.monotonic() < end:
        body = {"model": "smol", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}]}
        n += 1
        t0 = time.monotonic()
        try:
            r = await http.post(f"{url}/v1/chat/completions", json=body)
            status = r.status_code
            tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
            retry = float(r.headers.get("retry-after", 0)) if status == 503 else 0
        except httpx.HTTPError as e:
            status, tokens, retry = type(e).__name__, 0, 0
        out.append((status, time.monotonic() - t0, tokens))
        if retry:
            await asyncio.sleep(max(0.0, min(retry, end - time.monotonic())))


async def level(url: str, clients: int, seconds: float, max_tokens: int, client_timeout: float) -> dict:
    out: list = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=client_timeout, limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(http, url, i, t0 + seconds, max_tokens, out) for i in range(clients)))
        wall = time.monotonic() - t0
    ok = sorted(s for status, s, _ in out if status == 200)
    every = sorted(s for _, s, _ in out)

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

    return {"clients": clients, "requests": len(out), "ok": len(ok),
            "success_rate": round(len(ok) / len(out), 3) if out else None,
            "statuses": dict(Counter(str(s) for s, _, _ in out)),
            "p50_ok_s": pct(ok, 0.5), "p95_ok_s": pct(ok, 0.95), "p50_all_s": pct(every, 0.5),
            "p95_all_s": pct(every, 0.95), "max_ok_s": round(ok[-1], 2) if ok else None,
            "ok_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(sum(t for *_, t in out) / wall, 1),
            "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=float, default=60, help="how long each level sends")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=None, help="the server's timeout_s (default: serve.yaml's)")
    ap.add_argument("--engine", default="{}", help='engine settings as JSON, e.g. \'{"max_batch": 16}\'')
    ap.add_argument("--threads", type=int, help="the server's OMP_NUM_THREADS (on a CPU shared with other busy "
                    "processes, 1 avoids OpenMP threads waiting on a core another process holds)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp), args.model, args.timeout, json.loads(args.engine), args.threads)
        try:
            asyncio.run(level(url, 1, 3, args.max_tokens, 600))  # warm-up: first batches, measured step time
            results = []
            client_timeout = 3 * (args.timeout or 60) + 30  # the server must answer before the client gives up
            for n in args.clients:
                res = asyncio.run(level(url, n, args.seconds, args.max_tokens, client_timeout))
                results.append(res)
                print(json.dumps(res), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    meta = {"cpu": _cpu(), "cores": os.cpu_count(), "seconds": args.seconds, "max_tokens": args.max_tokens,
            "timeout_s": args.timeout or "default (60)", "engine": json.loads(args.engine), "threads": args.threads,
            "load_average_after": os.getloadavg()}
    print(json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "levels": results}, indent=1))


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "unknown")
    flags = next((x.split(":", 1)[1].split() for x in info.splitlines() if x.startswith("flags")), [])
    return f"{name}; " + " ".join(f for f in flags if f.startswith(("avx", "amx")))


if __name__ == "__main__":
    main()
