"""Formats users bring from LLaMA-Factory, Axolotl and OpenAI: every fixture (in the real
files' shapes) loads without losing a valid row, into the canonical rows of SPEC.md."""

import json
from pathlib import Path

import pytest

from tuneforge.config import MessagesOptions
from tuneforge.data.formats import map_texts, prompt_text, row_texts
from tuneforge.data.load import DataError, UnreadFieldError, load_rows
from tuneforge.data.prepare import _prompt_key

FX = Path(__file__).resolve().parents[2] / "fixtures" / "formats"
FIXTURES = {  # file -> (kind, format)
    "llamafactory/glaive_toolcall_demo.json": ("sft", "sharegpt"),
    "llamafactory/dpo_demo.json": ("preference", "sharegpt_preference"),
    "llamafactory/kto_demo.json": ("unpaired", "kto_label"),
    "llamafactory/alpaca_demo.json": ("sft", "instruction"),
    "openai/tools.jsonl": ("sft", "chat"),
    "openai/functions_legacy.jsonl": ("sft", "chat"),
    "axolotl/chat_template.jsonl": ("sft", "sharegpt"),
    "axolotl/input_output.jsonl": ("segments", "segments"),
}


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def strip(rows):
    return [{k: v for k, v in r.items() if k != "_where"} for r in rows]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_loads_whole(name):
    rows, rep = load_rows([str(FX / name)])
    kind, fmt = FIXTURES[name]
    assert rep.read == rep.kept == len(rows) >= 3 and not rep.dropped
    assert (rep.kind, rep.format) == (kind, fmt), rep.format_reason
    assert rows[0]["_where"] == f"{FX / name}:1"


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def test_llamafactory_tool_calls_become_canonical():
    rows, _ = load_rows([str(FX / "llamafactory/glaive_toolcall_demo.json")])
    tip = rows[0]
    assert tip["tools"][0]["type"] == "function" and tip["tools"][0]["function"]["name"] == "calculate_tip"
    assert tip["messages"][1] == {"role": "assistant", "content": "",
                                  "tool_calls": [call("call_0", "calculate_tip", {"bill_amount": 100,
                                                                                   "tip_percentage": 15})]}
    assert tip["messages"][2] == {"role": "tool", "content": '{"tip_amount": 15}', "tool_call_id": "call_0"}
    parallel = rows[1]["messages"]
    assert [c["id"] for c in parallel[1]["tool_calls"]] == ["call_0", "call_1"]
    assert parallel[1]["tool_calls"][1]["function"]["arguments"] == {"location": "Rome", "unit": "celsius"}
    assert [m.get("tool_call_id") for m in parallel[2:4]] == ["call_0", "call_1"]
    assert "tools" not in rows[3] and "tools" not in rows[5]  # "[]" and "" are no tools
    # arguments given as a JSON string inside the call are parsed; ids continue per row
    two = rows[4]["messages"]
    assert two[1]["tool_calls"][0]["function"]["arguments"] == {"bill_amount": 45.5, "tip_percentage": 20}
    assert two[5]["tool_calls"][0]["id"] == "call_1" and two[6]["tool_call_id"] == "call_1"
    assert {t["function"]["name"] for t in rows[4]["tools"]} == {"calculate_tip", "get_current_weather"}


