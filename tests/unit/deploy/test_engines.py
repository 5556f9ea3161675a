"""Engines for real: the local engine's mixed-adapter batches give what each adapter gives
alone; the vLLM engine speaks to an OpenAI-style HTTP server; the official openai client
talks to the gateway over a real socket on 127.0.0.1."""

import asyncio
import json
import threading

import pytest
from deploy_helpers import fake_run
from deploy_helpers import serve_in_thread as _serve
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.deploy.server import create_app
from tuneforge.deploy.vllm_engine import VLLMEngine
from tuneforge.registry.store import Registry

PROMPTS = ["2 apples and 3 pears", "hello", "one box of nails, please", "b c a"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-runs")
    return [fake_run(tiny_model_dir, root / f"r{i}", seed=10 + i) for i in range(3)]


def _req(runs, i, prompt, tiny_model_dir, max_tokens=8):
    return GenRequest(adapter=f"bot:v{i + 1}", adapter_dir=str(runs[i] / "adapter"), base_model=tiny_model_dir,
                      messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)


async def _run_all(engine, reqs):
    out = await asyncio.gather(*(collect(engine.stream(r)) for r in reqs))
    await engine.close()
    return out


def test_mixed_adapter_batch_equals_one_adapter_at_a_time(runs, tiny_model_dir):
    reqs = [_req(runs, i % 3, p, tiny_model_dir) for i, p in enumerate(PROMPTS * 2)]
    alone = LocalEngine("cpu", "fp32", max_batch=1)
    singles = asyncio.run(_run_all(alone, reqs))
    assert all(len(b) == 1 for b in alone.batches)
    mixed = LocalEngine("cpu", "fp32", max_batch=16, batch_wait_ms=300)
    batched = asyncio.run(_run_all(mixed, reqs))
    assert max(len(set(b)) for b in mixed.batches) == 3  # one forward pass served three adapters
    assert [c.text for c in batched] == [c.text for c in singles]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in singles]
    assert all(c.finish_reason in ("stop", "length") and c.prompt_tokens > 0 for c in batched)
    # Different adapters really do answer differently (else the comparison above proves little).
    assert len({c.text for c in singles[:3]}) > 1 or len({c.completion_tokens for c in singles[:3]}) > 1


def _fake_vllm(seen: list) -> FastAPI:
    """The slice of vLLM's OpenAI API the engine uses: streamed chat and text completions."""
    app = FastAPI()

    async def answer(request: Request):
        body = await request.json()
        seen.append(body)
        chat = "messages" in body

        def events():
            if body.get("tools"):  # a vLLM with a tool parser: the call comes as tool_call deltas
                fn = body["tools"][0]["function"]["name"]
                for delta in [{"tool_calls": [{"index": 0, "id": "x", "type": "function",
                                               "function": {"name": fn, "arguments": ""}}]},
                              {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                              {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}]:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta, 'finish_reason': None}]})}\n\n"
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'tool_calls'}]})}\n\n"
                yield "data: [DONE]\n\n"
                return
            for word in ["hi ", "from ", body["model"]]:
                choice = {"index": 0, "finish_reason": None} | ({"delta": {"content": word}} if chat else {"text": word})
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'length'}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 7, 'completion_tokens': 3}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.post("/v1/chat/completions")(answer)
    app.post("/v1/completions")(answer)
    return app


