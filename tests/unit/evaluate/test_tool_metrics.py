"""Tool-calling metrics: decisions, names, schema-valid and exact arguments, and the eval
flow that generates the first assistant turn and the answer after the tool result."""

import json

import pytest

from tuneforge.evaluate.tool_metrics import (argument_share, call_scores, has_answer_after_tool, is_tool_row,
                                             scored_turn, tool_task_scores)

TOOLS = [{"type": "function", "function": {"name": "convert_currency", "description": "Convert money", "parameters": {
             "type": "object", "properties": {"amount": {"type": "number"},
                                              "from_currency": {"type": "string", "enum": ["EUR", "USD"]},
                                              "to_currency": {"type": "string", "enum": ["EUR", "USD"]}},
             "required": ["amount", "from_currency", "to_currency"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "lookup_order", "description": "Order status", "parameters": {
             "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]
ARGS = {"amount": 20, "from_currency": "USD", "to_currency": "EUR"}
REF = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_0", "type": "function", "function": {"name": "convert_currency", "arguments": ARGS}}]}
PLAIN = {"role": "assistant", "content": "Hello! How can I help?"}


def block(name, args) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


def test_exact_call_scores_one_everywhere_numbers_by_value():
    s = call_scores(block("convert_currency", {**ARGS, "amount": 20.0}), REF, TOOLS)
    assert s == {"tool_call_rate_when_needed": 1.0, "function_name_accuracy": 1.0, "arguments_valid_json": 1.0,
                 "arguments_exact": 1.0, "argument_accuracy": 1.0, "first_turn_correct": 1.0}


def test_wrong_argument_value_valid_but_not_exact():
    s = call_scores(block("convert_currency", {**ARGS, "to_currency": "USD"}), REF, TOOLS)
    assert s["arguments_valid_json"] == 1.0 and s["arguments_exact"] == 0.0
    assert s["argument_accuracy"] == pytest.approx(2 / 3) and s["function_name_accuracy"] == 1.0


def test_schema_violations_are_not_valid():
    as_string = call_scores(block("convert_currency", {**ARGS, "amount": "20"}), REF, TOOLS)
    assert as_string["arguments_valid_json"] == 0.0 and as_string["tool_call_rate_when_needed"] == 1.0
    missing = call_scores(block("convert_currency", {"amount": 20, "from_currency": "USD"}), REF, TOOLS)
    assert missing["arguments_valid_json"] == 0.0 and missing["argument_accuracy"] == pytest.approx(2 / 3)
    broken = call_scores('<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 20,\n</tool_call>', REF, TOOLS)
    assert broken["tool_call_rate_when_needed"] == 1.0  # it tried
    assert broken["arguments_valid_json"] == broken["function_name_accuracy"] == broken["argument_accuracy"] == 0.0


def test_wrong_function_and_no_call():
    wrong = call_scores(block("lookup_order", {"order_id": "X"}), REF, TOOLS)
    assert wrong["function_name_accuracy"] == 0.0 and wrong["arguments_valid_json"] == 1.0  # valid for its function
    assert wrong["arguments_exact"] == wrong["argument_accuracy"] == 0.0
    unknown = call_scores(block("get_weather", {"city": "Oslo"}), REF, TOOLS)
    assert unknown["arguments_valid_json"] == 0.0
    silent = call_scores("20 USD is about 18 EUR.", REF, TOOLS)
    assert silent["tool_call_rate_when_needed"] == 0.0 and silent["first_turn_correct"] == 0.0


def test_bare_json_call_counts_and_invented_arguments_cost():
    bare = call_scores(json.dumps({"name": "convert_currency", "arguments": ARGS}), REF, TOOLS)
    assert bare["arguments_exact"] == 1.0
    extra = call_scores(block("convert_currency", {**ARGS, "fee": 1}), REF, TOOLS)
    assert extra["arguments_valid_json"] == 0.0 and extra["argument_accuracy"] == pytest.approx(3 / 4)


def test_no_call_when_not_needed():
    assert call_scores("Hi! What can I do for you?", PLAIN, TOOLS) == {"no_call_when_not_needed": 1.0,
                                                                        "first_turn_correct": 1.0}
    assert call_scores(block("lookup_order", {"order_id": "1"}), PLAIN, TOOLS)["no_call_when_not_needed"] == 0.0


def test_parallel_calls_compare_as_sets():
    two = {"role": "assistant", "content": "", "tool_calls": [
        REF["tool_calls"][0], {"id": "call_1", "type": "function", "function": {"name": "lookup_order",
                                                                               "arguments": {"order_id": "A1"}}}]}
    both = block("lookup_order", {"order_id": "A1"}) + "\n" + block("convert_currency", ARGS)
    assert call_scores(both, two, TOOLS)["arguments_exact"] == 1.0
    one = call_scores(block("convert_currency", ARGS), two, TOOLS)
    assert one["arguments_exact"] == one["function_name_accuracy"] == 0.0 and one["argument_accuracy"] == 0.75
    assert argument_share([], [{"name": "f", "arguments": {}}]) == 0.0


def test_per_metric_lists_follow_the_references():
    per = tool_task_scores([block("convert_currency", ARGS), "Hello!", "no call"], [REF, PLAIN, REF], [TOOLS] * 3)
    assert per["arguments_exact"] == [1.0, 0.0] and per["no_call_when_not_needed"] == [1.0]
    assert per["first_turn_correct"] == [1.0, 1.0, 0.0]


def test_scored_turn_and_rows():
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, REF,
            {"role": "tool", "tool_call_id": "call_0", "content": "{}"}, {"role": "assistant", "content": "done"}]
    assert scored_turn(conv) == 2 and has_answer_after_tool(conv)
    assert not has_answer_after_tool(conv[:3]) and not has_answer_after_tool([conv[1], PLAIN])
    assert is_tool_row({"messages": conv}) and is_tool_row({"messages": [conv[1], PLAIN], "tools": TOOLS})
    assert not is_tool_row({"messages": [conv[1], PLAIN]}) and not is_tool_row({"messages": [conv[1], PLAIN], "tools": []})


def test_measure_tools_generates_both_turns(tiny_model_dir, tiny_tok):
    from transformers import AutoModelForCausalLM  # deferred: loads torch model code

    from tuneforge.evaluate.measure import GenSettings, measure

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    conv = [{"role": "user", "content": "20 dollars in euros?"}, REF,
            {"role": "tool", "tool_call_id": "call_0", "content": '{"converted": 18.4}'},
            {"role": "assistant", "content": "About 18.4 EUR."}]
    convs = [conv, [{"role": "user", "content": "hello"}, PLAIN]]
    m = measure(model, tiny_tok, convs, kind="tools", labels=None, tools=[TOOLS, TOOLS],
                gen=GenSettings(max_new_tokens=4, batch_size=2), label="t")
    assert m["n"] == 2 and len(m["preds"]) == 2 and len(m["answers_after_tool"]) == 1
    assert len(m["per_example"]["first_turn_correct"]) == 2 and len(m["per_example"]["answer_after_tool"]) == 1
    assert len(m["per_example"]["arguments_exact"]) == 1 and len(m["per_example"]["loss"]) == 2
    assert m["refs"][0].startswith("<tool_call>") and m["prompts"] == ["20 dollars in euros?", "hello"]
    assert m["main"] == "first_turn_correct" and 0 <= m["scores"]["tool_call_rate_when_needed"] <= 1


def test_tuneforge_eval_detects_tool_rows_and_reports_them(tiny_model_dir, tmp_path):
    from rich.console import Console  # deferred: only this test prints

    from tuneforge.data.builtin import generate
    from tuneforge.evaluate.command import EvalOptions, run_eval

    data = tmp_path / "tools.jsonl"
    rows = list(generate("tools", n=12, seed=3))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # OpenAI shape: the loader converts it
    out = run_eval(EvalOptions(target=tiny_model_dir, data=str(data), out=str(tmp_path / "eval"), max_new_tokens=4,
                               batch_size=6, forgetting_texts=0), Console(width=200, record=True))
    res = json.loads((out / "eval_results.json").read_text())
    assert res["kind"] == "tools" and res["n"] == 12
    scores = res["systems"][tiny_model_dir]["scores"]
    n_calls = sum(len(r["messages"]) == 4 for r in rows)
    assert {"tool_call_rate_when_needed", "arguments_exact", "first_turn_correct", "answer_after_tool"} <= set(scores)
    assert ("no_call_when_not_needed" in scores) == (n_calls < 12)
    assert "first_turn_correct" in (out / "report.md").read_text() and "Tool rows:" in (out / "report.md").read_text()