def test_openai_tools_weights_and_parallel_flag():
    rows, _ = load_rows([str(FX / "openai/tools.jsonl")])
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "", "tool_calls": [
        call("call_id", "get_current_weather", {"location": "San Francisco, USA", "format": "celsius"})]}
    two = rows[1]["messages"]
    assert [c["id"] for c in two[2]["tool_calls"]] == ["call_a", "call_b"] and two[2]["content"] == ""
    assert two[3] == {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_a"}
    assert [m.get("weight") for m in rows[2]["messages"]] == [None, None, 0, None, 1]
    assert rows[3]["parallel_tool_calls"] is False and "parallel_tool_calls" not in rows[4]


def test_openai_legacy_functions_convert_to_tools():
    rows, _ = load_rows([str(FX / "openai/functions_legacy.jsonl")])
    m = rows[0]["messages"]
    assert m[1]["tool_calls"] == [call("call_0", "get_current_weather", {"location": "Boston"})]
    assert m[2] == {"role": "tool", "content": '{"temperature": "22", "unit": "celsius"}',
                    "tool_call_id": "call_0", "name": "get_current_weather"}
    assert rows[0]["tools"][0]["function"]["description"] == "Get the current weather"
    assert rows[1]["messages"][-1]["tool_calls"][0]["function"]["arguments"] == {"location": "London"}


def test_llamafactory_preference_kto_and_alpaca_history():
    pref, _ = load_rows([str(FX / "llamafactory/dpo_demo.json")])
    assert strip(pref)[2] == {
        "prompt": [{"role": "user", "content": "How many legs does a spider have?"},
                   {"role": "assistant", "content": "Eight."}, {"role": "user", "content": "And an insect?"}],
        "chosen": [{"role": "assistant", "content": "Insects have six legs."}],
        "rejected": [{"role": "assistant", "content": "Insects have eight legs too."}]}
    kto, _ = load_rows([str(FX / "llamafactory/kto_demo.json")])
    assert [r["label"] for r in kto] == [True, False, True, False, True]
    assert kto[3]["completion"] == [{"role": "assistant", "content": "No, you are stupid."}]
    assert len(kto[3]["prompt"]) == 3 and prompt_text(kto[3]).endswith("Say something rude.")
    alpaca, _ = load_rows([str(FX / "llamafactory/alpaca_demo.json")])
    assert [m["role"] for m in alpaca[4]["messages"]] == ["user", "assistant"] * 3
    assert alpaca[3]["messages"][0] == {"role": "system", "content": "You are a concise assistant."}


def test_axolotl_training_flags_and_segments():
    rows, rep = load_rows([str(FX / "axolotl/chat_template.jsonl")])
    assert rows[1]["messages"][1] == {"role": "assistant", "content": "Hi!", "weight": 0}
    assert rep.unknown_fields == {"source": 1}
    seg, _ = load_rows([str(FX / "axolotl/input_output.jsonl")])
    assert seg[1]["segments"] == [{"text": "Question: what is 2+2?\nAnswer: ", "label": False},
                                  {"text": "4", "label": True}]
    assert prompt_text(seg[1]) == "Question: what is 2+2?\nAnswer: "


def test_axolotl_options_rename_field_keys_and_roles(tmp_path):
    row = {"dialog": [{"speaker": "asker", "text": "hi", "train": False},
                      {"speaker": "bot1", "text": "hello", "train": True}]}
    opts = MessagesOptions(field="dialog", role_key="speaker", content_key="text",
                           roles={"user": ["asker"], "assistant": ["bot1"]}, train_key="train")
    rows, _ = load_rows([jsonl(tmp_path, [row])], messages=opts)
    assert strip(rows) == [{"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "hello", "weight": 1}]}]
    with pytest.raises(ValueError, match="trains the assistant turns only"):
        MessagesOptions(roles_to_train=["assistant", "user"])


@pytest.mark.parametrize("row,field,reason", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     "messages[1].tool_calls[0].arguments", "arguments must be a JSON object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "messages[1].weight", "expected 0 or 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "messages[1].weight", "the last assistant turn is not trained"),
    ({"messages": [{"role": "user", "content": "q", "training": True}, {"role": "assistant", "content": "a"}]},
     "messages[0].training", "a user turn flagged for training"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "{oops"},
     "tools", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}],
      "parallel_tool_calls": False}, "messages[1].tool_calls", "several calls in one turn"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, reason):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = jsonl(tmp_path, [good, row])
    _, rep = load_rows([path])
    assert rep.read == 2 and rep.kept == 1
    (example,), = rep.examples.values()
    assert example.startswith(f"{path}:2: field '{field}': {reason}"), example


def test_kto_tag_under_sft_names_the_objective_and_the_opt_out(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
             "kto_tag": i % 2 == 0} for i in range(4)]
    path = jsonl(tmp_path, rows)
    with pytest.raises(UnreadFieldError, match=r"'kto_tag'.*objective.name=kto.*data.ignore_fields=\[kto_tag\]"):
        load_rows([path], kind="sft")
    with pytest.raises(UnreadFieldError, match=r"'label'.*objective.name=kto"):
        load_rows([str(FX / "llamafactory/kto_demo.json")], kind="sft")
    kept, rep = load_rows([path], kind="sft", ignore_fields=["kto_tag"])
    assert rep.kind == "sft" and len(kept) == 4 and rep.ignored_fields == {"kto_tag": 4}
    assert "kto_tag" not in kept[0] and rep.notes() == ["ignored fields (data.ignore_fields): kto_tag (4 rows)"]
    auto, rep = load_rows([path])  # untold, the tag makes them KTO rows
    assert rep.kind == "unpaired" and [r["label"] for r in auto] == [True, False, True, False]