def test_vllm_engine_forwards_to_an_openai_compatible_server(runs, tmp_path):
    seen = []
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    reg.add(runs[0], "bot")
    with _serve(_fake_vllm(seen)) as url:
        from fastapi.testclient import TestClient

        # One TestClient context = one event loop, as under uvicorn (the engine pools connections per loop).
        with TestClient(create_app(ServeConfig(), reg, VLLMEngine(url))) as c:
            body = c.post("/v1/chat/completions", json={"model": "bot", "messages": [{"role": "user", "content": "x"}],
                                                        "max_tokens": 3}).json()
            assert body["choices"][0]["message"]["content"] == "hi from bot:v1"
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["prompt_tokens"] == 7
            assert seen[-1]["model"] == "bot:v1" and seen[-1]["max_tokens"] == 3 and seen[-1]["stream"]
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
            r = c.post("/v1/chat/completions", json={"model": "bot", "messages": [{"role": "user", "content": "x"}],
                                                     "logprobs": True, "top_logprobs": 2, "response_format": fmt})
            assert r.status_code == 200, r.text
            assert seen[-1]["logprobs"] is True and seen[-1]["top_logprobs"] == 2  # vLLM computes them
            assert seen[-1]["response_format"] == fmt  # and enforces the schema itself
            n_seen = len(seen)
            r = c.post("/v1/chat/completions", json={"model": "bot", "messages": [{"role": "user", "content": "x"}],
                                                     "tools": [{"type": "function", "function": {"name": "f"}}]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and len(seen) == n_seen
            body = c.post("/v1/completions", json={"model": "bot:v1", "prompt": "Once"}).json()
        assert body["choices"][0]["text"] == "hi from bot:v1" and seen[-1]["prompt"] == "Once"


def test_vllm_with_a_tool_parser_gets_tools_passed_through(runs, tmp_path):
    seen = []
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    reg.add(runs[0], "bot")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with _serve(_fake_vllm(seen)) as url:
        with TestClient(create_app(ServeConfig(), reg, VLLMEngine(url, tools=True))) as c:
            body = c.post("/v1/chat/completions", json={"model": "bot", "messages": [{"role": "user", "content": "x"}],
                                                        "tools": tools, "tool_choice": "required"}).json()
    assert seen[-1]["tools"] == tools and seen[-1]["tool_choice"] == "required"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", body
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_openai_client_against_the_gateway_on_localhost(runs, tiny_model_dir, tmp_path):
    openai = pytest.importorskip("openai")
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    for r in runs[:2]:
        reg.add(r, "bot")
    reg.promote("bot:v2", "prod")
    _, key = reg.create_key("app", ["bot"])
    records = []
    engine = LocalEngine("cpu", "fp32", max_batch=8, batch_wait_ms=5)
    app = create_app(ServeConfig(), reg, engine, on_request=records.append)
    with _serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        assert "bot@prod" in [m.id for m in client.models.list().data]
        raw = client.chat.completions.with_raw_response.create(
            model="bot", messages=[{"role": "user", "content": "hello"}], max_tokens=6)
        assert raw.headers["x-tuneforge-version"] == "bot:v2"
        resp = raw.parse()
        assert resp.model == "bot:v2" and resp.usage.completion_tokens <= 6
        streamed = client.chat.completions.create(model="bot", messages=[{"role": "user", "content": "hello"}],
                                                  max_tokens=6, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == resp.choices[0].message.content  # greedy: streaming changes nothing
        comp = client.completions.create(model="bot:v1", prompt="2 apples", max_tokens=4)
        assert comp.model == "bot:v1" and comp.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="tf-nope", max_retries=0).models.list()
    asyncio.run(engine.close())
    assert [r.version for r in records] == ["bot:v2", "bot:v2", "bot:v1"]


def test_a_sampling_seed_makes_the_sampled_answer_repeatable(runs, tiny_model_dir):
    import dataclasses

    base = _req(runs, 0, "tell me something", tiny_model_dir, max_tokens=12)
    seeded = [dataclasses.replace(base, temperature=1.0, seed=s) for s in (5, 5, 6)]
    outs = [asyncio.run(_run_all(LocalEngine("cpu", "fp32", max_batch=1), [r]))[0].text for r in seeded]
    assert outs[0] == outs[1]
    assert outs[2] != outs[0]  # another seed samples another answer (12 tokens from a random tiny model)


def test_loads_unloads_and_batches_all_run_on_the_engine_thread(runs, tiny_model_dir, monkeypatch):
    # One thread for every torch op (LocalEngine._on_worker says why), model loading included.
    engine = LocalEngine("cpu", "fp32", max_batch=1)
    threads = []

    def on(name):
        fn = getattr(engine, name)

        def wrapper(*args):
            threads.append((name, threading.current_thread().name))
            return fn(*args)
        monkeypatch.setattr(engine, name, wrapper)

    for name in ("_model", "_delete", "_generate"):
        on(name)

    async def go():
        await engine.load(_req(runs, 0, "hello", tiny_model_dir))
        out = await collect(engine.stream(_req(runs, 1, "hello", tiny_model_dir)))
        unloaded = await engine.unload("bot:v1")
        await engine.close()
        return out, unloaded

    out, unloaded = asyncio.run(go())
    assert out.completion_tokens > 0 and unloaded and engine.resident() == ["bot:v2"]
    assert {n for n, _ in threads} == {"_model", "_delete", "_generate"}
    assert {t for _, t in threads} == {"tuneforge-engine"}
