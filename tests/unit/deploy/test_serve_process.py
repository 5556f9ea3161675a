"""`tuneforge serve` as a real process on 127.0.0.1 (tiny Llama, local engine): SIGTERM drains
a running stream before exiting; SIGKILL during a stream leaves the registry database
readable, consistent and writable."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from deploy_helpers import fake_run, free_port

from tuneforge.registry.migrate import head
from tuneforge.registry.store import Registry

pytestmark = pytest.mark.integration

MAX_TOKENS = 300  # long enough that the stream is still running when the signal arrives


@pytest.fixture
def server(tiny_model_dir, tmp_path, request):
    """Start `tuneforge serve` over a registry with two versions; yields (process, url, registry url).
    Indirect parameters: serve.yaml keys over the defaults below."""
    params = dict(getattr(request, "param", {}))
    if params.pop("long_context", False):  # a base whose answers can run for minutes (not 512 tokens)
        import shutil

        base = tmp_path / "tiny-long"
        shutil.copytree(tiny_model_dir, base)
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1_000_000}))
        tiny_model_dir = str(base)
        params |= {"base_model": tiny_model_dir, "base_name": "tiny"}  # served under its own name, no adapter
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    reg = Registry(url)
    for i in range(2):
        reg.add(fake_run(tiny_model_dir, tmp_path / f"r{i}", seed=40 + i, score=0.5 + i / 10), "bot")
    reg.promote("bot:v1", "prod")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"max_tokens": MAX_TOKENS, "shutdown_grace_s": 60,
                                   "engine": {"device": "cpu", "dtype": "fp32", "batch_wait_ms": 1},
                                   **params}))
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--config", str(cfg), "--registry", url,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "server not ready within 180 s"
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    try:
        yield proc, base, url, tmp_path / "server.log"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def _stream_until_signal(base, proc, sig) -> list[str]:
    """Stream a long chat; after its first content chunk send ``sig`` to the server.
    Returns the lines that arrived after the signal."""
    body = {"model": "bot", "stream": True, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}]}
    after, sent = [], False
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if sent:
                    after.append(line)
                elif line.startswith("data: {"):
                    proc.send_signal(sig)
                    sent = True
    except httpx.TransportError as e:
        after.append(f"<transport error: {type(e).__name__}>")
    assert sent, "the stream sent no chunk"
    return after


@pytest.mark.slow  # ~15 s (a second server process); the drain itself is tested in-process in test_serve_ops.py
def test_sigterm_drains_the_running_stream_then_exits(server):
    proc, base, _, log = server
    after = _stream_until_signal(base, proc, signal.SIGTERM)
    # Chunks kept coming after SIGTERM, and the stream ended normally.
    events = [json.loads(x[6:]) for x in after if x.startswith("data: {")]
    assert events and [x for x in after if x][-1] == "data: [DONE]", after[-5:]
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    # uvicorn re-raises the signal once its graceful shutdown is done (so supervisors see it),
    # after running the lifespan shutdown (the engine is closed).
    assert proc.wait(60) == -signal.SIGTERM
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert any(x["message"] == "Application shutdown complete." for x in lines)
    assert any(x["message"] == "request" and x["status"] == 200 and x["stream"] for x in lines)  # JSON logs


@pytest.mark.parametrize("server", [{"shutdown_grace_s": 2, "max_tokens": 100000, "timeout_s": 600,
                                     "long_context": True}], indirect=True)
def test_past_the_grace_a_long_generation_is_cancelled_and_the_process_exits(server):
    """shutdown_grace_s is a promise: a generation still running when it ends is cancelled (it
    used to run to its end, minutes for a long answer, before the server could exit)."""
    import threading

    proc, base, _, log = server
    body = {"model": "tiny", "max_tokens": 100000, "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}]}
    answered = []

    def ask():  # not streamed: its generation is a task of its own inside the handler
        try:
            answered.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).status_code)
        except httpx.TransportError as e:
            answered.append(type(e).__name__)

    threading.Thread(target=ask, daemon=True).start()
    time.sleep(3)  # generating by now (greedy, the random tiny base never says its end token: minutes)
    assert not answered, answered
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM
    assert time.monotonic() - t < 2 + 15, log.read_text()[-3000:]  # the grace, then the cancelled batch ends


def test_sigkill_during_a_stream_leaves_the_registry_consistent(server, tiny_model_dir, tmp_path):
    proc, base, url, _ = server
    after = _stream_until_signal(base, proc, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert "data: [DONE]" not in after  # the stream really was cut
    db = url.removeprefix("sqlite:///")
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    reg = Registry(url)
    assert reg.resolve("bot@prod").ref == "bot:v1" and [v.ref for v in reg.versions("bot")] == ["bot:v1", "bot:v2"]
    # Writers work at once (no lock left behind), from this process and from a CLI process.
    assert reg.promote("bot:v2", "prod").startswith("bot@prod -> v2")
    r = subprocess.run([sys.executable, "-m", "tuneforge", "registry", "rollback", "bot", "--registry", url],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Registry(url).resolve("bot@prod").ref == "bot:v1"
    with Registry(url).engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head()
