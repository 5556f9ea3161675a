"""Operations and error handling of the gateway: /healthz, /readyz, /metrics, JSON logs,
every error status in OpenAI's shape (through the official openai client), output guards as
fallback triggers, (The schema fuzz is in test_serve_fuzz.py.)"""

import asyncio
import io
import json
import logging
import logging.config
import threading
import time

import httpx
import pytest
import uvicorn
from deploy_helpers import fake_run, free_port, serve_in_thread
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from tuneforge.deploy.config import Route, ServeConfig
from tuneforge.deploy.engines import Chunk, LocalEngine
from tuneforge.deploy.logs import log_config
from tuneforge.deploy.server import create_app
from tuneforge.registry.store import Registry


class ScriptedEngine:
    """Answers each version with a fixed text; ``load`` waits until ``release`` is set.
    It takes response_format's grammar (else the server refuses json requests with a 400) and
    ignores it: its scripted texts are what a guard must catch."""

    SUPPORTS = frozenset({"response_format"})

    def __init__(self, outputs: dict[str, str], fail=()):
        self.outputs, self.fail = outputs, set(fail)
        self.release = threading.Event()
        self.release.set()

    async def load(self, req):
        await asyncio.to_thread(self.release.wait, 10)

    async def stream(self, req):
        if req.adapter in self.fail:
            raise RuntimeError("adapter exploded")
        text = self.outputs.get(req.adapter, f"served by {req.adapter}")
        half = len(text) // 2
        yield Chunk(text[:half])
        yield Chunk(text[half:], "stop", prompt_tokens=4, completion_tokens=max(1, len(text) // 3))

    async def close(self):
        pass


@pytest.fixture(scope="module")
def run_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ops-runs")
    return [fake_run(tiny_model_dir, root / f"r{i}", seed=20 + i, score=0.5 + i / 10) for i in range(3)]


@pytest.fixture
def reg(tmp_path, run_dirs):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    for d in run_dirs:
        r.add(d, "bot")  # v1, v2, v3
    r.promote("bot:v1", "prod")
    return r


def _chat(c, model, **body):
    return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                **body})


def _metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_healthz_at_once_readyz_once_models_are_loaded(reg):
    engine = ScriptedEngine({})
    engine.release.clear()  # preloading blocks until the test lets it finish
    with TestClient(create_app(ServeConfig(), reg, engine)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        engine.release.set()
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.02)
        assert c.get("/readyz").json()["status"] == "ready"


def test_metrics_count_requests_tokens_and_fallbacks_by_label(reg):
    route = Route.model_validate({"arms": [{"name": "only", "target": "bot@prod", "weight": 1}],
                                  "fallback": ["bot:v2"]})
    c = TestClient(create_app(ServeConfig(routes={"bot-m": route}), reg, ScriptedEngine({}, fail={"bot:v1"})))
    ok = dict(endpoint="chat", route="", version="bot:v3", arm="", status="200")
    before = (_metric("tuneforge_requests_total", **ok), _metric("tuneforge_completion_tokens_total", version="bot:v3"),
              _metric("tuneforge_fallbacks_total", route="bot-m", reason="error"),
              _metric("tuneforge_request_latency_seconds_count", **ok))
    assert _chat(c, "bot:v3").status_code == 200
    assert _chat(c, "bot:v3").status_code == 200
    body = _chat(c, "bot-m").json()
    assert body["model"] == "bot:v2"  # v1 failed, v2 took over
    assert _chat(c, "nobody").status_code == 404
    after = (_metric("tuneforge_requests_total", **ok), _metric("tuneforge_completion_tokens_total", version="bot:v3"),
             _metric("tuneforge_fallbacks_total", route="bot-m", reason="error"),
             _metric("tuneforge_request_latency_seconds_count", **ok))
    assert after[0] - before[0] == 2 and after[3] - before[3] == 2
    assert after[1] - before[1] == 2 * len("served by bot:v3") // 3
    assert after[2] - before[2] == 1
    page = c.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert 'tuneforge_requests_total{arm="only",endpoint="chat",route="bot-m",status="200",version="bot:v2"}' in page.text
    assert 'status="404"' in page.text and "tuneforge_resident_adapters" in page.text


