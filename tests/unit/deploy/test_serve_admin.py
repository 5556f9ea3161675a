"""Admin endpoints and the local engine's adapter lifecycle: load/unload and alias changes at
run time (admin key only), an LRU bound that evicts and reloads, and an unload requested while
a request streams from that adapter, which must not fail it."""

import asyncio
import json
import threading

import httpx
import pytest
from deploy_helpers import fake_run, serve_in_thread
from fastapi.testclient import TestClient

from tuneforge.deploy import engines
from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.deploy.server import create_app
from tuneforge.registry.store import Registry


@pytest.fixture(scope="module")
def run_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("admin-runs")
    return [fake_run(tiny_model_dir, root / f"r{i}", seed=30 + i, score=0.5 + i / 10) for i in range(3)]


@pytest.fixture
def reg(tmp_path, run_dirs):
    r = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    for d in run_dirs[:2]:
        r.add(d, "bot")  # v1, v2; v3 is added while the server runs
    r.promote("bot:v1", "prod")
    return r


def _req(run_dirs, tiny_model_dir, i, prompt="hello", max_tokens=6):
    return GenRequest(adapter=f"bot:v{i + 1}", adapter_dir=str(run_dirs[i] / "adapter"), base_model=tiny_model_dir,
                      messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)


def test_lru_bound_evicts_least_recently_used_and_reloads_on_demand(run_dirs, tiny_model_dir):
    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1, max_adapters=2)

    async def scenario():
        out = {}
        for i in (0, 1, 0, 2):  # v1, v2, v1 again (now most recent), v3: v2 is the least recent
            out.setdefault(i, []).append((await collect(engine.stream(_req(run_dirs, tiny_model_dir, i)))).text)
        assert engine.resident() == ["bot:v1", "bot:v3"] and engine.evicted == ["bot:v2"]
        out[1].append((await collect(engine.stream(_req(run_dirs, tiny_model_dir, 1)))).text)  # reloads v2
        assert engine.resident() == ["bot:v3", "bot:v2"] and engine.evicted == ["bot:v2", "bot:v1"]
        # A batch needing more adapters than the bound keeps them all until it ends.
        batch = await asyncio.gather(*(collect(engine.stream(_req(run_dirs, tiny_model_dir, i))) for i in range(3)))
        await engine.close()
        return out, [c.text for c in batch]

    out, batch = asyncio.run(scenario())
    assert out[0][0] == out[0][1] and out[1][0] == out[1][1]  # reloaded adapters answer as before
    assert batch == [out[0][0], out[1][0], out[2][0]] and len(set(batch)) == 3
    assert len(engine.resident()) == 2


def _admin(c, path, key, **body):
    return c.post(f"/admin/{path}", json=body, headers={"Authorization": f"Bearer {key}"} if key else {})


def test_admin_endpoints_need_an_admin_key_and_change_things_live(reg, run_dirs, tiny_model_dir):
    _, admin = reg.create_key("ops", ["*"], admin=True)
    _, app_key = reg.create_key("app", ["bot"])
    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1)
    with TestClient(create_app(ServeConfig(), reg, engine)) as c:
        assert _admin(c, "adapters/load", None, model="bot:v1").status_code == 401
        assert _admin(c, "adapters/load", None, nonsense=1).status_code == 401  # the key is checked first
        r = _admin(c, "adapters/load", app_key, model="bot:v1")
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert _admin(c, "adapters/load", admin, model="bot:v7").status_code == 404
        assert _admin(c, "adapters/load", admin, modle="bot:v1").status_code == 400
        reg.add(run_dirs[2], "bot")  # a new version while the server runs
        r = _admin(c, "adapters/load", admin, model="bot:v3")
        assert r.status_code == 200 and "bot:v3" in r.json()["resident"]
        r = _admin(c, "adapters/unload", admin, model="bot:v2")
        assert r.json()["unloaded"] == "bot:v2" and "bot:v2" not in r.json()["resident"]
        assert _admin(c, "adapters/unload", admin, model="bot:v2").json()["unloaded"] is None
        listed = c.get("/admin/adapters", headers={"Authorization": f"Bearer {admin}"}).json()
        assert listed["resident"][-1] == "bot:v3" and listed["paths"] == {"bot:v1": "gathered", "bot:v3": "gathered"}
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        hdr = {"Authorization": f"Bearer {app_key}"}
        assert c.post("/v1/chat/completions", json={"model": "bot:v2", **chat}, headers=hdr).json()["model"] == "bot:v2"
        # Alias changes: the gate applies (v1 scores 0.5, v3 0.7; going back down needs force).
        assert c.post("/v1/chat/completions", json={"model": "bot", **chat}, headers=hdr).json()["model"] == "bot:v1"
        r = _admin(c, "aliases", admin, version="bot:v3", alias="prod")
        assert r.status_code == 200 and r.json()["result"].startswith("bot@prod -> v3")
        assert c.post("/v1/chat/completions", json={"model": "bot", **chat}, headers=hdr).json()["model"] == "bot:v3"
        r = _admin(c, "aliases", admin, version="bot:v1", alias="prod")
        assert r.status_code == 409 and "worse" in r.json()["error"]["message"]
        assert _admin(c, "aliases", admin, version="bot:v1", alias="prod", force=True).status_code == 200
        assert _admin(c, "aliases", admin, version="bot", alias="prod").status_code == 400
        assert _admin(c, "aliases", app_key, version="bot:v1", alias="prod").status_code == 403
    assert [h["to"] for h in reg.history("bot")] == [1, 3, 1]