def test_meaningful_fields_the_kind_cannot_carry_stop_loading(tmp_path):
    dpo = str(FX / "llamafactory/dpo_demo.json")
    with pytest.raises(UnreadFieldError, match="'chosen'.*preference objective"):
        load_rows([dpo], kind="sft")
    with pytest.raises(UnreadFieldError, match="'tools'"):
        load_rows([jsonl(tmp_path, [{"text": "a doc", "tools": "[]"}])])


def test_preference_pairs_split_for_kto():
    rows, rep = load_rows([str(FX / "llamafactory/dpo_demo.json")], kind="unpaired")
    assert rep.kind == "unpaired" and rep.split_pairs == 5 and len(rows) == 10 and rep.kept == 5
    assert rep.notes() == ["5 pairs split into 10 unpaired rows"]
    assert [r["label"] for r in rows[:2]] == [True, False] and rows[0]["prompt"] == rows[1]["prompt"]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "France's capital is Lyon."}]
    assert len({r["_where"] for r in rows}) == 10


INFO = FX / "llamafactory" / "dataset_info.json"


@pytest.mark.parametrize("name,fixture", [
    ("alpaca_en_demo", "llamafactory/alpaca_demo.json"), ("glaive_toolcall_en_demo", "llamafactory/glaive_toolcall_demo.json"),
    ("dpo_en_demo", "llamafactory/dpo_demo.json"), ("kto_en_demo", "llamafactory/kto_demo.json")])
def test_dataset_info_names_each_demo(name, fixture):
    rows, rep = load_rows([f"{INFO}#{name}"])
    direct, _ = load_rows([str(FX / fixture)])
    assert rep.read == rep.kept == len(direct) and strip(rows) == strip(direct)
    assert "dataset_info.json" in rep.format_reason


def test_dataset_info_errors(monkeypatch):
    with pytest.raises(DataError, match=r"LLaMA-Factory dataset_info.json: pick a dataset with path#NAME "
                                        r"\(names: alpaca_en, alpaca_en_demo, belle_2m"):
        load_rows([str(INFO)])
    with pytest.raises(DataError, match="no dataset named 'nope'"):
        load_rows([f"{INFO}#nope"])
    with pytest.raises(DataError, match="columns.images .*does not train vision"):
        load_rows([f"{INFO}#mllm_demo"])
    with pytest.raises(DataError, match="only ms_hub_url is given"):
        load_rows([f"{INFO}#belle_2m"])
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load llamafactory/alpaca_en from the Hugging Face hub"):
        load_rows([f"{INFO}#alpaca_en"])


def test_texts_reach_tool_arguments_and_descriptions_and_keys_see_tools():
    rows, _ = load_rows([str(FX / "openai/tools.jsonl")])
    up = map_texts(rows[1], str.upper)
    assert up["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"location": "PARIS", "format": "CELSIUS"}
    assert up["messages"][2]["tool_calls"][0]["function"]["name"] == "get_current_weather"
    assert up["tools"][0]["function"]["description"] == "GET THE CURRENT WEATHER FOR A CITY"
    assert "Paris" in row_texts(rows[1]) and "Get the current weather for a city" in row_texts(rows[1])
    bare = {k: v for k, v in rows[4].items() if k != "tools"}
    assert _prompt_key(rows[4]) != _prompt_key(bare)


def test_dataset_info_kto_entry_under_sft_is_refused_then_ignored():
    spec = f"{INFO}#kto_en_demo"
    with pytest.raises(UnreadFieldError, match=r"'label'.*objective.name=kto.*data.ignore_fields=\[label\]"):
        load_rows([spec], kind="sft")
    rows, rep = load_rows([spec], kind="sft", ignore_fields=["label"])
    assert rep.kind == "sft" and len(rows) == 5 and rep.ignored_fields == {"label": 5}
    assert rows[1]["messages"][-1] == {"role": "assistant", "content": "3 * 3 = 6."}
    pairs, rep = load_rows([f"{INFO}#dpo_en_demo"], kind="unpaired")
    assert rep.split_pairs == 5 and len(pairs) == 10


def test_unknown_message_keys_are_listed(tmp_path):
    row = {"messages": [{"role": "user", "content": "q", "timestamp": 1},
                        {"role": "assistant", "content": "a", "refusal": None}], "id": 7}
    _, rep = load_rows([jsonl(tmp_path, [row, row | {"id": 8}])])
    assert rep.unknown_fields == {"id": 2, "messages[].timestamp": 2, "messages[].refusal": 2}
