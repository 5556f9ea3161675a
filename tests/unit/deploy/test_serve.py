"""The gateway with a fake engine: registry routing, keys, rate limits, A/B arms, fallbacks,
streaming and the per-request hook. (Real engines are tested in test_engines.py.)"""

import asyncio
import json
import random

import pytest
from deploy_helpers import fake_run
from fastapi.testclient import TestClient

from tuneforge.deploy.config import Route, ServeConfig
from tuneforge.deploy.engines import Chunk
from tuneforge.deploy.routing import RateLimiter, pick_arm, plan
from tuneforge.deploy.server import create_app
from tuneforge.registry.store import Registry


class FakeEngine:
    def __init__(self, fail=(), hang=()):
        self.fail, self.hang, self.seen = set(fail), set(hang), []

    async def stream(self, req):
        self.seen.append(req)
        if req.adapter in self.fail:
            raise RuntimeError("adapter exploded")
        if req.adapter in self.hang:
            await asyncio.sleep(30)
        yield Chunk("served by ")
        yield Chunk(req.adapter, "stop", prompt_tokens=5, completion_tokens=3)

    async def close(self):
        pass


@pytest.fixture(scope="module")
def run_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    return [fake_run(tiny_model_dir, root / f"r{i}", seed=i, score=0.5 + i / 10, system_prompt="Be brief.")
            for i in range(3)]


@pytest.fixture
def reg(tmp_path, run_dirs):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    for d in run_dirs:
        r.add(d, "bot")  # v1, v2, v3
    r.promote("bot:v1", "prod")
    return r


ROUTES = {"bot-ab": Route.model_validate({"arms": [{"name": "control", "target": "bot@prod", "weight": 0.8},
                                                    {"name": "candidate", "target": "bot:v2", "weight": 0.2}],
                                          "fallback": ["bot:v3"]})}


def client(reg, engine=None, records=None, **cfg):
    app = create_app(ServeConfig(routes=ROUTES, **cfg), reg, engine or FakeEngine(),
                     on_request=records.append if records is not None else None)
    return TestClient(app)


