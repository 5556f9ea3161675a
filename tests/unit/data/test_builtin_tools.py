"""builtin:tools: OpenAI-shaped tool-calling rows whose calls match their own schemas."""

import json
from collections import Counter

import jsonschema

from tuneforge.data.builtin import TOOL_SPECS, generate
from tuneforge.data.render import IGNORE, render_chat


def canonical(row: dict) -> dict:
    """The OpenAI row as a canonical one (what the loader's chat format does): arguments parsed,
    null content as ""."""
    msgs = []
    for m in row["messages"]:
        c = {**m, "content": m["content"] or ""}
        if m.get("tool_calls"):
            c["tool_calls"] = [{**t, "function": {**t["function"], "arguments": json.loads(t["function"]["arguments"])}}
                               for t in m["tool_calls"]]
        msgs.append(c)
    return {"messages": msgs, "tools": row["tools"]}


def test_rows_are_seeded_and_openai_shaped():
    rows = list(generate("tools", n=300, seed=4))
    assert rows == list(generate("tools", n=300, seed=4)) and rows != list(generate("tools", n=300, seed=5))
    kinds = Counter()
    for row in rows:
        offered = [t["function"]["name"] for t in row["tools"]]
        assert 2 <= len(offered) <= 4 and len(set(offered)) == len(offered)
        assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in row["tools"])
        msgs = row["messages"]
        assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant" and msgs[-1]["content"]
        if len(msgs) == 2:
            kinds["no call"] += 1
            continue
        call = msgs[1]["tool_calls"][0]
        assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
        assert call["id"] == msgs[2]["tool_call_id"] == "call_0" and isinstance(call["function"]["arguments"], str)
        name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
        assert name in offered  # the right tool is always offered
        jsonschema.validate(args, TOOL_SPECS[name]["function"]["parameters"])
        result = json.loads(msgs[2]["content"])
        assert isinstance(result, dict)
        kinds[name] += 1
    assert 0.08 < kinds["no call"] / len(rows) < 0.25
    assert len(kinds) == 7  # all six tools and the no-call rows occur


def test_arguments_come_from_the_request_and_the_answer_from_the_result():
    for row in generate("tools", n=200, seed=1):
        msgs = row["messages"]
        if len(msgs) == 2:
            continue
        args = json.loads(msgs[1]["tool_calls"][0]["function"]["arguments"])
        name = msgs[1]["tool_calls"][0]["function"]["name"]
        for key in {"get_weather": ["city"], "lookup_order": ["order_id"], "send_email": ["to", "subject"]}.get(name, []):
            assert args[key] in msgs[0]["content"]
        result = json.loads(msgs[2]["content"])
        shown = {"get_weather": "temperature", "convert_currency": "converted", "lookup_order": "order_id",
                 "get_stock_price": "price"}.get(name)
        if shown:
            assert str(result[shown]) in msgs[-1]["content"]


def test_rows_render_with_the_call_trained(tiny_tok):
    row = canonical(next(r for r in generate("tools", n=20, seed=2) if len(r["messages"]) == 4))
    ids, labels = render_chat(tiny_tok, row["messages"], row["tools"])
    trained = tiny_tok.decode([t for t in labels if t != IGNORE])
    assert trained.startswith("<tool_call>") and row["messages"][-1]["content"] in trained
    assert row["messages"][2]["content"] not in trained
