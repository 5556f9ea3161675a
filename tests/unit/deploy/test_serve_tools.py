"""Tool calling, n, logprobs and structured output on the tiny random model, through the app:
grammars make a random model's output valid (and without them it is not), fields the server
cannot honour are refused by name, the base model answers under its own name."""

import asyncio
import json

import pytest
from deploy_helpers import fake_run, serve_in_thread
from fastapi.testclient import TestClient

from tuneforge.deploy.config import ServeConfig
from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
from tuneforge.deploy.grammar import json_grammar
from tuneforge.deploy.server import create_app
from tuneforge.deploy.tool_calls import ToolPlan, ToolStream
from tuneforge.registry.store import Registry

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

BASE = "tiny-base"
PROMPTS = ["2 apples and 3 pears", "hello", "one box of nails, please", "b c a", "what is the weather"]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "days", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "maximum": 99}, "b": {"type": "boolean"}},
             "required": ["a", "b"], "additionalProperties": False}}}]
ORDER = {"type": "object", "properties": {"item": {"type": "string", "maxLength": 8},
                                          "qty": {"type": "integer", "minimum": 0, "maximum": 50},
                                          "gift": {"type": "boolean"}},
         "required": ["item", "qty", "gift"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    reg = Registry(f"sqlite:///{root / 'reg.db'}")
    app = create_app(ServeConfig(base_model=tiny_model_dir, base_name=BASE, max_tokens=160), reg,
                     LocalEngine("cpu", "fp32", max_batch=8, batch_wait_ms=5))
    with TestClient(app) as c:
        c.registry, c.run_root = reg, root
        yield c


def _chat(client, prompt, **extra):
    return client.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": prompt}],
                                                    "max_tokens": 100} | extra)


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_the_base_model_is_listed_and_answers_under_its_own_name(client):
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == BASE and models[0]["owned_by"] == "tuneforge" and models[0]["tuneforge"]["base"]
    r = _chat(client, "hello", max_tokens=5)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == BASE and r.json()["usage"]["completion_tokens"] <= 5


def test_json_schema_is_enforced_while_decoding(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
    constrained = [_chat(client, p, response_format=fmt).json()["choices"][0]["message"]["content"] for p in PROMPTS]
    assert all(_valid(t, ORDER) for t in constrained), constrained
    free = [_chat(client, p).json()["choices"][0]["message"]["content"] for p in PROMPTS]
    assert sum(_valid(t, ORDER) for t in free) <= 1, free  # the random model alone does not write it
    obj = _chat(client, "hello", response_format={"type": "json_object"}, max_tokens=150).json()["choices"][0]
    if obj["finish_reason"] == "stop":  # a free-form object may run past max_tokens; when it ends, it parses
        assert isinstance(json.loads(obj["message"]["content"]), dict)


def test_a_required_tool_call_is_a_valid_call(client):
    for p in PROMPTS[:3]:
        body = _chat(client, p, tools=TOOLS, tool_choice="required").json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls", body
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), params)
    named = _chat(client, "x", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}).json()
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "add"
    # Without the grammar (auto) the random model does not call: the answer is text, never a crash.
    auto = [_chat(client, p, tools=TOOLS).json()["choices"][0] for p in PROMPTS]
    assert sum(c["finish_reason"] == "tool_calls" for c in auto) <= 1, auto
    assert all(isinstance(c["message"]["content"], str) for c in auto if c["finish_reason"] != "tool_calls")
    none = _chat(client, "x", tools=TOOLS, tool_choice="none").json()["choices"][0]
    assert "tool_calls" not in none["message"]


def test_a_required_call_cut_by_max_tokens_is_a_422_naming_why(client):
    r = _chat(client, "x", tools=TOOLS, tool_choice="required", max_tokens=3)
    assert r.status_code == 422 and "max_tokens" in r.json()["error"]["message"], r.text