def test_unload_and_load_while_a_request_streams_do_not_fail_it(reg, run_dirs, tiny_model_dir, monkeypatch):
    _, admin = reg.create_key("ops", ["*"], admin=True)
    engine = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=1)
    app = create_app(ServeConfig(), reg, engine)
    events, generating, release = [], threading.Event(), threading.Event()

    # Hold generation after its first token until both admin calls have reached the engine.
    put = engines._RowStreamer.put
    calls = {"n": 0}

    def held_put(self, value):
        calls["n"] += 1
        if calls["n"] == 3 and not release.is_set():
            generating.set()
            release.wait(10)
        put(self, value)

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            events.append(f"{name} start")
            try:
                return fn(*args, **kwargs)
            finally:
                events.append(f"{name} end")
        return wrapper

    # Note when each admin call reaches the engine (queued for its worker, which runs it after
    # the running batch).
    reached = {"unload": threading.Event(), "load": threading.Event()}
    on_worker = engine._on_worker

    async def arriving(fn, *args):
        reached["unload" if fn == engine._unload else "load"].set()
        return await on_worker(fn, *args)

    chat = {"model": "bot:v1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
    with serve_in_thread(app) as url:
        hdr = {"Authorization": f"Bearer {admin}"}
        reference = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=hdr, timeout=30).json()
        assert reference["usage"]["completion_tokens"] == 10  # long enough to be cut in the middle
        monkeypatch.setattr(engines._RowStreamer, "put", held_put)
        monkeypatch.setattr(engine, "_generate", recording("generate", engine._generate))
        monkeypatch.setattr(engine, "_delete", recording("delete", engine._delete))
        monkeypatch.setattr(engine, "_on_worker", arriving)
        admin_calls = {}

        def call(name, model):
            admin_calls[name] = httpx.post(f"{url}/admin/adapters/{name}", json={"model": model}, headers=hdr,
                                           timeout=30).json()

        def admin_ops():
            # While the batch is held mid-generation: unload its adapter and load another one.
            generating.wait(10)
            calls_ = [threading.Thread(target=call, args=("unload", "bot:v1")),
                      threading.Thread(target=call, args=("load", "bot:v2"))]
            for t in calls_:
                t.start()
            assert reached["unload"].wait(10) and reached["load"].wait(10)
            release.set()
            for t in calls_:
                t.join(10)

        ops = threading.Thread(target=admin_ops)
        ops.start()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat | {"stream": True}, headers=hdr,
                          timeout=30) as r:
            lines = list(r.iter_lines())
        ops.join(10)
    assert release.is_set() and not ops.is_alive()
    assert [x for x in lines if x][-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert not any("error" in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        reference["choices"][0]["message"]["content"]
    # The unload waited for the batch: the adapter was deleted only after generation ended.
    assert events.index("generate end") < events.index("delete start")
    assert events.count("generate start") == 1  # the streamed request was not re-run
    assert admin_calls["unload"]["unloaded"] == "bot:v1" and admin_calls["load"]["loaded"] == "bot:v2"
    assert "bot:v1" not in engine.resident() and "bot:v2" in engine.resident()
    asyncio.run(engine.close())
