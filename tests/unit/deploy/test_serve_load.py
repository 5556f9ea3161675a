"""Graceful degradation under load (admission.py): a request whose caller or client gives up
frees its batch row (its generation stops; the next request is served at once), a timeout is
a 504 (or the route's fallback), never a 500, and work that cannot finish within timeout_s is
refused up front with 503 + Retry-After."""

import asyncio
import time

import httpx
import pytest
from deploy_helpers import serve_in_thread
from fastapi.testclient import TestClient

from tuneforge.deploy import engines
from tuneforge.deploy.admission import Admission, Overloaded
from tuneforge.deploy.config import Route, ServeConfig
from tuneforge.deploy.engines import Chunk, GenRequest, LocalEngine, collect
from tuneforge.deploy.server import create_app
from tuneforge.registry.store import Registry

BASE = "tiny-base"
STEP_S = 0.03  # each generation step is slowed to this, so a long request runs for seconds
LONG = 300  # tokens: ~9 s at STEP_S, if nothing stops it


@pytest.fixture
def slow_steps(monkeypatch):
    put = engines._RowStreamer.put

    def slow_put(self, value):
        if self.started:
            time.sleep(STEP_S)
        put(self, value)

    monkeypatch.setattr(engines._RowStreamer, "put", slow_put)


def _req(tiny_model_dir, max_tokens, prompt="hello"):
    return GenRequest(adapter=BASE, adapter_dir=None, base_model=tiny_model_dir,
                      messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)


def _rows(engine, how):
    return [r for r in engine.admission.rows if r[2] == how]


def test_a_caller_that_times_out_frees_its_row(tiny_model_dir, slow_steps):
    async def scenario():
        engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1)
        await engine.load(_req(tiny_model_dir, 1))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(collect(engine.stream(_req(tiny_model_dir, LONG))), 0.6)
        t0 = time.monotonic()
        nxt = await asyncio.wait_for(collect(engine.stream(_req(tiny_model_dir, 4, "b c a"))), 30)
        took = time.monotonic() - t0
        await engine.close()
        return engine, nxt, took

    engine, nxt, took = asyncio.run(scenario())
    assert nxt.finish_reason in ("stop", "length") and nxt.completion_tokens > 0
    assert took < LONG * STEP_S / 3  # it did not wait for the abandoned request's 300 tokens
    [(_, tokens, _)] = _rows(engine, "cancelled")
    assert 0 < tokens < LONG / 3  # the abandoned row stopped soon after its caller left
    assert engine.admission.cancelled_rows == 1 and engine.admission.waiting == {}


@pytest.fixture
def served(tiny_model_dir, tmp_path):
    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1)
    app = create_app(ServeConfig(base_model=tiny_model_dir, base_name=BASE, max_tokens=LONG, timeout_s=30),
                     Registry(f"sqlite:///{tmp_path / 'r.db'}"), engine)
    with serve_in_thread(app) as url:
        yield url, engine


def _body(max_tokens, stream=False):
    return {"model": BASE, "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens,
            "stream": stream}


def _wait_for(cond, seconds=10):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_disconnected_clients_cancel_their_generation(served, slow_steps):
    url, engine = served
    assert httpx.post(f"{url}/v1/chat/completions", json=_body(2), timeout=30).status_code == 200  # loaded
    # A stream whose client goes away after its first chunk.
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body(LONG, stream=True), timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    _wait_for(lambda: len(_rows(engine, "cancelled")) == 1)
    # A JSON request whose client times out while it generates.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=_body(LONG), timeout=1.0)
    _wait_for(lambda: len(_rows(engine, "cancelled")) == 2)
    assert all(tokens < LONG / 2 for _, tokens, _ in _rows(engine, "cancelled"))
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=_body(4), timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < LONG * STEP_S / 3