def test_history_with_tool_calls_and_results(client):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 1, \"unit\": \"c\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"t\": 3}"}]
    r = client.post("/v1/chat/completions", json={"model": BASE, "messages": messages, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 200, r.text
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    r = client.post("/v1/chat/completions", json={"model": BASE, "messages": messages, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"


@pytest.mark.parametrize("extra, field", [
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"logit_bias": {"5": 3}}, "logit_bias"), ({"store": True}, "store"), ({"n": 9}, "n"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"seed": 2**64, "temperature": 1}, "seed"),
    ({"reasoning_effort": "low"}, "reasoning_effort"), ({"audio": {"voice": "x"}}, "audio"),
    ({"some_new_field": 1}, "some_new_field"), ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"modalities": ["text", "audio"]}, "modalities"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"pattern": "(("}}}}}]}, "tools"),
])
def test_what_cannot_be_honoured_is_refused_by_name(client, extra, field):
    r = _chat(client, "hi", **extra)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"], r.text


def test_harmless_fields_are_accepted(client):
    r = _chat(client, "hi", max_tokens=2, user="u1", metadata={"a": "b"}, store=False, presence_penalty=0,
              logit_bias={}, modalities=["text"], service_tier="auto", parallel_tool_calls=True, tools=TOOLS)
    assert r.status_code == 200, r.text


def test_n_choices_and_logprobs(client):
    body = _chat(client, "hello", n=3, max_tokens=6, temperature=1.0, seed=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1  # sampled: not all the same
    greedy = _chat(client, "hello", n=2, max_tokens=6).json()
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]
    assert greedy["usage"]["completion_tokens"] == 2 * _chat(client, "hello", max_tokens=6).json()["usage"][
        "completion_tokens"]
    lp = _chat(client, "hello", max_tokens=6, logprobs=True, top_logprobs=2).json()["choices"][0]
    entries = lp["logprobs"]["content"]
    assert 1 <= len(entries) <= 6 and "".join(e["token"] for e in entries).strip() == lp["message"]["content"].strip()
    for e in entries:  # greedy: the chosen token is the most likely one
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
    comp = client.post("/v1/completions", json={"model": BASE, "prompt": "2 apples", "max_tokens": 4,
                                                "logprobs": 3}).json()["choices"][0]["logprobs"]
    # the legacy shape maps token text -> logprob: two ids with the same text share one key
    assert len(comp["tokens"]) == len(comp["token_logprobs"]) == 4 and all(1 <= len(t) <= 3 for t in comp["top_logprobs"])


def test_stream_include_usage_and_streamed_tool_call(client):
    with client.stream("POST", "/v1/chat/completions", json={
            "model": BASE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "stream": True,
            "tools": TOOLS, "tool_choice": "required", "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    deltas = [tc for e in events[:-1] for tc in e["choices"][0]["delta"].get("tool_calls") or []]
    args = "".join(d["function"].get("arguments") or "" for d in deltas)
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] in ("get_weather", "add")
    assert isinstance(json.loads(args), dict)


def test_streamed_completion_logprobs_follow_the_text(client):
    with client.stream("POST", "/v1/completions", json={"model": BASE, "prompt": "2 apples", "max_tokens": 5,
                                                        "logprobs": 1, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    text, tokens, offsets = "", [], []
    for e in events:
        c = e["choices"][0]
        text += c["text"]
        if c["logprobs"]:
            tokens += c["logprobs"]["tokens"]
            offsets += c["logprobs"]["text_offset"]
    assert "".join(tokens) == text and 1 <= len(tokens) <= 5
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_the_base_is_scoped_like_any_model(client, tiny_model_dir):  # last on ``client``: it creates keys
    reg = client.registry
    reg.add(fake_run(tiny_model_dir, client.run_root / "r1", seed=1), "bot")
    _, tenant = reg.create_key("tenant", ["bot"])
    _, both = reg.create_key("both", ["bot", BASE])
    seen = client.get("/v1/models", headers={"Authorization": f"Bearer {tenant}"}).json()["data"]
    assert BASE not in [m["id"] for m in seen] and "bot" in [m["id"] for m in seen]
    r = client.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {tenant}"},
        json={"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 403
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {both}"},
                    json={"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == BASE


def test_openai_client_gets_tool_calls_n_and_logprobs(tiny_model_dir, tmp_path):
    openai = pytest.importorskip("openai")
    engine = LocalEngine("cpu", "fp32", max_batch=8, batch_wait_ms=5)
    app = create_app(ServeConfig(base_model=tiny_model_dir, base_name=BASE), Registry(f"sqlite:///{tmp_path / 'r.db'}"),
                     engine)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert BASE in [m.id for m in client.models.list().data]
        ask = {"model": BASE, "messages": [{"role": "user", "content": "weather in Oslo?"}], "tools": TOOLS,
               "tool_choice": "required", "max_tokens": 100}
        resp = client.chat.completions.create(**ask)
        (call,) = resp.choices[0].message.tool_calls
        assert resp.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments)
        parts: dict[int, dict] = {}
        for chunk in client.chat.completions.create(**ask, stream=True):
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                p = parts.setdefault(d.index, {"name": "", "arguments": ""})
                p["name"] += (d.function.name or "") if d.function else ""
                p["arguments"] += (d.function.arguments or "") if d.function else ""
        assert parts == {0: {"name": call.function.name, "arguments": call.function.arguments}}  # greedy: same call
        two = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], n=2,
                                             max_tokens=4, temperature=1.0, seed=1)
        assert [c.index for c in two.choices] == [0, 1]
        texts, finished = {0: "", 1: ""}, set()
        for chunk in client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], n=2,
                                                    max_tokens=4, temperature=1.0, seed=1, stream=True):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                if c.finish_reason:
                    finished.add(c.index)
        assert finished == {0, 1} and texts == {c.index: c.message.content for c in two.choices}  # same seeds
        lp = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            logprobs=True, top_logprobs=2)
        assert lp.choices[0].logprobs.content and len(lp.choices[0].logprobs.content[0].top_logprobs) == 2
    asyncio.run(engine.close())


