"""Preference, classification and text formats; detection, override and column mapping."""

import json

import pytest

from tuneforge.data.formats import FORMATS, RowError, detect, map_texts, prompt_text, row_texts
from tuneforge.data.load import DataError, load_rows


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_preference_plain_and_chat_forms(tmp_path):
    plain = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    chat = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"}
    rows, rep = load_rows([jsonl(tmp_path, [plain, chat])])
    assert rep.kind == "preference" and rep.format == "preference"
    assert rows[0]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "4"}]
    assert rows[1]["prompt"][0]["role"] == "system" and rows[1]["rejected"][0]["content"] == "go away"
    assert prompt_text(rows[1]) == "be brief\nhi"


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected: identical to chosen"),
    ({"prompt": "p", "chosen": " ", "rejected": "r"}, "chosen: empty"),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "prompt: each message needs"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "c", "rejected": "r"},
     "prompt: prompt ends with an assistant turn"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
     "chosen: does not end with a non-empty assistant turn"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen: expected str or a list of messages"),
])
def test_preference_bad_rows_name_the_field(tmp_path, row, reason):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = jsonl(tmp_path, [good, row])
    rows, rep = load_rows([path])
    assert len(rows) == 1 and rep.read == 2
    assert any(k.startswith(reason) for k in rep.dropped), rep.dropped
    assert next(iter(rep.examples.values()))[0].startswith(f"{path}:2: field ")


def test_classification_labels_become_strings_and_missing_label_is_counted(tmp_path):
    rows, rep = load_rows([jsonl(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": "pos"},
                                            {"text": "c", "label": None}, {"text": "d", "label": [1]}])])
    assert rep.kind == "classification" and [r["label"] for r in rows] == ["1", "pos"]
    assert rep.dropped == {"label: missing": 1, "label: expected str or int, got list": 1}


def test_detection_is_explained_and_overridable(tmp_path):
    name, why = detect({"text", "label", "id"}, {})
    assert name == "classification" and "rows have text, label" in why
    path = jsonl(tmp_path, [{"text": "doc one", "label": "x"}])
    rows, rep = load_rows([path], fmt="text")  # the label column is ignored when forced to raw text
    assert rep.format == "text" and rep.format_reason == "set by the user" and rows[0] == {
        "text": "doc one", "_where": f"{path}:1"}


def test_column_mapping_for_new_formats(tmp_path):
    path = jsonl(tmp_path, [{"question": "q", "good": "g", "bad": "b"}])
    rows, rep = load_rows([path], columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert rep.format == "preference" and rows[0]["chosen"][0]["content"] == "g"
    with pytest.raises(DataError, match="no known format fits"):
        load_rows([path])


def test_map_texts_leaves_roles_labels_and_bookkeeping_alone():
    row = {"messages": [{"role": "user", "content": "A"}], "label": "L", "_where": "f:1"}
    out = map_texts(row, str.lower)
    assert out == {"messages": [{"role": "user", "content": "a"}], "label": "L", "_where": "f:1"}
    assert row_texts({"text": "x", "label": "y"}) == ["x"]


def test_text_format_rejects_empty():
    with pytest.raises(RowError, match="empty"):
        FORMATS["text"].convert({"text": "  "}, {})
