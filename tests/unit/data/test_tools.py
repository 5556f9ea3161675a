"""Tool schemas, calls and results as text, and calls parsed back (tuneforge.data.tools)."""

import json

import pytest

from tuneforge.data.tools import call_schema, chat_text, parse_tool_calls, render_messages, tool_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
EMAIL = {"type": "function", "function": {
    "name": "send_email", "description": "Send an email",
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]}}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo and Lima?"},
    {"role": "assistant", "content": "", "weight": 1, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}]},
    {"role": "tool", "content": '{"celsius": 3}', "tool_call_id": "call_0"},
    {"role": "tool", "content": '{"celsius": 19}', "tool_call_id": "call_1"},
    {"role": "assistant", "content": "Oslo 3°C, Lima 19°C."},
]


class _Tok:
    """A stand-in with only the chat template attribute tool_template reads."""

    def __init__(self, template):
        self.chat_template = template


def test_tool_template_detects_native_support():
    assert not tool_template(_Tok("{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    assert tool_template(_Tok("{% if tools %}{{ tools | tojson }}{% endif %}{{ m.tool_calls }}"))
    assert tool_template(_Tok({"default": "x", "tool_use": "{{ tools }} {{ tool_calls }}"}))


def test_fallback_puts_tools_in_the_system_turn_and_results_in_one_user_turn():
    msgs = render_messages(_Tok("plain"), [{"role": "system", "content": "Be brief."}, *CONVERSATION],
                           [WEATHER, EMAIL])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(EMAIL) in msgs[0]["content"]
    call = msgs[2]["content"].split("\n")
    assert call[0] == "<tool_call>" and json.loads(call[1]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert msgs[2]["content"].count("<tool_call>") == 2
    assert msgs[3]["content"].count("<tool_response>") == 2 and '{"celsius": 19}' in msgs[3]["content"]
    assert all(set(m) == {"role", "content"} for m in msgs)


def test_native_templates_get_the_messages_without_tuneforge_keys():
    msgs = render_messages(_Tok("{{ tools }}{{ tool_calls }}"), CONVERSATION, [WEATHER])
    assert msgs[1]["tool_calls"] == CONVERSATION[1]["tool_calls"] and "weight" not in msgs[1]
    assert msgs[2] == {"role": "tool", "content": '{"celsius": 3}', "tool_call_id": "call_0"}


def test_rows_without_tools_render_unchanged(tiny_tok):
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}]
    assert chat_text(tiny_tok, plain) == tiny_tok.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in plain], tokenize=False)


def test_fallback_calls_parse_back_to_the_calls_written(tiny_tok):
    text = chat_text(tiny_tok, CONVERSATION, [WEATHER])
    answer = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, calls, errors = parse_tool_calls(answer, {"get_weather"})
    assert (content, errors) == ("", [])
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                     {"name": "get_weather", "arguments": {"city": "Lima"}}]


@pytest.mark.parametrize("text, calls, errors", [
    ("Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>",
     [{"name": "get_weather", "arguments": {"city": "Rome"}}], []),
    # generation may stop at eos right after the JSON, before the closing tag
    ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}",
     [{"name": "get_weather", "arguments": {"city": "Rome"}}], []),
    # arguments written as a JSON string, as OpenAI's API sends them
    ("<tool_call>{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}</tool_call>",
     [{"name": "get_weather", "arguments": {"city": "Rome"}}], []),
    ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>", [],
     ["<tool_call> block is not JSON (Expecting value)"]),
    ("<tool_call>{\"name\": \"delete_all\", \"arguments\": {}}</tool_call>", [],
     ["unknown function 'delete_all' (tools: get_weather)"]),
    ("<tool_call>{\"name\": \"get_weather\", \"arguments\": [1]}</tool_call>", [],
     ["arguments of 'get_weather' are not a JSON object"]),
    # a bare JSON call (the tags dropped) counts only for a known function
    ("{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}",
     [{"name": "get_weather", "arguments": {"city": "Rome"}}], []),
    ("{\"name\": \"Rome\", \"arguments\": {}}", [], []),
])
def test_parse_tool_calls(text, calls, errors):
    _, got, why = parse_tool_calls(text, {"get_weather"})
    assert got == calls and why == errors


def test_call_schema_covers_the_named_functions_only():
    one = call_schema([WEATHER, EMAIL], {"send_email"})
    assert one["properties"]["name"] == {"const": "send_email"}
    assert one["properties"]["arguments"] == EMAIL["function"]["parameters"]
    both = call_schema([WEATHER, EMAIL])
    assert [o["properties"]["name"]["const"] for o in both["anyOf"]] == ["get_weather", "send_email"]
    with pytest.raises(ValueError, match="no tool named"):
        call_schema([WEATHER], {"nope"})