def test_rows_of_one_batch_keep_their_own_grammar_or_none(tiny_model_dir):
    def req(grammar=None, logprobs=None):
        return GenRequest(BASE, None, tiny_model_dir, [{"role": "user", "content": "hello"}], max_tokens=40,
                          grammar=grammar, logprobs=logprobs)

    async def run(engine, reqs):
        out = await asyncio.gather(*(collect(engine.stream(r)) for r in reqs))
        await engine.close()
        return out

    alone = asyncio.run(run(LocalEngine("cpu", "fp32", max_batch=1), [req()]))[0]
    batched = LocalEngine("cpu", "fp32", max_batch=4, batch_wait_ms=300)
    free, constrained, with_lp = asyncio.run(run(batched, [req(), req(json_grammar(ORDER)), req(logprobs=1)]))
    assert max(len(b) for b in batched.batches) == 3  # one generate call served all three rows
    assert free.text == alone.text == with_lp.text  # rows without a grammar are untouched
    assert _valid(constrained.text, ORDER) and not _valid(free.text, ORDER)
    assert free.logprobs is None and len(with_lp.logprobs) == with_lp.completion_tokens


def test_auto_calls_parse_and_bad_blocks_come_back_as_content():
    plan = ToolPlan(TOOLS, {"get_weather", "add"}, choice="auto")
    good = 'Checking.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": true}}\n</tool_call>'
    message, reason, errors = plan.reply(good, "stop")
    assert reason == "tool_calls" and message["content"] == "Checking." and not errors
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": True}
    bad = 'Hm <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    message, reason, errors = plan.reply(bad, "stop")
    assert reason == "stop" and message["content"] == bad and "unknown function 'nope'" in errors[0]
    two = good + '\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": false}}\n</tool_call>'
    message, _, errors = ToolPlan(TOOLS, {"add"}, parallel=False, choice="auto").reply(two, "stop")
    assert len(message["tool_calls"]) == 1 and "parallel_tool_calls" in errors[0]
    stream = ToolStream(plan)  # content streams until a block may open, the call comes at the end
    sent = "".join(stream.feed(good[i:i + 3]) for i in range(0, len(good), 3))
    rest, deltas, reason = stream.finish("stop")
    assert sent == "Checking.\n" and rest == ""
    assert reason == "tool_calls" and deltas[0]["function"]["name"] == "add"