class StallingEngine:
    """First chunk at once, then nothing (or nothing at all with ``at_once=False``)."""

    def __init__(self, at_once=True):
        self.at_once = at_once

    async def stream(self, req):
        if self.at_once:
            yield Chunk("partial ")
        await asyncio.sleep(30)
        yield Chunk("late", "stop")

    async def close(self):
        pass


def _chat(c, model):
    return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("at_once", [True, False])
def test_a_timeout_is_a_504_or_the_routes_fallback(tmp_path, at_once):
    records = []
    routes = {"safe": Route.model_validate({"arms": [{"name": "a", "target": BASE, "weight": 1}],
                                            "fallback": [{"reply": "busy, sorry"}]})}
    cfg = ServeConfig(base_model="x", base_name=BASE, timeout_s=0.3, routes=routes)
    c = TestClient(create_app(cfg, Registry(f"sqlite:///{tmp_path / 'r.db'}"), StallingEngine(at_once),
                              on_request=records.append))
    r = _chat(c, BASE)
    assert r.status_code == 504 and r.json()["error"]["code"] == 504 and records[-1].status == 504
    assert "timed out" in r.json()["error"]["message"]
    r = _chat(c, "safe")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "busy, sorry"
    assert "timed out" in r.json()["tuneforge"]["fallback"]


def test_admission_estimates_the_wait_and_refuses_what_cannot_finish():
    adm = Admission(max_batch=4, max_queue=100)
    adm.check(1000, budget_s=1)  # nothing measured yet: nothing refused on the estimate
    adm.observe(rows=1, steps=11, prefill_s=0.1, decode_s=1.0, max_tokens=11, cancelled=0)  # 0.1 s a step
    adm.check(8, budget_s=1)  # 0.8 s: admitted
    with pytest.raises(Overloaded) as e:
        adm.check(20, budget_s=1)  # 2 s
    assert e.value.retry_after == 1
    jobs = [type("Job", (), {"req": _Req(10)})() for _ in range(8)]
    for j in jobs:
        adm.add(j)
    with pytest.raises(Overloaded) as e:  # two batches ahead (4 prompts, 9 steps): 2 x 1.3 s, then its own 1 s
        adm.check(10, budget_s=2.5)
    assert e.value.retry_after == 2  # 3.6 s - 2.5 s, rounded up
    adm.check(10, budget_s=4)
    for j in jobs[:4]:
        adm.forget(j)  # their callers left
    adm.check(10, budget_s=2.5)
    full = Admission(max_batch=4, max_queue=2)
    full.add(jobs[0])
    full.add(jobs[1])
    with pytest.raises(Overloaded, match="queue is full"):
        full.check(1, budget_s=60)


class _Req:
    def __init__(self, max_tokens):
        self.max_tokens = max_tokens


def test_work_that_cannot_finish_in_time_gets_503_with_retry_after(tiny_model_dir, tmp_path, slow_steps):
    records = []
    routes = {"safe": Route.model_validate({"arms": [{"name": "a", "target": BASE, "weight": 1}],
                                            "fallback": [{"reply": "busy, sorry"}]})}
    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1)
    app = create_app(ServeConfig(base_model=tiny_model_dir, base_name=BASE, max_tokens=LONG, timeout_s=2,
                                 routes=routes), Registry(f"sqlite:///{tmp_path / 'r.db'}"), engine,
                     on_request=records.append)
    with TestClient(app) as c:
        body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=body | {"max_tokens": 8}).status_code == 200  # measured
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=body | {"max_tokens": LONG})  # ~9 s > timeout_s
        assert r.status_code == 503 and time.monotonic() - t0 < 1  # refused at once, not after 2 s
        assert int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["error"]["message"]
        assert records[-1].status == 503 and engine.admission.refused == 1
        r = c.post("/v1/chat/completions", json=body | {"model": "safe", "max_tokens": LONG})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "busy, sorry"
        assert c.post("/v1/chat/completions", json=body | {"max_tokens": 8}).status_code == 200
