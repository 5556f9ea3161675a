"""The Playground through the server app (TestClient, a fake engine that streams in pieces):
the page lists the models the key may call, exactly as GET /v1/models does; /ui/api/chat is
/v1/chat/completions with the dashboard's cookie as the key (SSE stream, scope, refusals of
fields that cannot be honoured, admission, one rate-limit count per request)."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.unit.ui.conftest import make_run
from tuneforge.deploy.admission import Overloaded
from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import Chunk
from tuneforge.ui.app import COOKIE, create_ui_app

PIECES = ["Hello", " from", " the", " model"]


class PiecesEngine:
    """Streams PIECES then the adapter's name, one chunk each; ``full`` makes admission refuse."""

    def __init__(self):
        self.seen, self.full = [], False

    def admit(self, req, budget_s):
        if self.full:
            raise Overloaded("the queue is full (3 requests waiting, engine.max_queue)", 2)

    async def stream(self, req):
        self.seen.append(req)
        for p in PIECES:
            yield Chunk(p)
        yield Chunk(f" ({req.adapter})", "stop", prompt_tokens=7, completion_tokens=5)

    async def close(self):
        pass


@pytest.fixture
def engine():
    return PiecesEngine()


@pytest.fixture
def app(tmp_path, runs_dir, registry, engine):
    for name in ("bot", "other"):
        d = make_run(tmp_path / "reg-runs", name)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x")  # the fake engine loads nothing
        registry.add(d, name)
    registry.promote("bot:v1", "prod", force=True)
    cfg = ServeConfig.model_validate({"base_model": "tiny-base", "requests_per_minute": 4,
                                      "jobs": {"enabled": False}})
    return create_ui_app(cfg, registry, engine, runs_dir=runs_dir)


def logged_in(app, token) -> TestClient:
    c = TestClient(app)
    r = c.post("/ui/login", data={"key": token, "next": "/ui/playground"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["set-cookie"].lower().count("path=/ui") == 1
    return c


def ask(c, model="bot", **extra):
    return c.post("/ui/api/chat", json={"model": model, "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}], **extra})


def sse(r) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else None
            for line in r.text.split("\n\n") if line.startswith("data: ")]


def test_the_page_lists_exactly_the_models_of_the_key(app, registry):
    _, key = registry.create_key("app", ["bot", "tiny-base"])
    c = logged_in(app, key)
    page = c.get("/ui/playground")
    listed = re.findall(r'<option value="([^"]+)"', page.text.split('<template id="pg-column">')[0])
    v1 = [m["id"] for m in c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]]
    assert page.status_code == 200 and 'href="/ui/playground" class="on"' in page.text
    # two columns to start: the base model and the first other model, each listing every model
    assert listed == v1 + v1 and set(v1) == {"tiny-base", "bot", "bot@prod", "bot:v1"}
    assert re.findall(r'<option value="([^"]+)" selected', page.text) == ["tiny-base", "bot"]
    assert "other" not in page.text and "/ui/static/playground.js" in page.text
    assert c.get("/ui/static/playground.js").status_code == 200
    _, nothing = registry.create_key("none", ["elsewhere"])
    assert 'id="empty"' in logged_in(app, nothing).get("/ui/playground").text


def test_chat_streams_sse_chunks_with_the_cookie_key(app, registry, engine):
    _, key = registry.create_key("app", ["bot", "tiny-base"])
    c = logged_in(app, key)
    r = ask(c, "bot@prod", stream_options={"include_usage": True}, max_tokens=9)
    events = sse(r)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-tuneforge-version"] == "bot:v1" and events[-1] is None  # [DONE]
    deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
    assert [d for d in deltas if d] == [*PIECES, " (bot:v1)"]  # one event per engine chunk: streamed
    assert events[-2]["usage"]["completion_tokens"] == 5
    assert engine.seen[-1].max_tokens == 9 and engine.seen[-1].messages[-1]["content"] == "hi"
    base = sse(ask(c, "tiny-base"))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in base[:-1]).endswith("(tiny-base)")


def test_chat_refuses_what_v1_refuses(app, registry, engine):
    _, key = registry.create_key("app", ["bot"])
    c = logged_in(app, key)
    other = ask(c, "other")
    assert other.status_code == 403 and "may not call 'other'" in other.json()["error"]["message"]
    assert ask(c, "nobody").status_code == 403  # out of scope before it is looked up: no existence leak
    headers = {"Authorization": f"Bearer {key}"}
    for extra in ({"presence_penalty": 0.5}, {"reasoning_effort": "high"}, {"temperature_x": 1}):
        ui = ask(c, **extra)
        v1 = TestClient(app).post("/v1/chat/completions", headers=headers,
                                  json={"model": "bot", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                                        **extra})
        assert ui.status_code == v1.status_code == 400
        assert ui.json()["error"]["message"] == v1.json()["error"]["message"]
        assert next(iter(extra)) in ui.json()["error"]["message"]  # refused by name
    assert ask(TestClient(app)).status_code == 401  # no cookie, no key
    assert engine.seen == []


def test_chat_goes_through_admission_and_counts_once_against_the_rate(app, registry, engine):
    _, key = registry.create_key("app", ["bot"], requests_per_minute=3)
    c = TestClient(app)
    c.cookies.set(COOKIE, key)  # as the login would leave it, without spending a request of the rate
    engine.full = True
    full = ask(c)
    assert full.status_code == 503 and full.headers["retry-after"] == "2" and "queue is full" in full.text
    engine.full = False
    assert [ask(c).status_code for _ in range(3)] == [200, 200, 429]  # 3 a minute: the 4th request