@pytest.fixture
def json_logs():
    """Route the server's loggers to a buffer through the JSON config `tuneforge serve` uses."""
    cfg = log_config("json")
    cfg["handlers"]["default"]["stream"] = buf = io.StringIO()
    logging.config.dictConfig(cfg)
    yield buf
    for name in ("tuneforge", "uvicorn", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()


def test_json_logs_carry_request_ids_and_fallback_reasons(reg, json_logs):
    route = Route.model_validate({"arms": [{"name": "only", "target": "bot@prod", "weight": 1}],
                                  "fallback": ["bot:v2"]})
    c = TestClient(create_app(ServeConfig(routes={"bot-m": route}), reg, ScriptedEngine({}, fail={"bot:v1"})))
    r = _chat(c, "bot-m")
    rid = r.headers["x-request-id"]
    assert rid == r.json()["id"]
    lines = [json.loads(x) for x in json_logs.getvalue().splitlines()]
    done = [x for x in lines if x["message"] == "request"]
    assert done[-1]["request_id"] == rid and done[-1]["version"] == "bot:v2" and done[-1]["status"] == 200
    assert "adapter exploded" in done[-1]["fallback_reason"] and done[-1]["level"] == "INFO"
    fallback = [x for x in lines if x["message"] == "fallback"]
    assert fallback[-1]["request_id"] == rid and fallback[-1]["reason"] == "error"
    r = _chat(c, "nobody")
    assert r.headers["x-request-id"] == json.loads(json_logs.getvalue().splitlines()[-1])["request_id"]
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 7, extra={"color_message": "\x1b[36m"})
    assert json.loads(json_logs.getvalue().splitlines()[-1]) | {"time": 0} == {
        "time": 0, "level": "INFO", "logger": "uvicorn.error", "message": "Started server process [7]"}


GUARDED = {"arms": [{"name": "a", "target": "bot@prod", "weight": 1}],
           "fallback": ["bot:v2", "bot:v3", {"reply": "Sorry, I cannot answer that."}],
           "guards": {"empty": True, "json_object": True, "blocklist": ["(?i)password"]}}


def test_output_guards_move_down_the_chain_to_a_fixed_reply(reg):
    records = []
    route = Route.model_validate(GUARDED)
    engine = ScriptedEngine({"bot:v1": "  ", "bot:v2": "not json", "bot:v3": '{"answer": 42}'})
    c = TestClient(create_app(ServeConfig(routes={"g": route}), reg, engine, on_request=records.append))
    before = _metric("tuneforge_fallbacks_total", route="g", reason="guard_empty")
    # Plain text asked: v1's empty output fails, v2's text passes (the JSON guard needs a JSON request).
    body = _chat(c, "g").json()
    assert body["model"] == "bot:v2" and body["choices"][0]["message"]["content"] == "not json"
    assert "bot@prod: guard empty" in records[-1].fallback_reason
    assert _metric("tuneforge_fallbacks_total", route="g", reason="guard_empty") - before == 1
    # JSON asked: v2 is not JSON, v3 is.
    body = _chat(c, "g", response_format={"type": "json_object"}).json()
    assert body["model"] == "bot:v3" and json.loads(body["choices"][0]["message"]["content"]) == {"answer": 42}
    assert "bot:v2: guard json_object" in body["tuneforge"]["fallback"] and records[-1].json_requested
    # Every target fails a guard: the fixed reply answers.
    engine.outputs["bot:v3"] = '{"password": "hunter2"}'
    body = _chat(c, "g", response_format={"type": "json_object"}).json()
    assert body["model"] == "fixed-reply" and body["choices"][0]["message"]["content"] == "Sorry, I cannot answer that."
    assert "blocklist" in records[-1].fallback_reason and records[-1].version == "fixed-reply"
    # Streaming with guards: the checked output is sent as one chunk after the fallbacks.
    with c.stream("POST", "/v1/chat/completions", json={"model": "g", "stream": True,
                                                        "messages": [{"role": "user", "content": "hi"}]}) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "not json"
    assert events[0]["model"] == "bot:v2" and "guard empty" in events[0]["tuneforge"]["fallback"]


def test_guard_config_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a regular expression"):
        Route.model_validate({"arms": [{"name": "a", "target": "x", "weight": 1}], "guards": {"blocklist": ["("]}})
    with pytest.raises(ValidationError, match="only be the last fallback"):
        Route.model_validate({"arms": [{"name": "a", "target": "x", "weight": 1}],
                              "fallback": [{"reply": "no"}, "x:v2"]})


