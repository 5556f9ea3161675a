"""Rows with tools: the trained spans on SmolLM2's template (no tool support: the fallback
format) and on Qwen2.5's real template (native tool rendering), with the real tokenizer."""

import copy
from pathlib import Path

import pytest

from tuneforge.data.render import IGNORE, encode_rows, prompt_ids, render_chat
from tuneforge.data.tools import tool_template

QWEN = Path(__file__).parents[2] / "fixtures" / "templates" / "qwen2_5.jinja"
TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "Current weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                            "required": ["city"]}}},
         {"type": "function", "function": {
             "name": "lookup_order", "description": "Status of an order",
             "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]
CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
CALL_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
RESULT = '{"city": "Oslo", "temperature": 3, "unit": "celsius", "conditions": "snow"}'
ANSWER = "It is 3 degrees and snowing in Oslo."
ROW = [{"role": "user", "content": "What's the weather like in Oslo right now?"},
       {"role": "assistant", "content": "", "tool_calls": [CALL]},
       {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": RESULT},
       {"role": "assistant", "content": ANSWER}]


@pytest.fixture(scope="module")
def smol():
    from tuneforge.models.load import load_tokenizer  # deferred: loads the embedded tokenizer files

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def qwen(smol):
    tok = copy.deepcopy(smol)  # SmolLM2's vocab has <|im_start|>/<|im_end|>, so Qwen2.5's template tokenizes
    tok.chat_template = QWEN.read_text()
    return tok


def spans(tok, ids, labels) -> list[str]:
    """The decoded runs of labelled tokens, in order."""
    out, run = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            run.append(t)
        elif run:
            out.append(tok.decode(run))
            run = []
    return out + ([tok.decode(run)] if run else [])


def test_templates_are_what_the_tests_assume(smol, qwen):
    assert not tool_template(smol) and tool_template(qwen)


@pytest.mark.parametrize("which", ["smol", "qwen"])
def test_call_and_final_answer_are_trained_never_the_tool_result(which, request):
    tok = request.getfixturevalue(which)
    ids, labels = render_chat(tok, ROW, TOOLS)
    text = tok.decode(ids)
    assert "<tools>" in text and '"name": "lookup_order"' in text  # the schemas are in the prompt
    assert RESULT in text and "<tool_response>" in text
    assert spans(tok, ids, labels) == [CALL_BLOCK, ANSWER + "<|im_end|>"]
    trained = tok.decode([lab for lab in labels if lab != IGNORE])
    assert "tool_response" not in trained and "snow\"" not in trained and "Oslo right now" not in trained


def test_native_template_renders_its_own_system_text(qwen, smol):
    assert "You are Qwen, created by Alibaba Cloud" in qwen.decode(render_chat(qwen, ROW, TOOLS)[0])
    assert "Qwen" not in smol.decode(render_chat(smol, ROW, TOOLS)[0])


@pytest.mark.parametrize("which", ["smol", "qwen"])
def test_weight_zero_turn_is_context_only(which, request):
    tok = request.getfixturevalue(which)
    row = [dict(m) for m in ROW]
    row[1]["weight"] = 0
    ids, labels = render_chat(tok, row, TOOLS)
    assert spans(tok, ids, labels) == [ANSWER + "<|im_end|>"]
    assert CALL_BLOCK in tok.decode(ids)  # still in the context
    assert "weight" not in tok.decode(ids)


@pytest.mark.parametrize("which", ["smol", "qwen"])
def test_parallel_calls_train_both_blocks(which, request):
    tok = request.getfixturevalue(which)
    second = {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": "A-17"}}}
    row = [ROW[0], {"role": "assistant", "content": "", "tool_calls": [CALL, second]},
           {"role": "tool", "tool_call_id": "call_0", "content": RESULT},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
           {"role": "assistant", "content": ANSWER}]
    ids, labels = render_chat(tok, row, TOOLS)
    both = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A-17"}}\n</tool_call><|im_end|>')
    assert spans(tok, ids, labels) == [both, ANSWER + "<|im_end|>"]
    text = tok.decode(ids)
    assert text.count("<tool_response>") == 2 and text.count("<|im_start|>user") == 2  # results share one turn


@pytest.mark.parametrize("which", ["smol", "qwen"])
def test_tools_but_no_call(which, request):
    tok = request.getfixturevalue(which)
    row = [{"role": "user", "content": "Thanks, that's all!"}, {"role": "assistant", "content": "You're welcome!"}]
    ids, labels = render_chat(tok, row, TOOLS)
    assert "<tools>" in tok.decode(ids)
    assert spans(tok, ids, labels) == ["You're welcome!<|im_end|>"]


def test_encode_rows_and_prompt_ids_take_the_rows_tools(smol):
    enc = encode_rows(smol, [{"messages": ROW, "tools": TOOLS}, {"messages": ROW[:1] + [{"role": "assistant", "content": "Hi"}]}],
                      2048, "error")
    with_tools, plain = (smol.decode(r["input_ids"]) for r in enc.rows)
    assert "<tools>" in with_tools and "<tools>" not in plain
    prompt = smol.decode(prompt_ids(smol, ROW[:2], TOOLS))
    assert "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n") and '"arguments": {"city"' not in prompt