def chat(c, model, key=None, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return c.post("/v1/chat/completions", headers=headers,
                  json={"model": model, "messages": [{"role": "user", "content": "hi"}], **body})


def test_model_names_resolve_through_the_registry_live(reg):
    engine = FakeEngine()
    c = client(reg, engine)
    r = chat(c, "bot")
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "served by bot:v1"
    assert body["model"] == "bot:v1" and body["tuneforge"]["version"] == "bot:v1"
    assert r.headers["x-tuneforge-version"] == "bot:v1"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert engine.seen[-1].system_prompt == "Be brief." and engine.seen[-1].adapter_dir.endswith("r0/adapter")
    assert chat(c, "bot:v3").json()["model"] == "bot:v3"
    reg.promote("bot:v2", "prod")  # no restart: the next request follows the alias
    assert chat(c, "bot@prod").json()["model"] == "bot:v2"
    reg.rollback("bot", "prod")
    assert chat(c, "bot").json()["model"] == "bot:v1"
    r = c.post("/v1/completions", json={"model": "bot:v2", "prompt": "Once"})
    assert r.json()["choices"][0]["text"] == "served by bot:v2" and r.json()["object"] == "text_completion"
    assert chat(c, "nobody").status_code == 404
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert {"bot-ab", "bot", "bot@prod", "bot:v1", "bot:v3"} <= set(ids)


def test_keys_scope_revoke_and_rate_limit(reg):
    c = client(reg)
    assert chat(c, "bot").status_code == 200  # auth optional and no keys yet: open
    kid, key = reg.create_key("app1", ["bot"], requests_per_minute=3)
    other_id, other = reg.create_key("app2", ["elsewhere"])
    assert chat(c, "bot").status_code == 401  # keys exist now: a key is needed
    assert chat(c, "bot", key="tf-wrong").status_code == 401
    assert chat(c, "bot", key=key).status_code == 200
    r = chat(c, "bot", key=other)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert [m["id"] for m in c.get("/v1/models", headers={"Authorization": f"Bearer {other}"}).json()["data"]] == []
    assert chat(c, "bot:v2", key=key).status_code == 200
    assert chat(c, "bot", key=key).status_code == 200
    assert chat(c, "bot", key=key).status_code == 429  # the 4th request within a minute
    reg.revoke_key(other_id)
    assert chat(c, "bot", key=other).status_code == 401
    reg.revoke_key(kid)
    assert chat(c, "bot", key=key).status_code == 401


def test_auth_required_refuses_without_keys(reg):
    assert chat(client(reg, auth="required"), "bot").status_code == 401


def test_rate_limiter_window():
    now = [0.0]
    lim = RateLimiter(clock=lambda: now[0])
    assert [lim.allow(1, 2) for _ in range(3)] == [True, True, False]
    assert lim.allow(2, 2)  # per key
    now[0] = 60.0
    assert lim.allow(1, 2)


def test_ab_weights_are_respected_and_arms_are_sticky(reg):
    route = ROUTES["bot-ab"]
    rng = random.Random(0)
    users = [f"user-{rng.getrandbits(64)}" for _ in range(4000)]
    share = sum(pick_arm("bot-ab", route, u).name == "candidate" for u in users) / len(users)
    assert abs(share - 0.2) < 0.02, share
    assert len({pick_arm("bot-ab", route, "alice").name for _ in range(20)}) == 1
    # Through the server: the arm field and the version that served it agree, per user.
    c = client(reg)
    seen = {}
    for u in users[:60]:
        body = chat(c, "bot-ab", user=u).json()
        seen[u] = body["tuneforge"]["arm"]
        assert body["model"] == {"control": "bot:v1", "candidate": "bot:v2"}[seen[u]]
        assert seen[u] == pick_arm("bot-ab", route, u).name
    assert set(seen.values()) == {"control", "candidate"}
    assert plan("bot-ab", ROUTES, users[0]).targets[-1] == "bot:v3"
    # No user field, no key: a session header keeps the arm; without it each request draws afresh.
    for session in users[:8]:
        arms = {c.post("/v1/chat/completions", headers={"X-Session-Id": session},
                       json={"model": "bot-ab", "messages": [{"role": "user", "content": "hi"}]}).json()["tuneforge"]["arm"]
                for _ in range(3)}
        assert arms == {pick_arm("bot-ab", route, session).name}


def test_fallback_on_error_and_on_timeout_is_taken_and_recorded(reg):
    records = []
    c = client(reg, FakeEngine(fail={"bot:v1"}), records)
    user = next(u for u in (f"u{i}" for i in range(100)) if pick_arm("bot-ab", ROUTES["bot-ab"], u).name == "control")
    r = chat(c, "bot-ab", user=user)
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "bot:v3" and body["tuneforge"]["arm"] == "control"
    assert "bot@prod: RuntimeError: adapter exploded" in body["tuneforge"]["fallback"]
    assert "adapter exploded" in r.headers["x-tuneforge-fallback"]
    rec = records[-1]
    assert (rec.version, rec.arm, rec.route, rec.status) == ("bot:v3", "control", "bot-ab", 200)
    assert rec.completion_tokens == 3 and rec.latency_s > 0 and "exploded" in rec.fallback_reason

    c = client(reg, FakeEngine(hang={"bot:v1"}), records, timeout_s=0.3)
    body = chat(c, "bot-ab", user=user).json()
    assert body["model"] == "bot:v3" and "timed out" in body["tuneforge"]["fallback"]

    c = client(reg, FakeEngine(fail={"bot:v1", "bot:v3"}), records)
    r = chat(c, "bot-ab", user=user)
    assert r.status_code == 503 and records[-1].status == 503
    assert chat(c, "bot:v1").status_code == 503  # no chain for a plain name: the error is reported


def test_streaming_chat_sends_sse_chunks_with_version(reg):
    records = []
    c = client(reg, records=records)
    with c.stream("POST", "/v1/chat/completions",
                  json={"model": "bot:v2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.headers["x-tuneforge-version"] == "bot:v2"
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(x[6:]) for x in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "served by bot:v2"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(e["tuneforge"]["version"] == "bot:v2" for e in events)
    assert records[-1].stream and records[-1].completion_tokens == 3


def test_example_serve_yaml_is_valid_and_bad_keys_are_reported(tmp_path):
    from pathlib import Path

    from tuneforge.config import ConfigError
    from tuneforge.deploy.config import load_serve_config

    cfg = load_serve_config(Path(__file__).parents[3] / "examples" / "serve.yaml")
    assert cfg.host == "127.0.0.1" and cfg.routes["support-bot-ab"].arms[1].weight == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {kind: vllm}\nroutes: {x: {arms: []}}\ntimout_s: 3\n")
    with pytest.raises(ConfigError) as e:
        load_serve_config(bad)
    text = str(e.value)
    assert "timeout_s" in text and "engine" in text and "arms" in text


def test_cut_at_stop_catches_a_stop_string_split_across_chunks():
    from tuneforge.deploy.engines import cut_at_stop

    async def chunks():
        for c in [Chunk("Hello wo"), Chunk("rld. EN"), Chunk("D more"), Chunk("", "length", 7, 9)]:
            yield c

    async def run(stops):
        return [c async for c in cut_at_stop(chunks(), stops)]

    out = asyncio.run(run(["END", "zzz"]))
    assert "".join(c.text for c in out) == "Hello world. "
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens == 9  # counts read to the end
    out = asyncio.run(run(["nowhere"]))
    assert "".join(c.text for c in out) == "Hello world. END more" and out[-1].finish_reason == "length"


def test_stop_and_seed_reach_the_answer_and_the_engine(reg):
    engine = FakeEngine()
    c = client(reg, engine=engine)
    r = chat(c, "bot:v2", stop=" by", seed=7, temperature=0.5)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "served" and choice["finish_reason"] == "stop"
    assert engine.seen[-1].seed == 7
    with c.stream("POST", "/v1/chat/completions", json={"model": "bot:v2", "stream": True, "stop": ["v2"],
                                                        "messages": [{"role": "user", "content": "hi"}]}) as s:
        events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "served by bot:"
    bad = chat(c, "bot:v2", stop=["a", "b", "c", "d", "e"])
    assert bad.status_code == 400 and "stop" in bad.json()["error"]["message"]