def test_every_error_status_has_openai_error_body(reg, tiny_model_dir):
    openai = pytest.importorskip("openai")
    _, key = reg.create_key("app", ["bot"], requests_per_minute=3)
    _, other = reg.create_key("other", ["elsewhere"])
    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1, max_prompt_tokens=40)
    app = create_app(ServeConfig(max_request_bytes=4000), reg, engine)
    msgs = [{"role": "user", "content": "hello"}]
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

        def refused(exc_type, status, **kwargs):
            with pytest.raises(exc_type) as e:
                (kwargs.pop("via", client)).chat.completions.create(**({"model": "bot", "messages": msgs,
                                                                        "max_tokens": 2} | kwargs))
            err = e.value
            assert err.status_code == status and err.body["code"] == status
            assert err.body["message"] and err.body["type"], err.body
            return err.body

        assert "temperature" in refused(openai.BadRequestError, 400, temperature=7)["message"]
        assert "messages" in refused(openai.BadRequestError, 400, messages=[])["message"]
        refused(openai.AuthenticationError, 401, via=openai.OpenAI(base_url=f"{url}/v1", api_key="tf-no", max_retries=0))
        assert refused(openai.PermissionDeniedError, 403, via=openai.OpenAI(
            base_url=f"{url}/v1", api_key=other, max_retries=0))["type"] == "permission_error"
        assert refused(openai.NotFoundError, 404, model="bot:v9")["type"] == "not_found_error"
        body = refused(openai.APIStatusError, 413, messages=[{"role": "user", "content": "x" * 5000}])
        assert "max_request_bytes" in body["message"]
        body = refused(openai.APIStatusError, 413, messages=[{"role": "user", "content": "apples " * 60}])
        assert "max_prompt_tokens" in body["message"]
        # The key allows 3 requests a minute. Refused before the key check (400: bad body, 413:
        # too many bytes) they do not count; the 404 and the too-long prompt did, this is the 3rd.
        assert client.chat.completions.create(model="bot", messages=msgs, max_tokens=2).model == "bot:v1"
        assert refused(openai.RateLimitError, 429)["type"] == "rate_limit_error"
    asyncio.run(engine.close())


class SlowEngine:
    """Streams ten chunks 50 ms apart."""

    async def stream(self, req):
        for i in range(10):
            await asyncio.sleep(0.05)
            yield Chunk(f"w{i} ", "stop" if i == 9 else None, 3, 10)

    async def close(self):
        pass


def test_graceful_shutdown_lets_a_running_stream_finish(reg):
    port = free_port()
    # What `tuneforge serve` passes to uvicorn; should_exit is what its SIGTERM handler sets.
    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(), reg, SlowEngine()), host="127.0.0.1",
                                           port=port, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    body = {"model": "bot:v1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    after = []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if server.should_exit:
                after.append(line)
            elif line.startswith("data: {"):
                server.should_exit = True  # shut down while the stream has 9 chunks to go
    thread.join(30)
    assert not thread.is_alive()
    chunks = [json.loads(x[6:]) for x in after if x.startswith("data: {")]
    # the 9 text chunks still to go, then OpenAI's finish chunk (empty delta, finish_reason)
    assert len(chunks) == 10 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert [x for x in after if x][-1] == "data: [DONE]"
    with pytest.raises(httpx.ConnectError):  # and it stopped accepting
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_body_limit_spares_file_uploads(reg, tmp_path):
    cfg = ServeConfig(max_request_bytes=200, jobs={"home": str(tmp_path)})
    c = TestClient(create_app(cfg, reg, ScriptedEngine({})))
    big = {"model": "bot:v1", "messages": [{"role": "user", "content": "x" * 300}]}
    assert c.post("/v1/chat/completions", json=big).status_code == 413
    # /v1/files has its own limit (jobs.max_file_mb): a 300-byte upload is judged by that route
    r = c.post("/v1/files", files={"file": ("a.jsonl", b"y" * 300)}, data={"purpose": "fine-tune"})
    assert r.status_code != 413, r.text


@pytest.mark.parametrize("length", ["9" * 19, "1" + "0" * 5000])
def test_absurd_content_length_is_a_413_not_a_500(length):
    import asyncio

    from tuneforge.deploy.server import BodyLimit

    async def never(scope, receive, send):
        raise AssertionError("the app must not be reached")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST",
             "headers": [(b"content-length", length.encode())]}
    asyncio.run(BodyLimit(never, 1000)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert b"max_request_bytes" in b"".join(m.get("body", b"") for m in sent)
